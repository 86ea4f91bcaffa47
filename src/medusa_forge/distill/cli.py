"""`medusa-forge distill --input-filename IN --output-filename OUT [...]`: DistillConfig in, `runner.run` out, summary
printed.

Exit status: 0 all done, 1 some conversations failed or were not attempted (rerun with --resume), 2 user error.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import ClassVar

from medusa_forge.data.conversations import Conversation, load_conversations
from medusa_forge.distill.backends import HttpBackend, LocalBackend
from medusa_forge.distill.runner import ReplayOptions, Summary, run
from medusa_forge.distill.store import OutputStore
from medusa_forge.errors import UserError
from medusa_forge.generation.batching import BATCHING_MODES
from medusa_forge.generation.hf import HFGenerator

logger = logging.getLogger("medusa_forge")


@dataclass
class DistillConfig:
    """Replay conversations against a model turn by turn and keep its own replies (self-distillation)."""

    UNDERSCORE_ALIASES: ClassVar[bool] = True

    input_filename: str = field(
        metadata={
            "help": "ShareGPT or role/content JSON/JSONL file (assistant turns optional), a JSON list of prompt "
            "strings, {\"prompt\": ...} JSONL, or 'sharegpt'."
        }
    )
    output_filename: str = field(metadata={"help": "OUT.jsonl (appended as it goes) or OUT.json (a list)."})
    url: list[str] = field(
        default_factory=list, metadata={"help": "OpenAI-compatible server; repeat to spread the load."}
    )
    model: str | None = field(
        default=None, metadata={"help": "In-process model (default smollm2); with --url: the model name sent."}
    )
    api_key: str | None = field(
        default=None, metadata={"help": "Bearer token for --url servers (default: $HF_TOKEN if set)."}
    )
    max_samples: int | None = field(default=None, metadata={"help": "Use the first N conversations of the input."})
    max_new_tokens: int = field(default=1024, metadata={"help": "Longest reply per turn, in tokens."})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy (what greedy Medusa decoding matches)."})
    top_p: float = 1.0
    seed: int = field(default=0, metadata={"help": "Sampling seed (a stable per-request seed is derived)."})
    concurrency: int = field(default=16, metadata={"help": "Conversations in flight (in-process: batch size)."})
    max_turns: int | None = field(default=None, metadata={"help": "Replay at most this many user turns each."})
    max_context: int | None = field(
        default=None,
        metadata={
            "help": "In-process: treat the context as N tokens (prompt + reply), e.g. training's --model_max_length; "
            "a conversation ends at the last turn that fits, one whose first turn does not fit is skipped."
        },
    )
    shard: str | None = field(
        default=None, metadata={"help": "I/N: take every N-th conversation starting at I (0 <= I < N)."}
    )
    dtype: str = field(default="float32", metadata={"help": "In-process model dtype: float32, bfloat16 or float16."})
    device: str = field(default="auto", metadata={"help": "In-process device: auto (cuda if present), cpu, cuda, ..."})
    batching: str = field(
        default="auto", metadata={"help": "In-process: continuous or static.", "choices": BATCHING_MODES}
    )
    max_retries: int = field(default=6, metadata={"help": "Retries per request on errors worth retrying."})
    retry_base: float = field(default=1.0, metadata={"help": "First back-off delay in seconds (doubles each try)."})
    timeout: float = field(
        default=600.0, metadata={"help": "Seconds one request may take in all (a trickling server is cut off too)."}
    )
    recover_truncated_data: bool = field(
        default=False,
        metadata={
            "help": "Replay the complete records of an input file that ends in the middle of a record (a cut copy) "
            "instead of refusing it. The embedded 'sharegpt' file is always recovered."
        },
    )
    resume: bool = field(
        default=False, metadata={"help": "Skip conversations already in OUT (the default).", "flag": "--resume"}
    )
    overwrite: bool = field(default=False, metadata={"help": "Delete OUT and start over.", "flag": "--overwrite"})
    no_progress: bool = field(default=False, metadata={"help": "No progress bar."})

    def __post_init__(self) -> None:
        checks = [
            (not (self.resume and self.overwrite), "--resume and --overwrite exclude each other: pass one"),
            (self.batching in BATCHING_MODES, f"--batching {self.batching}: choose from {', '.join(BATCHING_MODES)}"),
            (self.max_new_tokens >= 1, "--max-new-tokens must be at least 1"),
            (self.temperature >= 0, "--temperature must be >= 0 (0 = greedy)"),
            (0 < self.top_p <= 1, "--top-p must be in (0, 1]"),
            (self.concurrency >= 1, "--concurrency must be at least 1"),
            (self.max_turns is None or self.max_turns >= 1, "--max-turns must be at least 1"),
            (self.max_context is None or self.max_context > self.max_new_tokens,
             "--max-context must be larger than --max-new-tokens (it holds the prompt and the reply)"),
            (self.max_context is None or not self.url,
             "--max-context applies to the in-process model; a server enforces its own context length"),
            (self.max_samples is None or self.max_samples >= 1, "--max-samples must be at least 1"),
            (self.max_retries >= 0, "--max-retries must be >= 0"),
            (self.timeout > 0, "--timeout must be > 0 (seconds to wait for one reply)"),
            (self.retry_base >= 0, "--retry-base must be >= 0 (seconds before the first retry)"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        parse_shard(self.shard)


def parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return 0, 1
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text!r}: expected I/N such as 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise UserError(f"--shard {text!r}: need N >= 1 and 0 <= I < N (shards are numbered from 0)")
    return index, count


def unique_ids(conversations: list[Conversation]) -> list[Conversation]:
    """Resume works by id, so a repeated id gets a '#n' suffix (in input order, hence stable across runs)."""
    seen: dict[str, int] = {}
    repeated = 0
    for conversation in conversations:
        count = seen.get(conversation.id, 0)
        seen[conversation.id] = count + 1
        if count:
            conversation.id = f"{conversation.id}#{count}"
            repeated += 1
    if repeated:
        logger.warning("%d conversations repeat an earlier id; they are written as 'ID#n'", repeated)
    return conversations


def replayed_chars(conversation: Conversation, max_turns: int | None) -> int:
    """Characters of the system and user turns that will be sent (a proxy for prompt length)."""
    users = [m for m in conversation.messages if m["role"] == "user"][:max_turns]
    return sum(len(m["content"]) for m in users) + sum(
        len(m["content"]) for m in conversation.messages if m["role"] == "system"
    )


def select(conversations: list[Conversation], shard: tuple[int, int]) -> list[Conversation]:
    index, count = shard
    return conversations[index::count]


async def _distill(
    config: DistillConfig, backend, todo: list[Conversation], store: OutputStore, already: int
) -> Summary:
    options = ReplayOptions(
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        seed=config.seed,
        max_turns=config.max_turns,
        concurrency=config.concurrency,
        max_consecutive_failures=max(32, 2 * config.concurrency),
    )
    async with backend:
        print(f"distill: {len(todo)} conversations to replay with {backend.description}", file=sys.stderr)
        return await run(backend, todo, store, options, already_done=already, show_progress=not config.no_progress)


def distill(config: DistillConfig) -> Summary:
    """Replay the conversations; returns what happened (the summary lines, failures, an early stop)."""
    shard = parse_shard(config.shard)
    # Only the user turns are replayed: prompt-only records are as good as whole conversations.
    loaded = load_conversations(
        config.input_filename,
        config.max_samples,
        config.recover_truncated_data,
        "--recover-truncated-data",
        need_reply=False,
    )
    conversations = select(unique_ids(loaded), shard)
    store = OutputStore(config.output_filename)
    existed = store.exists()
    done = store.open(overwrite=config.overwrite)
    try:
        if existed and not config.overwrite:
            print(
                f"distill: {config.output_filename} exists: resuming ({len(done)} conversations done"
                f"{', a torn last line was cut away' if store.repaired_torn_line else ''}); "
                f"pass --overwrite to start over",
                file=sys.stderr,
            )
        todo = [c for c in conversations if c.id not in done]
        already = len(conversations) - len(todo)
        if config.url:
            backend = HttpBackend(
                config.url,
                model=config.model,
                api_key=config.api_key or os.environ.get("HF_TOKEN"),
                timeout_s=config.timeout,
                max_retries=config.max_retries,
                retry_base_s=config.retry_base,
                max_connections=config.concurrency,
            )
        elif todo:
            generator = HFGenerator.load(config.model or "smollm2", dtype=config.dtype, device=config.device)
            if config.max_context:
                generator.max_context = min(generator.max_context, config.max_context)
            backend = LocalBackend(generator, max_batch_size=config.concurrency, batching=config.batching)
            # Similar lengths in flight together: less padding in each batch.
            todo.sort(key=lambda c: replayed_chars(c, config.max_turns))
        if todo:
            summary = asyncio.run(_distill(config, backend, todo, store, already))
        else:
            summary = Summary(already_done=already)
        total = store.finalize({c.id: i for i, c in enumerate(conversations)})
        if store.final_json:
            print(f"distill: wrote {total} conversations to {config.output_filename}", file=sys.stderr)
        return summary
    finally:
        store.close()


def run_distill(config: DistillConfig) -> int:
    """Exit status: 0 all done, 1 some conversations failed or were not attempted, 2 stopped early, 130 Ctrl-C."""
    try:
        summary = distill(config)
    except KeyboardInterrupt:
        print("\ninterrupted: finished conversations are saved; rerun with --resume to finish", file=sys.stderr)
        return 130
    for line in summary.lines():
        print(line, file=sys.stderr)
    if summary.fatal:
        print(f"error: {summary.stopped_early}", file=sys.stderr)
        return 2
    return 1 if summary.failed or summary.not_attempted else 0
