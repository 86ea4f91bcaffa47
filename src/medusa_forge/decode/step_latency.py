"""How long one decoding step takes on this machine, per tree: what the tree choice in `eval` weighs against the
accepted length, and what bench/decode_speed.py breaks down by part."""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from medusa_forge.decode.generation import STEP_PARTS, DecodeState, SpeculativeDecoder
from medusa_forge.formats.tree_file import Choices


def plain_step(decoder: SpeculativeDecoder, state: DecodeState, mark: Callable[[str], None]) -> int:
    """One plain greedy step, the reference a tree must beat: the root through the base model ("verify") and its
    lm_head ("accept"). Only its time matters: `state` is left as it is apart from the root's KV entry. No mask is
    passed, so transformers runs its own one-token step (on a GPU an explicit mask would take SDPA off its fastest
    kernel and copy the grouped key/value heads, making the reference slower than plain decoding is)."""
    verifier = decoder.verifier
    positions = torch.tensor([state.prefix_length], device=verifier.device)
    hidden, _ = verifier.forward(torch.tensor([state.root], device=verifier.device), positions, None, state.cache)
    mark("verify")
    token = int(verifier.lm_head(hidden[-1]).argmax())
    mark("accept")
    return token


class Stopwatch:
    """A `mark` hook: call it with a part's name as that part ends; `seconds()` gives each part's seconds since
    the previous mark (or since the stopwatch was made). On a CUDA device the marks are CUDA events on the
    device's current stream: kernels run after the host queues them, so host clocks would credit a part's GPU
    work to whichever later part first waits for a result. `seconds()` waits for the last event."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.marks: list[tuple[str, Any]] = [("", self._now())]

    def _now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def __call__(self, part: str) -> None:
        self.marks.append((part, self._now()))

    def seconds(self) -> dict[str, float]:
        if self.cuda:
            self.marks[-1][1].synchronize()
        pairs = itertools.pairwise(self.marks)
        if self.cuda:  # elapsed_time is in milliseconds
            return {part: start.elapsed_time(end) / 1000 for (_, start), (part, end) in pairs}
        return {part: end - start for (_, start), (part, end) in pairs}


DecoderFactory = Callable[[Choices], SpeculativeDecoder]  # a decoder for a tree (checks skipped: timing only)
# What one timing measures: a decoder factory (a draft in some dtype) and a tree, or None for one plain greedy step.
Case = tuple[DecoderFactory, Choices | None]


@torch.no_grad()
def time_step_parts(cases: list[Case], prefix_length: int = 256, repeats: int = 5) -> list[list[dict[str, float]]]:
    """Seconds of each of STEP_PARTS of `repeats` steps per case, after `prefix_length` cached tokens (a random
    prompt). A `None` tree times one `plain_step` instead. Every step starts from the same cache length, and the
    cases are timed round-robin, so a burst of load from other processes, or a machine that drifts faster or
    slower, hits every tree and every dtype alike; on a GPU the parts are timed with CUDA events (`Stopwatch`).
    A factory makes the decoder of a tree, whatever its drafter and dtype (`LoadedDraft.decoder` with
    check=False, e.g.)."""
    decoders = [make(tree or [[0]]) for make, tree in cases]
    vocab = decoders[0].verifier.lm_head.weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, vocab, (prefix_length,), generator=gen)
    states = [decoder.prefill(prefix.to(decoder.device)) for decoder in decoders]
    timings: list[list[dict[str, float]]] = [[] for _ in cases]
    for _ in range(repeats + 1):  # the first round warms up and is dropped
        for (_, choices), decoder, state, steps in zip(cases, decoders, states, timings, strict=True):
            mark = Stopwatch(decoder.device)
            if choices:
                kept = len(decoder.step(state, mark=mark))
            else:
                plain_step(decoder, state, mark)
                kept = 1
            steps.append(dict.fromkeys(STEP_PARTS, 0.0) | mark.seconds())
            state.cache.crop(-kept)
            state.prefix_length = prefix_length
    return [steps[1:] for steps in timings]


def measure_step_seconds(cases: list[Case], prefix_length: int = 256, repeats: int = 5) -> list[float]:
    """Median wall time of one decoding step per case (see `time_step_parts`): the drafter's proposal, the tree
    forward, lm_head and acceptance, cache pruning and the drafter's update. A `None` tree: one plain greedy step."""
    timings = time_step_parts(cases, prefix_length, repeats)
    return [statistics.median(sum(parts.values()) for parts in steps) for steps in timings]


def measure_plain_and_trees(
    factories: dict[str, DecoderFactory], trees: list[Choices], prefix_length: int = 256, repeats: int = 5
) -> dict[str, tuple[float, list[float]]]:
    """Per factory (a draft in some dtype, say): (plain step seconds, each tree's step seconds), every one of them
    timed in one round-robin, so the machine's drift between factories cannot decide between them."""
    cases = [(make, tree) for make in factories.values() for tree in [None, *trees]]
    seconds = measure_step_seconds(cases, prefix_length, repeats)
    width = len(trees) + 1
    return {key: (seconds[i * width], seconds[i * width + 1 : (i + 1) * width]) for i, key in enumerate(factories)}
