"""`medusa-forge distill --input-filename IN --output-filename OUT [...]`: flags in, `runner.run` out, summary printed.

Exit status: 0 all done, 1 some conversations failed or were not attempted (rerun with --resume), 2 user error.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from medusa_forge.data.conversations import Conversation, load_conversations
from medusa_forge.distill.backends import HttpBackend, LocalBackend
from medusa_forge.distill.runner import ReplayOptions, Summary, run
from medusa_forge.distill.store import OutputStore
from medusa_forge.errors import UserError
from medusa_forge.generation.batching import BATCHING_MODES
from medusa_forge.generation.hf import HFGenerator

logger = logging.getLogger("medusa_forge")


def _flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """`--max-new-tokens` also answers to `--max_new_tokens` (the tutorial's scripts mix both styles)."""
    names = [name] + (["--" + name[2:].replace("-", "_")] if "-" in name[2:] else [])
    parser.add_argument(*names, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medusa-forge distill",
        description="Replay conversations against a model turn by turn and keep its own replies (self-distillation).",
    )
    _flag(parser, "--input-filename", required=True, help="ShareGPT or role/content JSON/JSONL file, or 'sharegpt'.")
    _flag(parser, "--output-filename", required=True, help="OUT.jsonl (appended as it goes) or OUT.json (a list).")
    _flag(parser, "--url", action="append", default=[], help="OpenAI-compatible server; repeat to spread the load.")
    _flag(parser, "--model", default=None, help="In-process model (default smollm2); with --url: the model name sent.")
    _flag(parser, "--api-key", default=None, help="Bearer token for --url servers (default: $HF_TOKEN if set).")
    _flag(parser, "--max-samples", type=int, default=None, help="Use the first N conversations of the input.")
    _flag(parser, "--max-new-tokens", type=int, default=1024, help="Longest reply per turn, in tokens.")
    _flag(parser, "--temperature", type=float, default=0.0, help="0 = greedy (what greedy Medusa decoding matches).")
    _flag(parser, "--top-p", type=float, default=1.0)
    _flag(parser, "--seed", type=int, default=0, help="Sampling seed (a stable per-request seed is derived).")
    _flag(parser, "--concurrency", type=int, default=16, help="Conversations in flight (in-process: batch size).")
    _flag(parser, "--max-turns", type=int, default=None, help="Replay at most this many user turns each.")
    _flag(
        parser,
        "--max-context",
        type=int,
        default=None,
        help="In-process: treat the context as N tokens (prompt + reply), e.g. training's --model_max_length; a "
        "conversation ends at the last turn that fits, one whose first turn does not fit is skipped.",
    )
    _flag(parser, "--shard", default=None, help="I/N: take every N-th conversation starting at I (0 <= I < N).")
    _flag(parser, "--dtype", default="float32", help="In-process model dtype: float32, bfloat16 or float16.")
    _flag(parser, "--device", default="auto", help="In-process device: auto (cuda if present), cpu, cuda, ...")
    _flag(parser, "--batching", default="auto", choices=BATCHING_MODES, help="In-process: continuous or static.")
    _flag(parser, "--max-retries", type=int, default=6, help="Retries per request on errors worth retrying.")
    _flag(parser, "--retry-base", type=float, default=1.0, help="First back-off delay in seconds (doubles each try).")
    _flag(parser, "--timeout", type=float, default=600.0, help="Seconds to wait for one reply.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="Skip conversations already in OUT (the default).")
    mode.add_argument("--overwrite", action="store_true", help="Delete OUT and start over.")
    _flag(parser, "--no-progress", action="store_true", help="No progress bar.")
    return parser


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


def _validate(args: argparse.Namespace) -> None:
    checks = [
        (args.max_new_tokens >= 1, "--max-new-tokens must be at least 1"),
        (args.temperature >= 0, "--temperature must be >= 0 (0 = greedy)"),
        (0 < args.top_p <= 1, "--top-p must be in (0, 1]"),
        (args.concurrency >= 1, "--concurrency must be at least 1"),
        (args.max_turns is None or args.max_turns >= 1, "--max-turns must be at least 1"),
        (args.max_context is None or args.max_context > args.max_new_tokens,
         "--max-context must be larger than --max-new-tokens (it holds the prompt and the reply)"),
        (args.max_context is None or not args.url,
         "--max-context applies to the in-process model; a server enforces its own context length"),
        (args.max_samples is None or args.max_samples >= 1, "--max-samples must be at least 1"),
        (args.max_retries >= 0, "--max-retries must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


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


async def _distill(args, backend, todo: list[Conversation], store: OutputStore, already: int) -> Summary:
    options = ReplayOptions(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        max_turns=args.max_turns,
        concurrency=args.concurrency,
        max_consecutive_failures=max(32, 2 * args.concurrency),
    )
    async with backend:
        print(f"distill: {len(todo)} conversations to replay with {backend.description}", file=sys.stderr)
        return await run(backend, todo, store, options, already_done=already, show_progress=not args.no_progress)


def distill(args: argparse.Namespace) -> Summary:
    _validate(args)
    shard = parse_shard(args.shard)
    conversations = select(unique_ids(load_conversations(args.input_filename, args.max_samples)), shard)
    store = OutputStore(args.output_filename)
    existed = store.exists()
    done = store.open(overwrite=args.overwrite)
    try:
        if existed and not args.overwrite:
            print(
                f"distill: {args.output_filename} exists: resuming ({len(done)} conversations done"
                f"{', a torn last line was cut away' if store.repaired_torn_line else ''}); "
                f"pass --overwrite to start over",
                file=sys.stderr,
            )
        todo = [c for c in conversations if c.id not in done]
        already = len(conversations) - len(todo)
        if args.url:
            backend = HttpBackend(
                args.url,
                model=args.model,
                api_key=args.api_key or os.environ.get("HF_TOKEN"),
                timeout_s=args.timeout,
                max_retries=args.max_retries,
                retry_base_s=args.retry_base,
                max_connections=args.concurrency,
            )
        elif todo:
            generator = HFGenerator.load(args.model or "smollm2", dtype=args.dtype, device=args.device)
            if args.max_context:
                generator.max_context = min(generator.max_context, args.max_context)
            backend = LocalBackend(generator, max_batch_size=args.concurrency, batching=args.batching)
            # Similar lengths in flight together: less padding in each batch.
            todo.sort(key=lambda c: replayed_chars(c, args.max_turns))
        if todo:
            summary = asyncio.run(_distill(args, backend, todo, store, already))
        else:
            summary = Summary(already_done=already)
        total = store.finalize({c.id: i for i, c in enumerate(conversations)})
        if store.final_json:
            print(f"distill: wrote {total} conversations to {args.output_filename}", file=sys.stderr)
        return summary
    finally:
        store.close()


def cli_main(argv: list[str]) -> int:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        summary = distill(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished conversations are saved; rerun with --resume to finish", file=sys.stderr)
        return 130
    for line in summary.lines():
        print(line, file=sys.stderr)
    if summary.fatal:
        print(f"error: {summary.stopped_early}", file=sys.stderr)
        return 2
    return 1 if summary.failed or summary.not_attempted else 0
