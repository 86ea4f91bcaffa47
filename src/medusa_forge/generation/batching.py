"""The engine for a generator: continuous batching where the model allows it, else static batching; requests to a
decoder that runs one sequence at a time (a draft) take turns step by step."""

from __future__ import annotations

from medusa_forge.errors import UserError
from medusa_forge.generation.continuous import ContinuousEngine
from medusa_forge.generation.generator import Generator, SteppedGenerator
from medusa_forge.generation.hf import HFGenerator
from medusa_forge.generation.interleaved import InterleavedEngine
from medusa_forge.generation.static import BatchingEngine

BATCHING_MODES = ("auto", "continuous", "static")


def check_batching(batching: str, draft: bool = False) -> None:
    """UserError unless `batching` is a mode the engines know; with a draft (a `SteppedGenerator`) only auto."""
    if batching not in BATCHING_MODES:
        raise UserError(f"--batching {batching!r}: choose one of {', '.join(BATCHING_MODES)}")
    if draft and batching != "auto":
        raise UserError(
            f"--batching {batching}: with a draft, requests take turns step by step (one sequence per forward "
            f"pass); leave --batching at auto"
        )


def make_engine(
    generator: Generator | SteppedGenerator,
    batching: str = "auto",
    max_batch_size: int = 16,
    batch_wait_ms: float = 25.0,
) -> ContinuousEngine | BatchingEngine | InterleavedEngine:
    """The engine for `generator`: continuous batching where the model supports it (`auto`), else static.

    A `SteppedGenerator` (decoding with a draft) gets the `InterleavedEngine`; other generators than `HFGenerator`
    get the static `BatchingEngine`, which calls their own `generate_batch`."""
    check_batching(batching, draft=hasattr(generator, "steps"))
    if max_batch_size < 1:
        raise UserError(f"the batch size must be at least 1, got {max_batch_size}")
    if hasattr(generator, "steps"):
        return InterleavedEngine(generator, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms)
    # Exactly HF generation: a subclass with its own generate_batch (another decoder) must not be bypassed.
    plain = isinstance(generator, HFGenerator) and type(generator).generate_batch is HFGenerator.generate_batch
    if batching != "static" and plain:
        if ContinuousEngine.supports(generator):
            return ContinuousEngine(generator, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms)
        if batching == "continuous":
            raise UserError(
                f"--batching continuous: model {generator.model.name_or_path!r} has a cache layout that cannot be "
                f"merged row by row (sliding window, quantised or encoder-decoder); use --batching static"
            )
    elif batching == "continuous":
        raise UserError("--batching continuous works with the plain in-process model only")
    return BatchingEngine(generator, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms)
