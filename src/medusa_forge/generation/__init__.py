"""In-process generation engines, used by `distill` (no --url), `serve` and `decode` (Medusa behind `serve`).

- `generator`: what a decoder is: `GenerationRequest` in, `Completion` out, the `Generator` protocol and the
  context-length check. Another decoder (Medusa heads) plugs into the engines by implementing `Generator`.
- `text`: chat prompts to ids, ids to text, streamed text deltas, and the tokens that end a reply.
- `device`: dtype names and the "auto" device.
- `hf`: `HFGenerator`, a transformers causal LM as a `Generator` (one left-padded `generate` per batch).
- `static`: `BatchingEngine`, static batching of concurrent requests into `Generator.generate_batch` calls.
- `continuous`: `ContinuousEngine`, continuous batching (requests join and leave between decode steps).
- `batching`: `make_engine`, the engine for a generator and a `--batching` mode.
"""
