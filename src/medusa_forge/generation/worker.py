"""The asynchronous front of the engines whose one background thread owns the model (`continuous`, `interleaved`).

`submit` queues a `Ticket` and awaits its completion; the thread takes tickets from the inbox between steps. A
caller that goes away (a client disconnected, so the awaiting task was cancelled) cancels its future: the thread
sees `is_cancelled()` at the next step, stops that request and counts it in `requests_cancelled`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from medusa_forge.generation.generator import Completion, GenerationRequest

logger = logging.getLogger(__name__)


@dataclass
class Ticket:
    """One submitted request as the worker thread sees it; `settle` and `on_text` are safe to call from it."""

    request: GenerationRequest
    settle: Callable[[Completion | BaseException], None]
    on_text: Callable[[str], None] | None
    is_cancelled: Callable[[], bool]


class WorkerEngine:
    """`submit` / `close` / `stats` for an engine whose `_loop` runs in one background thread."""

    def __init__(self, max_batch_size: int = 16, batch_wait_ms: float = 25.0):
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000
        self.requests_cancelled = 0  # stopped because their caller went away
        self._inbox: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _ticket(self, request: GenerationRequest, settle, on_text, is_cancelled) -> Ticket:
        return Ticket(request, settle, on_text, is_cancelled)

    def _loop(self) -> None:
        raise NotImplementedError

    async def submit(self, request: GenerationRequest, on_text: Callable[[str], None] | None = None) -> Completion:
        """Queue one request; `on_text` (streaming) receives text deltas on the event loop."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def settle_on_loop(outcome) -> None:
            if future.done():
                return
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

        def settle(outcome) -> None:
            loop.call_soon_threadsafe(settle_on_loop, outcome)

        text = (lambda delta: loop.call_soon_threadsafe(on_text, delta)) if on_text else None
        self._ensure_thread()
        self._inbox.put(self._ticket(request, settle, text, future.cancelled))
        return await future

    async def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="medusa-forge-decode", daemon=True)
            self._thread.start()

    def _take_new(self, active: int) -> list[Ticket]:
        """Tickets to start now, up to `max_batch_size` running in all. Idle: wait for work, then gather the burst
        it belongs to. Busy: take only what is already waiting (the running requests must not stall)."""
        new: list[Ticket] = []
        if not active:
            try:
                new.append(self._inbox.get(timeout=0.1))
            except queue.Empty:
                return new
            deadline = time.monotonic() + 10 * self.batch_wait_s
            while len(new) < self.max_batch_size:
                remaining = min(self.batch_wait_s, deadline - time.monotonic())
                if remaining <= 0:
                    break
                try:
                    new.append(self._inbox.get(timeout=remaining))
                except queue.Empty:
                    break
        while active + len(new) < self.max_batch_size:
            try:
                new.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        live = []
        for ticket in new:
            if ticket.is_cancelled():
                self._cancelled(0)
            else:
                live.append(ticket)
        return live

    def _cancelled(self, tokens: int) -> None:
        self.requests_cancelled += 1
        logger.info("the client went away: stopped its request after %d tokens", tokens)
