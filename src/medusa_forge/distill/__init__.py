"""Self-distillation: replay conversations against a model and keep its own replies (`medusa-forge distill`).

- `engine`: in-process batched generation (also what `serve` runs on); `continuous`: continuous batching.
- `backends`: where replies come from: an OpenAI-compatible HTTP server, or the in-process engine.
- `store`: the durable, resumable output file.
- `runner`: turn-by-turn replay with bounded concurrency, progress and a summary; `cli`: the command.
"""
