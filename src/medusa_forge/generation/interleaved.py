"""Requests that cannot share a forward pass take turns step by step (speculative decoding with a draft).

A draft's tree verification runs one sequence at a time (each accepts a different number of tokens per step), so
requests cannot be batched as `continuous` does. Running each to its end would make a short request wait for a
long one: `InterleavedEngine` instead keeps up to `max_batch_size` requests started (each with its own KV cache)
and advances each by one step in turn. A request's wait is then its own steps times the number of requests
running, never another request's whole length; requests beyond `max_batch_size` wait in arrival order. A
request whose caller went away stops at its next turn, and an error in one request's step ends that request only.
"""

from __future__ import annotations

import logging
from collections.abc import Generator as Steps

import torch

from medusa_forge.generation.generator import Completion, SteppedGenerator
from medusa_forge.generation.worker import Ticket, WorkerEngine

logger = logging.getLogger(__name__)


class InterleavedEngine(WorkerEngine):
    """Round-robin, one step per request per turn, over a `SteppedGenerator`; one background thread."""

    def __init__(self, generator: SteppedGenerator, max_batch_size: int = 16, batch_wait_ms: float = 25.0):
        super().__init__(max_batch_size, batch_wait_ms)
        self.generator = generator
        self.decode_steps = 0

    def stats(self) -> dict:
        return {
            "batching": "interleaved",
            "decode_steps": self.decode_steps,
            "requests_cancelled": self.requests_cancelled,
        }

    @torch.inference_mode()
    def _loop(self) -> None:
        running: list[tuple[Ticket, Steps[int, None, Completion], int]] = []  # ticket, its steps, tokens so far
        while not self._stop.is_set():
            for ticket in self._take_new(len(running)):
                running.append((ticket, self.generator.steps(ticket.request, ticket.on_text), 0))
            still = []
            for ticket, steps, tokens in running:
                if ticket.is_cancelled():
                    steps.close()
                    self._cancelled(tokens)
                    continue
                try:
                    tokens = next(steps)
                except StopIteration as done:
                    ticket.settle(done.value)
                    continue
                except Exception as err:  # this request's error: the others carry on
                    logger.exception("generation failed for one request")
                    ticket.settle(err)
                    continue
                self.decode_steps += 1
                still.append((ticket, steps, tokens))
            running = still
