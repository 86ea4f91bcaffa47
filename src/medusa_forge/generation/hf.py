"""`HFGenerator`: a transformers causal LM as a `Generator`, one left-padded `model.generate` per batch."""

from __future__ import annotations

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from medusa_forge.data.tokenize import ensure_chat_template
from medusa_forge.errors import UserError
from medusa_forge.generation.device import pack_linear_weights, resolve_device, resolve_dtype
from medusa_forge.generation.generator import (
    Completion,
    GenerationRequest,
    TextCallback,
    check_context,
    context_length,
)
from medusa_forge.generation.text import StreamedText, decode_text, encode_chat, eos_token_ids


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
        self.texts = [StreamedText(generator.tokenizer) for _ in requests]
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
        if delta := self.texts[row].update(self.tokens[row], final):
            self.on_text(row, delta)


class HFGenerator:
    """Batched chat generation with a transformers causal LM, prompts rendered by the tokenizer's chat template."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        self.model = model
        self.tokenizer = ensure_chat_template(tokenizer)
        self.device = next(model.parameters()).device
        eos_ids = eos_token_ids(model, tokenizer)
        if not eos_ids:
            raise UserError(
                f"model {model.name_or_path!r} defines no end-of-sequence token; cannot tell where a reply ends"
            )
        self.eos_ids = eos_ids
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
        self.max_context = context_length(model.config)

    @classmethod
    def load(cls, name_or_path: str, dtype: str = "float32", device: str = "auto") -> HFGenerator:
        """Load model + tokenizer by path, Hub id or the `smollm2` alias."""
        from medusa_forge.defaults import resolve_model
        from medusa_forge.modeling import load_base_model, load_tokenizer

        torch_dtype = resolve_dtype(dtype)
        torch_device = resolve_device(device)
        path = resolve_model(name_or_path)
        model = load_base_model(path, dtype=torch_dtype).to(torch_device)
        pack_linear_weights(model)  # on a CPU: faster products (see there)
        return cls(model, load_tokenizer(path))

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return encode_chat(self.tokenizer, messages)

    def check_fits(self, prompt_length: int, max_new_tokens: int) -> None:
        check_context(prompt_length, max_new_tokens, self.max_context)

    @torch.inference_mode()
    def generate_batch(
        self, requests: list[GenerationRequest], on_text: TextCallback | None = None
    ) -> list[Completion]:
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
            if streamer is not None and request.stream:
                text = streamer.texts[row].sent
            else:
                text = decode_text(self.tokenizer, tokens)
            completion = len(tokens) + (finish == "stop")
            results.append(Completion(text, len(request.prompt_ids), completion, finish))
        return results
