"""In-process generation engines, used by `distill` (no --url), `serve` and `decode` (a draft behind `serve`).

- `generator`: what a decoder is: `GenerationRequest` in, `Completion` out, the `Generator` protocol and the
  context-length check; `SteppedGenerator`, a decoder that runs one sequence at a time (a draft).
- `text`: chat prompts to ids, ids to text, streamed text deltas, and the tokens that end a reply.
- `device`: dtype names and the "auto" device.
- `hf`: `HFGenerator`, a transformers causal LM as a `Generator` (one left-padded `generate` per batch).
- `static`: `BatchingEngine`, static batching of concurrent requests into `Generator.generate_batch` calls.
- `worker`: `WorkerEngine`, the asynchronous front of an engine whose one thread owns the model (submit,
  cancellation of requests whose caller went away).
- `continuous`: `ContinuousEngine`, continuous batching (requests join and leave between decode steps).
- `interleaved`: `InterleavedEngine`, requests to a one-sequence decoder (a draft) take turns step by step.
- `batching`: `make_engine`, the engine for a generator and a `--batching` mode.
"""
