"""Continuous batching for in-process generation: requests join and leave the running batch between steps.

`BatchingEngine` runs each batch until its longest reply: rows that finished early still cost compute, and a
conversation's next turn waits for the whole batch. Here one thread runs a decode loop over the active rows;
a finished row leaves at once (its caller gets the reply and can send its next turn) and waiting requests are
prefilled and merged into the running batch's KV cache with left padding. Sampling is per row (own temperature,
top-p and seeded torch.Generator), so a seeded request is reproducible whatever else shares the batch.

Works with models whose cache is a `DynamicCache` of plain full-attention layers (Llama, Qwen2, Mistral without
sliding window, GPT-2, ...); `ContinuousEngine.supports` tells, and callers fall back to `BatchingEngine`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from medusa_forge.generation.generator import Completion
from medusa_forge.generation.hf import HFGenerator
from medusa_forge.generation.sampling import pick_token
from medusa_forge.generation.text import StreamedText, decode_text
from medusa_forge.generation.worker import Ticket, WorkerEngine
from medusa_forge.modeling import cache_kwarg, returned_cache

logger = logging.getLogger(__name__)


@dataclass
class _Row(Ticket):
    rng: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    position: int = 0  # position id of the next token fed to the model
    streamed: StreamedText | None = None  # set for rows with `on_text`


def _choose_tokens(logits: torch.Tensor, rows: list[_Row]) -> list[int]:
    """Greedy rows take the argmax (as `generate(do_sample=False)`); sampling rows use their own settings."""
    chosen = logits.argmax(dim=-1).tolist()
    for index, row in enumerate(rows):
        request = row.request
        if request.temperature > 0:
            chosen[index] = pick_token(logits[index], request.temperature, request.top_p, row.rng)
    return chosen


class ContinuousEngine(WorkerEngine):
    """Same `submit` interface as `BatchingEngine`; one background thread owns the model."""

    def __init__(self, generator: HFGenerator, max_batch_size: int = 16, batch_wait_ms: float = 25.0):
        super().__init__(max_batch_size, batch_wait_ms)
        self.generator = generator
        self.model = generator.model
        self.cache_kwarg = cache_kwarg(self.model)
        self.step_sizes: list[int] = []  # rows in each decode step (tests and the benchmark read it)

    def stats(self) -> dict:
        steps = self.step_sizes
        return {
            "batching": "continuous",
            "decode_steps": len(steps),
            "rows_decoded": sum(steps),
            "requests_cancelled": self.requests_cancelled,
        }

    @staticmethod
    def supports(generator: HFGenerator) -> bool:
        """True when the model's cache is made of plain growing full-attention layers we can merge and slice."""
        if generator.model.config.is_encoder_decoder:
            return False
        try:
            with torch.inference_mode():
                ids = torch.tensor([[generator.pad_id, generator.pad_id]], device=generator.device)
                out = generator.model(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    use_cache=True,
                    **{cache_kwarg(generator.model): DynamicCache(config=generator.model.config)},
                )
        except Exception as err:  # any model that cannot take an explicit DynamicCache
            logger.info("continuous batching unavailable: %s", err)
            return False
        cache = returned_cache(out)
        return isinstance(cache, DynamicCache) and all(type(layer) is DynamicLayer for layer in cache.layers)

    def _ticket(self, request, settle, on_text, is_cancelled) -> _Row:
        streamed = StreamedText(self.generator.tokenizer) if on_text else None
        return _Row(request, settle, on_text, is_cancelled, streamed=streamed)

    # --- decode thread ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def _loop(self) -> None:
        rows: list[_Row] = []
        cache: DynamicCache | None = None
        mask: torch.Tensor | None = None
        while not self._stop.is_set():
            new = self._take_new(len(rows))
            if new:
                rows, cache, mask = self._admit_each(rows, cache, mask, new)
            if not rows:
                continue
            try:
                rows, cache, mask = self._step(rows, cache, mask)
            except Exception as err:  # one forward pass for all rows: fail them, keep serving later requests
                logger.exception("a decode step failed for %d requests", len(rows))
                for row in rows:
                    row.settle(err)
                rows, cache, mask = [], None, None

    def _admit_each(self, rows, cache, mask, new: list[_Row]):
        """Prefill the new requests together, or one by one when that fails, so that an error ends only the request
        that raised it; then merge what was prefilled into the running batch (untouched until then)."""
        try:
            prefilled = [self._prefill(new)]
        except Exception as err:
            if len(new) == 1:
                logger.exception("could not start a request")
                new[0].settle(err)
                return rows, cache, mask
            prefilled = []
            for row in new:
                try:
                    prefilled.append(self._prefill([row]))
                except Exception as own:
                    logger.exception("could not start a request")
                    row.settle(own)
        for part in prefilled:
            rows, cache, mask = self._admit(rows, cache, mask, *part)
        return rows, cache, mask

    def _prefill(self, new: list[_Row]):
        """Run the new requests' prompts (left-padded together) on a fresh cache and choose their first tokens."""
        device = self.generator.device
        for row in new:
            if row.request.seed is not None and row.request.temperature > 0:
                row.rng = torch.Generator(device=device).manual_seed(row.request.seed)
        width = max(len(row.request.prompt_ids) for row in new)
        input_ids = torch.full((len(new), width), self.generator.pad_id, dtype=torch.long)
        new_mask = torch.zeros((len(new), width), dtype=torch.long)
        for index, row in enumerate(new):
            n = len(row.request.prompt_ids)
            input_ids[index, width - n :] = torch.tensor(row.request.prompt_ids)
            new_mask[index, width - n :] = 1
            row.position = n
        input_ids, new_mask = input_ids.to(device), new_mask.to(device)
        positions = (new_mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=input_ids,
            attention_mask=new_mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_kwarg: DynamicCache(config=self.model.config)},
        )
        return new, returned_cache(out), new_mask, _choose_tokens(out.logits[:, -1, :], new)

    def _admit(self, rows, cache, mask, new: list[_Row], new_cache: DynamicCache, new_mask, first: list[int]):
        """Merge prefilled requests into the running batch."""
        if cache is None:
            cache, mask = new_cache, new_mask
        else:
            cache, mask = self._merge(cache, mask, new_cache, new_mask)
        rows = rows + new
        # New rows got their first token from the prefill; older rows keep the token they are waiting to feed.
        pending = [None] * (len(rows) - len(new)) + first
        return self._record(rows, cache, mask, pending)

    @staticmethod
    def _merge(cache: DynamicCache, mask: torch.Tensor, other: DynamicCache, other_mask: torch.Tensor):
        length, other_length = mask.shape[1], other_mask.shape[1]
        target = max(length, other_length)

        def left_pad(tensor: torch.Tensor, missing: int, dim: int) -> torch.Tensor:
            if missing == 0:
                return tensor
            shape = list(tensor.shape)
            shape[dim] = missing
            return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)

        for layer, other_layer in zip(cache.layers, other.layers, strict=True):
            layer.keys = torch.cat(
                [left_pad(layer.keys, target - length, -2), left_pad(other_layer.keys, target - other_length, -2)]
            )
            layer.values = torch.cat(
                [left_pad(layer.values, target - length, -2), left_pad(other_layer.values, target - other_length, -2)]
            )
        merged_mask = torch.cat([left_pad(mask, target - length, 1), left_pad(other_mask, target - other_length, 1)])
        return cache, merged_mask

    def _step(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor):
        """Feed every row its last token; one forward pass for the whole batch."""
        device = self.generator.device
        self.step_sizes.append(len(rows))
        input_ids = torch.tensor([[row.tokens[-1]] for row in rows], device=device)
        positions = torch.tensor([[row.position] for row in rows], device=device)
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
        cached = {self.cache_kwarg: cache}
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **cached)
        for row in rows:
            row.position += 1
        return self._record(rows, returned_cache(out), mask, _choose_tokens(out.logits[:, -1, :], rows))

    def _record(self, rows: list[_Row], cache, mask, chosen: list[int | None]):
        """Append each row's new token; settle and drop rows that finished (or whose caller went away)."""
        keep = []
        for index, (row, token) in enumerate(zip(rows, chosen, strict=True)):
            if token is None:  # an older row during an admission: nothing new yet
                keep.append(index)
                continue
            if token in self.generator.eos_ids:
                self._finish(row, "stop")
                continue
            row.tokens.append(token)
            if row.on_text is not None:
                self._emit(row, final=False)
            if len(row.tokens) >= row.request.max_new_tokens:
                self._finish(row, "length")
            elif row.is_cancelled():
                self._cancelled(len(row.tokens))
            else:
                keep.append(index)
        if len(keep) == len(rows):
            return rows, cache, mask
        if not keep:
            return [], None, None
        index = torch.tensor(keep, device=mask.device)
        mask = mask[index]
        start = int((mask.cumsum(-1) == 0).sum(-1).min())  # columns that are padding for every kept row
        for layer in cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]
        return [rows[i] for i in keep], cache, mask[:, start:]

    def _emit(self, row: _Row, final: bool) -> None:
        if delta := row.streamed.update(row.tokens, final):
            row.on_text(delta)

    def _finish(self, row: _Row, finish_reason: str) -> None:
        if row.on_text is not None:
            self._emit(row, final=True)
            text = row.streamed.sent
        else:
            text = decode_text(self.generator.tokenizer, row.tokens)
        completion = len(row.tokens) + (finish_reason == "stop")
        row.settle(Completion(text, len(row.request.prompt_ids), completion, finish_reason))
