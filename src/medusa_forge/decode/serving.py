"""Speculative decoding with a draft (Medusa heads or EAGLE-3) behind `medusa-forge serve --draft DIR`: the
`generation.generator.SteppedGenerator` protocol, one sequence per forward pass (each accepts a different number of
tokens per step); the server's `InterleavedEngine` advances concurrent requests a step each in turn."""

from __future__ import annotations

import logging
from collections.abc import Callable
from collections.abc import Generator as Steps
from dataclasses import dataclass

from medusa_forge.decode.generation import DecodeResult, SpeculativeDecoder
from medusa_forge.decode.loading import load_draft
from medusa_forge.decode.tree import resolve_tree
from medusa_forge.generation.generator import Completion, GenerationRequest, check_context, context_length
from medusa_forge.generation.text import StreamedText, decode_text, encode_chat, eos_token_ids
from medusa_forge.modeling import TargetPlacement

logger = logging.getLogger("medusa_forge.serve")


@dataclass
class DraftCompletion(Completion):
    """The server's completion plus what a draft adds: tokens per verification step, reported in `usage`."""

    accepted_tokens_per_step: float = 0.0


class DraftServeGenerator:
    """Chat generation with a draft (Medusa heads or EAGLE-3); greedy requests give exactly the base model's
    greedy text."""

    def __init__(self, decoder: SpeculativeDecoder, tokenizer, eos_ids: set[int], base_name: str) -> None:
        self.decoder = decoder
        self.base_name = base_name  # the base it decodes for (the draft's own unless --model): the served name
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        # The tree's candidate tokens sit after the prefix: the last `depth` positions are kept free for them.
        self.max_context = context_length(decoder.base.config) - decoder.tree.depth

    @classmethod
    def load(
        cls,
        draft_dir: str,
        base_model: str | None = None,
        dtype: str = "float32",
        device: str = "auto",
        tree=None,
        placement: TargetPlacement | None = None,
    ) -> DraftServeGenerator:
        loaded = load_draft(draft_dir, base_model, dtype, device, placement=placement)
        decoder = loaded.decoder(resolve_tree(tree, draft_dir, loaded.max_depth))
        logger.info("%s decoding with a tree of %d nodes", loaded.kind.label, decoder.tree.size - 1)
        return cls(decoder, loaded.tokenizer, eos_token_ids(loaded.base, loaded.tokenizer), loaded.draft.base_name)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return encode_chat(self.tokenizer, messages)

    def check_fits(self, prompt_length: int, max_new_tokens: int) -> None:
        limit = "with a draft this model's maximum context length"
        check_context(prompt_length, max_new_tokens, self.max_context, limit)

    def steps(
        self, request: GenerationRequest, on_text: Callable[[str], None] | None = None
    ) -> Steps[int, None, DraftCompletion]:
        """One verification step per `next()` (the first is the prefill), yielding the tokens so far; returns the
        completion. The decoder's state lives in this generator, so several requests can be advanced in turns."""
        result = DecodeResult([])
        streamed = StreamedText(self.tokenizer) if on_text is not None and request.stream else None
        for _ in self.decoder.stream(
            request.prompt_ids,
            request.max_new_tokens,
            eos_token_ids=self.eos_ids,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            result=result,
        ):
            if streamed is not None and (delta := streamed.update([t for t in result.tokens if t not in self.eos_ids])):
                on_text(delta)
            yield len(result.tokens)
        finish = "stop" if result.tokens and result.tokens[-1] in self.eos_ids else "length"
        tokens = result.tokens[:-1] if finish == "stop" else result.tokens
        text = decode_text(self.tokenizer, tokens)
        if streamed is not None and (delta := streamed.update(tokens, final=True)):
            on_text(delta)
        # Tokens per verification pass, as `generate` and `eval` report it (a one-token reply had none: 1.0).
        accepted = result.mean_accept_length or 1.0
        return DraftCompletion(text, len(request.prompt_ids), len(result.tokens), finish, accepted)
