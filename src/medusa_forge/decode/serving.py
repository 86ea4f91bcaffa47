"""Medusa decoding behind `medusa-forge serve --heads DIR`: the `distill.engine.Generator` protocol, one
request at a time (batch size 1: each sequence accepts a different number of tokens per step)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from medusa_forge.decode.generation import DecodeResult, MedusaDecoder
from medusa_forge.decode.loading import eos_token_ids, load_medusa
from medusa_forge.decode.tree import resolve_tree
from medusa_forge.distill.engine import ContextLengthError, GenerationRequest, GenerationResult, TextCallback

logger = logging.getLogger("medusa_forge.serve")


@dataclass
class MedusaGenerationResult(GenerationResult):
    """The server's result plus what Medusa adds: tokens per verification step, reported in `usage`."""

    accepted_tokens_per_step: float = 0.0


class MedusaServeGenerator:
    """Chat generation with Medusa heads; greedy requests give exactly the base model's greedy text."""

    def __init__(self, decoder: MedusaDecoder, tokenizer, eos_ids: set[int]) -> None:
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        config = decoder.base.config
        self.max_context = int(getattr(config, "max_position_embeddings", 0) or 1 << 30) - decoder.tree.depth
        self._warned_top_p = False

    @classmethod
    def load(
        cls, heads_dir: str, base_model: str | None = None, dtype: str = "float32", device: str = "auto", tree=None
    ) -> MedusaServeGenerator:
        model, tokenizer = load_medusa(heads_dir, base_model, dtype, device)
        decoder = MedusaDecoder(model, resolve_tree(tree, heads_dir, len(model.heads)))
        logger.info("Medusa decoding with %d heads and a tree of %d nodes", len(model.heads), decoder.tree.size - 1)
        return cls(decoder, tokenizer, eos_token_ids(model, tokenizer))

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def check_fits(self, prompt_length: int, max_new_tokens: int) -> None:
        if prompt_length + max_new_tokens > self.max_context:
            raise ContextLengthError(
                f"with Medusa heads this model's maximum context length is {self.max_context} tokens; the prompt has "
                f"{prompt_length} tokens and {max_new_tokens} new tokens were requested"
            )

    @torch.inference_mode()
    def generate_batch(
        self, requests: list[GenerationRequest], on_text: TextCallback | None = None
    ) -> list[MedusaGenerationResult]:
        return [self._generate_one(row, request, on_text) for row, request in enumerate(requests)]

    def _generate_one(
        self, row: int, request: GenerationRequest, on_text: TextCallback | None
    ) -> MedusaGenerationResult:
        if request.temperature > 0 and request.top_p < 1 and not self._warned_top_p:
            logger.warning("top_p is ignored with Medusa heads: sampling uses typical acceptance at the temperature")
            self._warned_top_p = True
        result = DecodeResult([])
        sent = ""
        for _ in self.decoder.stream(
            request.prompt_ids,
            request.max_new_tokens,
            eos_token_ids=self.eos_ids,
            temperature=request.temperature,
            seed=request.seed,
            result=result,
        ):
            if on_text is not None and request.stream:
                text = self.decode([t for t in result.tokens if t not in self.eos_ids])
                if not text.endswith("\ufffd") and text.startswith(sent) and len(text) > len(sent):
                    on_text(row, text[len(sent) :])
                    sent = text
        finish = "stop" if result.tokens and result.tokens[-1] in self.eos_ids else "length"
        tokens = result.tokens[:-1] if finish == "stop" else result.tokens
        text = self.decode(tokens)
        if on_text is not None and request.stream and text.startswith(sent) and len(text) > len(sent):
            on_text(row, text[len(sent) :])
        # Tokens per verification pass, as `generate` and `eval` report it (a one-token reply had none: 1.0).
        accepted = result.mean_accept_length or 1.0
        return MedusaGenerationResult(text, len(request.prompt_ids), len(result.tokens), finish, accepted)
