"""In-process generation shared by `distill` (no --url) and `serve`: one batched `generate` for many requests.

Two layers, so another decoder (Medusa heads) plugs in by implementing `Generator` alone:
- `Generator`: synchronous; turns a list of `GenerationRequest`s into `GenerationResult`s, calling `on_text`
  with text deltas for requests that stream. `HFGenerator` does it with one left-padded `model.generate`.
- `BatchingEngine`: asynchronous; collects requests that arrive within a few milliseconds of each other,
  groups those with the same sampling settings and similar prompt lengths, and runs each group as one batch
  in a worker thread, so concurrent clients (or concurrent conversations) share forward passes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from medusa_forge.data.tokenize import ensure_chat_template
from medusa_forge.errors import UserError

logger = logging.getLogger(__name__)

# on_text(index of the request in the batch, new text): called from the generation thread.
TextCallback = Callable[[int, str], None]


class ContextLengthError(ValueError):
    """The prompt plus the requested new tokens do not fit the model's context window."""


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stream: bool = False

    def sampling_key(self) -> tuple:
        """Requests with equal keys can share one `generate` call."""
        if self.temperature <= 0:
            return ("greedy",)
        return ("sample", round(self.temperature, 6), round(self.top_p, 6))


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end-of-turn token) or "length" (max_new_tokens reached)


class Generator(Protocol):
    """What `BatchingEngine`, `serve` and the in-process distill backend need from a decoder."""

    max_context: int

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]: ...

    def check_fits(self, prompt_length: int, max_new_tokens: int) -> None: ...  # raises ContextLengthError

    def generate_batch(
        self, requests: list[GenerationRequest], on_text: TextCallback | None = None
    ) -> list[GenerationResult]: ...


class _RowLimits(StoppingCriteria):
    """Per-row max_new_tokens inside one batch (generate itself only knows one limit)."""

    def __init__(self, prompt_length: int, limits: list[int], device: torch.device):
        self.prompt_length = prompt_length
        self.limits = torch.tensor(limits, device=device)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return (input_ids.shape[1] - self.prompt_length) >= self.limits


class _BatchStreamer(BaseStreamer):
    """Streams decoded text per row of a batch (transformers' TextStreamer handles batch size 1 only)."""

    def __init__(self, generator: HFGenerator, requests: list[GenerationRequest], on_text: TextCallback):
        self.generator = generator
        self.requests = requests
        self.on_text = on_text
        self.tokens: list[list[int]] = [[] for _ in requests]
        self.sent: list[str] = ["" for _ in requests]
        self.done = [not r.stream for r in requests]
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt ids
            self.prompt_seen = True
            return
        for row, token in enumerate(value.view(-1).tolist()):
            if self.done[row]:
                continue
            if token in self.generator.eos_ids:
                self.done[row] = True
                continue
            self.tokens[row].append(token)
            if len(self.tokens[row]) >= self.requests[row].max_new_tokens:
                self.done[row] = True
            self._emit(row, final=False)

    def end(self) -> None:
        for row, request in enumerate(self.requests):
            if request.stream:
                self._emit(row, final=True)

    def _emit(self, row: int, final: bool) -> None:
        text = self.generator.decode(self.tokens[row])
        if not final and text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return
        if text.startswith(self.sent[row]) and len(text) > len(self.sent[row]):
            self.on_text(row, text[len(self.sent[row]) :])
            self.sent[row] = text


class HFGenerator:
    """Batched chat generation with a transformers causal LM, prompts rendered by the tokenizer's chat template."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        self.model = model
        self.tokenizer = ensure_chat_template(tokenizer)
        self.device = next(model.parameters()).device
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        if not eos_ids:
            raise UserError(
                f"model {model.name_or_path!r} defines no end-of-sequence token; cannot tell where a reply ends"
            )
        self.eos_ids = eos_ids
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
        self.max_context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)

    @classmethod
    def load(cls, name_or_path: str, dtype: str = "float32", device: str = "auto") -> HFGenerator:
        """Load model + tokenizer by path, Hub id or the `smollm2` alias."""
        from medusa_forge.defaults import resolve_model
        from medusa_forge.modeling import load_base_model, load_tokenizer

        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if dtype not in dtypes:
            raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(dtypes)}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        path = resolve_model(name_or_path)
        model = load_base_model(path, dtype=dtypes[dtype]).to(device)
        return cls(model, load_tokenizer(path))

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt ids exactly as training renders them: chat template text, then tokens without extra specials."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def check_fits(self, prompt_length: int, max_new_tokens: int) -> None:
        if prompt_length + max_new_tokens > self.max_context:
            raise ContextLengthError(
                f"this model's maximum context length is {self.max_context} tokens; the prompt has {prompt_length} "
                f"tokens and {max_new_tokens} new tokens were requested"
            )

    @torch.inference_mode()
    def generate_batch(
        self, requests: list[GenerationRequest], on_text: TextCallback | None = None
    ) -> list[GenerationResult]:
        """One left-padded `generate` for requests sharing sampling settings (see `GenerationRequest.sampling_key`)."""
        if len({r.sampling_key() for r in requests}) != 1:
            raise ValueError("generate_batch needs requests with one sampling setting; BatchingEngine groups them")
        first = requests[0]
        width = max(len(r.prompt_ids) for r in requests)
        input_ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(requests), width), dtype=torch.long)
        for row, request in enumerate(requests):
            n = len(request.prompt_ids)
            input_ids[row, width - n :] = torch.tensor(request.prompt_ids, dtype=torch.long)
            attention_mask[row, width - n :] = 1
        do_sample = first.temperature > 0
        config = GenerationConfig(
            max_new_tokens=max(r.max_new_tokens for r in requests),
            do_sample=do_sample,
            temperature=first.temperature if do_sample else None,
            top_p=first.top_p if do_sample else None,
            top_k=None,
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.pad_id,
        )
        if do_sample and first.seed is not None:
            torch.manual_seed(first.seed)  # applies to the whole batch: a lone request is reproducible
        streamer = _BatchStreamer(self, requests, on_text) if on_text and any(r.stream for r in requests) else None
        output = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            generation_config=config,
            stopping_criteria=[_RowLimits(width, [r.max_new_tokens for r in requests], self.device)],
            streamer=streamer,
        )
        results = []
        for row, request in enumerate(requests):
            tokens, finish = [], "length"
            for token in output[row, width:].tolist()[: request.max_new_tokens]:
                if token in self.eos_ids:
                    finish = "stop"
                    break
                tokens.append(token)
            text = streamer.sent[row] if streamer is not None and request.stream else self.decode(tokens)
            completion = len(tokens) + (finish == "stop")
            results.append(GenerationResult(text, len(request.prompt_ids), completion, finish))
        return results


@dataclass
class _Pending:
    request: GenerationRequest
    future: asyncio.Future
    on_text: Callable[[str], None] | None = None
    arrived: float = field(default_factory=time.monotonic)


class BatchingEngine:
    """Batches concurrent async requests into `Generator.generate_batch` calls, run one at a time in a thread."""

    def __init__(self, generator: Generator, max_batch_size: int = 16, batch_wait_ms: float = 5.0):
        if max_batch_size < 1:
            raise UserError(f"--max-batch-size must be at least 1, got {max_batch_size}")
        self.generator = generator
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task | None = None
        self.batch_sizes: list[int] = []  # one entry per generate call (tests and the benchmark read it)

    @property
    def batches_run(self) -> int:
        return len(self.batch_sizes)

    def stats(self) -> dict:
        return {
            "batching": "static",
            "generate_calls": len(self.batch_sizes),
            "requests_generated": sum(self.batch_sizes),
        }

    async def submit(
        self, request: GenerationRequest, on_text: Callable[[str], None] | None = None
    ) -> GenerationResult:
        """Queue one request; `on_text` (streaming) receives text deltas on the event loop."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._run())
        pending = _Pending(request, loop.create_future(), on_text)
        await self._queue.put(pending)
        return await pending.future

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None

    async def _collect(self) -> list[_Pending]:
        """Wait for a request, then keep gathering while more keep coming (each one within `batch_wait` of the
        last, at most 10 x `batch_wait` in all): a burst of clients lands in one batch, a lone one waits little."""
        pending = [await self._queue.get()]
        hard_deadline = time.monotonic() + 10 * self.batch_wait_s
        while True:
            while not self._queue.empty():
                pending.append(self._queue.get_nowait())
            remaining = min(self.batch_wait_s, hard_deadline - time.monotonic())
            if remaining <= 0 or len(pending) >= self.max_batch_size:
                return pending
            try:
                pending.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                return pending

    def _plan(self, pending: list[_Pending]) -> list[list[_Pending]]:
        """Group by sampling settings, then cut each group sorted by prompt length into batches."""
        groups: dict[tuple, list[_Pending]] = {}
        for item in pending:
            groups.setdefault(item.request.sampling_key(), []).append(item)
        batches = []
        for group in groups.values():
            group.sort(key=lambda item: len(item.request.prompt_ids))
            batches += [group[i : i + self.max_batch_size] for i in range(0, len(group), self.max_batch_size)]
        batches.sort(key=lambda batch: min(item.arrived for item in batch))  # oldest first
        return batches

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            for batch in self._plan(await self._collect()):
                batch = [item for item in batch if not item.future.cancelled()]
                if not batch:
                    continue

                def on_text(row: int, text: str, batch=batch) -> None:
                    callback = batch[row].on_text
                    if callback is not None:
                        loop.call_soon_threadsafe(callback, text)

                try:
                    results = await asyncio.to_thread(
                        self.generator.generate_batch, [item.request for item in batch], on_text
                    )
                except Exception as err:  # one failing batch must not kill the worker for everybody else
                    logger.exception("generation failed for a batch of %d requests", len(batch))
                    for item in batch:
                        if not item.future.done():
                            item.future.set_exception(err)
                    continue
                self.batch_sizes.append(len(batch))
                for item, result in zip(batch, results, strict=True):
                    if not item.future.done():
                        item.future.set_result(result)
