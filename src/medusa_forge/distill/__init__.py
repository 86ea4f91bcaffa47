"""Self-distillation: replay conversations against a model and keep its own replies (`medusa-forge distill`).

- `backends`: where replies come from: an OpenAI-compatible HTTP server, or an in-process engine
  (`medusa_forge.generation`, also what `serve` runs on).
- `store`: the durable, resumable output file.
- `runner`: turn-by-turn replay with bounded concurrency, progress and a summary; `cli`: the command.
"""
