"""Replay conversations turn by turn against a backend, `concurrency` at a time, writing each as it finishes.

Replay: system turns are kept where they are; every user turn is sent with the history so far and the
model's reply follows it; the original assistant turns are dropped (so a leading assistant turn vanishes).
A conversation that outgrows the model's context ends at its last complete turn.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from medusa_forge.data.conversations import Conversation
from medusa_forge.distill.backends import BackendUnavailable, SamplingParams
from medusa_forge.distill.store import OutputStore
from medusa_forge.errors import UserError
from medusa_forge.generation.generator import ContextLengthError

logger = logging.getLogger(__name__)


@dataclass
class ReplayOptions:
    max_new_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = 0
    max_turns: int | None = None  # user turns replayed per conversation
    concurrency: int = 16
    # Stop the run (instead of failing every remaining conversation slowly) after this many failures in a row.
    max_consecutive_failures: int = 32


@dataclass
class Summary:
    done: int = 0
    already_done: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count (nothing to replay)
    failed: dict[str, str] = field(default_factory=dict)  # id -> reason
    not_attempted: int = 0
    completion_tokens: int = 0
    replies: int = 0
    replies_cut_at_max_tokens: int = 0
    conversations_cut_at_context: int = 0
    stopped_early: str | None = None
    fatal: bool = False  # stopped by an error retrying cannot fix (the server rejected our requests)
    wall_s: float = 0.0

    def lines(self) -> list[str]:
        rate = self.completion_tokens / self.wall_s if self.wall_s else 0.0
        out = [
            f"done: {self.done} conversations ({self.replies} replies, {self.completion_tokens} tokens generated, "
            f"{rate:.1f} tokens/s, wall time {self.wall_s:.1f} s)",
            f"already done before this run: {self.already_done}",
        ]
        if self.replies_cut_at_max_tokens:
            out.append(f"replies cut at --max-new-tokens: {self.replies_cut_at_max_tokens}")
        if self.conversations_cut_at_context:
            out.append(f"conversations ended early at the model's context limit: {self.conversations_cut_at_context}")
        for reason, count in self.skipped.most_common():
            out.append(f"skipped {count} ({reason})")
        if self.failed:
            out.append(f"failed: {len(self.failed)} (retried by the next run with --resume)")
            by_reason: dict[str, list[str]] = {}
            for conversation_id, reason in self.failed.items():
                by_reason.setdefault(reason, []).append(conversation_id)
            for reason, ids in by_reason.items():
                shown = ", ".join(ids[:10]) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")
                out.append(f"  {len(ids)} x {reason}: {shown}")
        if self.not_attempted:
            out.append(f"not attempted: {self.not_attempted} (run again with --resume)")
        if self.stopped_early:
            out.append(f"stopped early: {self.stopped_early}")
        return out


class ConversationFailed(RuntimeError):
    pass


class NothingToReplay(RuntimeError):
    pass


def turn_seed(seed: int | None, conversation_id: str, turn: int) -> int | None:
    """A stable per-request seed, so a sampled run is reproducible on servers that honour `seed`."""
    if seed is None:
        return None
    digest = hashlib.sha1(f"{seed}/{conversation_id}/{turn}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


@dataclass
class ReplayResult:
    messages: list[dict[str, str]]
    completion_tokens: int = 0
    replies: int = 0
    cut_at_max_tokens: int = 0
    cut_at_context: bool = False


async def replay(backend, conversation: Conversation, options: ReplayOptions) -> ReplayResult:
    """The conversation with every assistant turn replaced by the backend's own reply."""
    result = ReplayResult(messages=[])
    for message in conversation.messages:
        role = message["role"]
        if role == "assistant":
            continue
        if role == "system":
            result.messages.append(dict(message))
            continue
        if options.max_turns is not None and result.replies >= options.max_turns:
            break
        result.messages.append({"role": "user", "content": message["content"]})
        params = SamplingParams(
            options.max_new_tokens,
            options.temperature,
            options.top_p,
            turn_seed(options.seed, conversation.id, result.replies),
        )
        try:
            reply = await backend.complete(list(result.messages), params)
        except ContextLengthError:
            result.messages.pop()
            if result.replies == 0:  # it never will: skipped (and counted), not a failure to retry
                raise NothingToReplay("first user turn longer than the context") from None
            result.cut_at_context = True
            break
        result.messages.append({"role": "assistant", "content": reply.text})
        result.replies += 1
        result.completion_tokens += reply.completion_tokens
        result.cut_at_max_tokens += reply.finish_reason == "length"
    if result.replies == 0:
        raise NothingToReplay("no user turn to replay")
    while result.messages and result.messages[-1]["role"] == "system":  # a trailing system turn has no reply
        result.messages.pop()
    return result


async def run(
    backend,
    conversations: list[Conversation],
    store: OutputStore,
    options: ReplayOptions,
    already_done: int = 0,
    show_progress: bool = True,
) -> Summary:
    """Replay `conversations` (those not done yet) with bounded concurrency; each is written when it completes."""
    summary = Summary(already_done=already_done)
    started = time.monotonic()
    queue = list(reversed(conversations))  # pop() from the end keeps the given order
    consecutive_failures = 0
    stop = asyncio.Event()
    progress = tqdm(total=len(conversations), unit="conv", desc="distill", disable=not show_progress, smoothing=0.1)

    def record_failure(conversation: Conversation, reason: str) -> None:
        nonlocal consecutive_failures
        summary.failed[conversation.id] = reason
        consecutive_failures += 1
        if consecutive_failures >= options.max_consecutive_failures and not stop.is_set():
            summary.stopped_early = (
                f"{consecutive_failures} conversations failed in a row (last: {reason}); "
                f"is the server up? Fix it and run again with --resume"
            )
            stop.set()

    async def worker() -> None:
        nonlocal consecutive_failures
        while queue and not stop.is_set():
            conversation = queue.pop()
            try:
                result = await replay(backend, conversation, options)
            except NothingToReplay as err:
                summary.skipped[str(err)] += 1
            except (ConversationFailed, BackendUnavailable) as err:
                record_failure(conversation, str(err))
            except UserError as err:
                queue.append(conversation)  # not failed: nothing about this conversation was wrong
                if not stop.is_set():
                    summary.stopped_early, summary.fatal = str(err), True
                    stop.set()
                continue
            else:
                store.append({"id": conversation.id, "messages": result.messages})
                consecutive_failures = 0
                summary.done += 1
                summary.replies += result.replies
                summary.completion_tokens += result.completion_tokens
                summary.replies_cut_at_max_tokens += result.cut_at_max_tokens
                summary.conversations_cut_at_context += result.cut_at_context
            progress.update(1)
            elapsed = time.monotonic() - started
            progress.set_postfix(
                tok_s=f"{summary.completion_tokens / max(elapsed, 1e-9):.1f}", failed=len(summary.failed)
            )

    workers = [asyncio.create_task(worker()) for _ in range(max(1, options.concurrency))]
    try:
        await asyncio.gather(*workers)
    finally:
        for task in workers:
            task.cancel()
        progress.close()
        summary.not_attempted = len(queue)
        summary.wall_s = time.monotonic() - started
    return summary
