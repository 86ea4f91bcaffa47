"""Static batching: concurrent requests grouped into `Generator.generate_batch` calls.

`BatchingEngine` collects requests that arrive within a few milliseconds of each other, groups those with the
same sampling settings and similar prompt lengths, and runs each group as one batch in a worker thread, so
concurrent clients (or concurrent conversations) share forward passes. Each batch runs until its longest reply.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from medusa_forge.errors import UserError
from medusa_forge.generation.generator import Completion, GenerationRequest, Generator

logger = logging.getLogger(__name__)


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
        self.requests_cancelled = 0  # dropped before their batch started because their caller went away

    @property
    def batches_run(self) -> int:
        return len(self.batch_sizes)

    def stats(self) -> dict:
        return {
            "batching": "static",
            "generate_calls": len(self.batch_sizes),
            "requests_generated": sum(self.batch_sizes),
            "requests_cancelled": self.requests_cancelled,
        }

    async def submit(self, request: GenerationRequest, on_text: Callable[[str], None] | None = None) -> Completion:
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
        while True:
            for batch in self._plan(await self._collect()):
                live = [item for item in batch if not item.future.cancelled()]
                self.requests_cancelled += len(batch) - len(live)
                if live:
                    await self._generate(live)

    async def _generate(self, batch: list[_Pending]) -> None:
        """One `generate_batch` call. If it fails for several requests, each one that has not streamed text yet
        runs again alone, so that an error ends only the request that raised it."""
        loop = asyncio.get_running_loop()
        streamed: set[int] = set()

        def on_text(row: int, text: str) -> None:
            streamed.add(row)
            callback = batch[row].on_text
            if callback is not None:
                loop.call_soon_threadsafe(callback, text)

        try:
            results = await asyncio.to_thread(self.generator.generate_batch, [item.request for item in batch], on_text)
        except Exception as err:  # the worker keeps serving everybody else
            if len(batch) == 1:
                logger.exception("generation failed for one request")
            else:
                logger.warning("generation failed for a batch of %d requests (%s): each alone now", len(batch), err)
            for row, item in enumerate(batch):
                if item.future.done():  # its caller went away
                    continue
                if len(batch) > 1 and row not in streamed:
                    await self._generate([item])
                else:
                    item.future.set_exception(err)
            return
        self.batch_sizes.append(len(batch))
        for item, result in zip(batch, results, strict=True):
            if not item.future.done():
                item.future.set_result(result)
