"""What a decoder is to the engines: requests in, completions out, and the context-length check.

`Generator` is synchronous: it turns a list of `GenerationRequest`s into `Completion`s, calling `on_text` with
text deltas for requests that stream. The engines (`static`, `continuous`) make it asynchronous and batched.
A `SteppedGenerator` runs one request a step at a time instead; the `interleaved` engine takes turns over them.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Generator as Steps
from dataclasses import dataclass
from typing import Protocol

from transformers import PretrainedConfig

# on_text(index of the request in the batch, new text): called from the generation thread.
TextCallback = Callable[[int, str], None]


class ContextLengthError(ValueError):
    """The prompt plus the requested new tokens do not fit the model's context window."""


# Temperatures below this decode greedily (as vLLM does): dividing logits by, say, 1e-300 overflows to inf/nan.
GREEDY_BELOW = 1e-5


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stream: bool = False

    def __post_init__(self) -> None:
        if self.temperature < GREEDY_BELOW:
            self.temperature = 0.0

    def sampling_key(self) -> tuple:
        """Requests with equal keys can share one `generate` call."""
        if self.temperature <= 0:
            return ("greedy",)
        return ("sample", round(self.temperature, 6), round(self.top_p, 6))


@dataclass
class Completion:
    """One request's reply: its text, token counts and why it ended."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end-of-turn token) or "length" (max_new_tokens reached)


class Generator(Protocol):
    """What the engines, `serve` and the in-process distill backend need from a decoder."""

    max_context: int

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]: ...

    def check_fits(self, prompt_length: int, max_new_tokens: int) -> None: ...  # raises ContextLengthError

    def generate_batch(
        self, requests: list[GenerationRequest], on_text: TextCallback | None = None
    ) -> list[Completion]: ...


class SteppedGenerator(Protocol):
    """A decoder that runs one request at a time (e.g. a draft's tree verification): `steps` lets the
    `interleaved` engine advance concurrent requests in turns instead of batching them."""

    max_context: int

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]: ...

    def check_fits(self, prompt_length: int, max_new_tokens: int) -> None: ...  # raises ContextLengthError

    def steps(self, request: GenerationRequest, on_text: Callable[[str], None] | None) -> Steps[int, None, Completion]:
        """One decoding step per `next()`, yielding the tokens generated so far; returns the `Completion`.
        `on_text` receives text deltas of a streamed request."""
        ...


def context_length(config: PretrainedConfig) -> int:
    """The model's context window in tokens; unbounded (2**30) when its config does not say."""
    return int(getattr(config, "max_position_embeddings", 0) or 1 << 30)


def check_context(
    prompt_length: int, max_new_tokens: int, max_context: int, limit: str = "this model's maximum context length"
) -> None:
    """Raise `ContextLengthError` when the prompt plus `max_new_tokens` exceed `max_context`; `limit` names it."""
    if prompt_length + max_new_tokens > max_context:
        raise ContextLengthError(
            f"{limit} is {max_context} tokens; the prompt has {prompt_length} tokens and {max_new_tokens} new "
            f"tokens were requested"
        )
