"""Self-distillation throughput on the embedded model (or --model).

1. In-process generation: one batched left-padded `generate` over B prompts vs the same prompts one at a time
   (target: batched >= 4x the total tokens/s).
1b. The two in-process engines on a distill-like load (more requests than the batch, replies of natural
   length): static batching (each batch runs to its longest reply) vs continuous batching.
2. Client throughput vs --concurrency: the distill runner's HTTP backend against `serve` in its own process.

Prompts are the first user turns of the embedded ShareGPT data, cut to --prompt-chars characters.
Run: python bench/bench_distill.py [--model smollm2] [--batch 16] [--single 4] [--max-new-tokens 64] [--threads N]
Results go to BENCHMARKS.md by hand (this machine is shared, so numbers vary run to run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from medusa_forge.data.conversations import Conversation, load_conversations
from medusa_forge.distill.backends import HttpBackend
from medusa_forge.distill.runner import ReplayOptions, run
from medusa_forge.distill.store import OutputStore
from medusa_forge.generation.generator import GenerationRequest
from medusa_forge.generation.hf import HFGenerator


def first_user_turns(count: int, prompt_chars: int) -> list[list[dict]]:
    prompts = []
    for conversation in load_conversations("sharegpt", max_samples=count * 3):
        users = [m for m in conversation.messages if m["role"] == "user" and m["content"].strip()]
        if users:
            prompts.append([{"role": "user", "content": users[0]["content"][:prompt_chars]}])
        if len(prompts) == count:
            break
    return prompts


def bench_in_process(generator: HFGenerator, prompts: list[list[dict]], single: int, max_new_tokens: int) -> dict:
    requests = [GenerationRequest(generator.encode_chat(p), max_new_tokens) for p in prompts]
    requests.sort(key=lambda r: len(r.prompt_ids))
    generator.generate_batch(requests[:2])  # warm-up
    start = time.perf_counter()
    batched = generator.generate_batch(requests)
    batched_s = time.perf_counter() - start
    batched_tokens = sum(r.completion_tokens for r in batched)
    start = time.perf_counter()
    alone = [generator.generate_batch([r])[0] for r in requests[:single]]
    single_s = time.perf_counter() - start
    single_tokens = sum(r.completion_tokens for r in alone)
    return {
        "batch": len(requests),
        "batched_tokens": batched_tokens,
        "batched_s": round(batched_s, 2),
        "batched_tok_s": round(batched_tokens / batched_s, 1),
        "single_requests": single,
        "single_tokens": single_tokens,
        "single_s": round(single_s, 2),
        "single_tok_s": round(single_tokens / single_s, 1),
        "speedup": round((batched_tokens / batched_s) / (single_tokens / single_s), 2),
    }


def bench_engines(generator: HFGenerator, prompts: list[list[dict]], max_new_tokens: int, max_batch: int) -> list:
    """A distill-like load: all prompts submitted at once, natural end-of-turn, batch <= max_batch."""
    from medusa_forge.generation.batching import make_engine

    requests = [GenerationRequest(generator.encode_chat(p), max_new_tokens) for p in prompts]
    rows = []
    for mode in ("static", "continuous"):
        engine = make_engine(generator, mode, max_batch_size=max_batch)

        async def submit_all(engine=engine):
            results = await asyncio.gather(*[engine.submit(r) for r in requests])
            await engine.close()
            return results

        start = time.perf_counter()
        results = asyncio.run(submit_all())
        wall = time.perf_counter() - start
        tokens = sum(r.completion_tokens for r in results)
        stopped = sum(r.finish_reason == "stop" for r in results)
        rows.append(
            {
                "engine": mode,
                "requests": len(requests),
                "ended_by_model": stopped,
                "tokens": tokens,
                "wall_s": round(wall, 1),
                "tok_s": round(tokens / wall, 1),
                "texts": [r.text for r in results],
            }
        )
    same = sum(a == b for a, b in zip(rows[0].pop("texts"), rows[1].pop("texts"), strict=True))
    rows[1]["same_text_as_static"] = f"{same}/{len(requests)}"
    return rows


async def _client_run(url: str, conversations: list[Conversation], concurrency: int, max_new_tokens: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        store = OutputStore(Path(folder) / "out.jsonl")
        store.open()
        options = ReplayOptions(max_new_tokens=max_new_tokens, max_turns=1, concurrency=concurrency)
        async with HttpBackend([url], max_retries=0) as backend:
            summary = await run(backend, conversations, store, options, show_progress=False)
        store.close()
    return {
        "concurrency": concurrency,
        "conversations": summary.done,
        "tokens": summary.completion_tokens,
        "wall_s": round(summary.wall_s, 2),
        "conv_s": round(summary.done / summary.wall_s, 2),
        "tok_s": round(summary.completion_tokens / summary.wall_s, 1),
    }


def bench_client(
    args: argparse.Namespace, prompts: list[list[dict]], levels: list[int], max_new_tokens: int
) -> list[dict]:
    """distill's HTTP client against `medusa-forge serve` in its own process, as users run it."""
    conversations = [Conversation(id=str(i), messages=p) for i, p in enumerate(prompts)]
    port = _free_port()
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    command = [sys.executable, "-m", "medusa_forge.cli", "serve", "--model", args.model, "--port", str(port)]
    command += ["--max-batch-size", str(args.batch), "--batch-wait-ms", str(args.batch_wait_ms)]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        while True:
            try:
                health = httpx.get(f"{url}/health", timeout=2).json()
                break
            except httpx.HTTPError:
                if server.poll() is not None:
                    raise RuntimeError("serve exited") from None
                time.sleep(0.5)
        for level in levels:
            before = health
            rows.append(asyncio.run(_client_run(url, conversations, level, max_new_tokens)))
            health = httpx.get(f"{url}/health", timeout=10).json()
            if health["batching"] == "static":  # requests per generate call
                calls, done = (health[k] - before[k] for k in ("generate_calls", "requests_generated"))
            else:  # rows per decode step
                calls, done = (health[k] - before[k] for k in ("decode_steps", "rows_decoded"))
            rows[-1]["batching"] = health["batching"]
            rows[-1]["mean_batch"] = round(done / max(calls, 1), 1)
            print(json.dumps(rows[-1]), flush=True)
    finally:
        server.terminate()
        server.wait()
    return rows


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch", type=int, default=16, help="Prompts in the batched run (and the client runs).")
    parser.add_argument("--single", type=int, default=4, help="Prompts generated one at a time.")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompt-chars", type=int, default=400)
    parser.add_argument("--concurrency", default="1,4,16", help="Client concurrency levels against serve.")
    parser.add_argument("--client-max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=25.0, help="serve's --batch-wait-ms.")
    parser.add_argument("--skip-client", action="store_true")
    parser.add_argument("--skip-in-process", action="store_true")
    parser.add_argument("--engine-requests", type=int, default=32, help="Static vs continuous engine (0: skip).")
    parser.add_argument("--engine-max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    generator = HFGenerator.load(args.model)
    prompts = first_user_turns(args.batch, args.prompt_chars)
    print(f"# {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, {args.model}")
    if not args.skip_in_process:
        print(json.dumps(bench_in_process(generator, prompts, args.single, args.max_new_tokens)), flush=True)
    if args.engine_requests:
        engine_prompts = first_user_turns(args.engine_requests, args.prompt_chars)
        for row in bench_engines(generator, engine_prompts, args.engine_max_new_tokens, args.batch):
            print(json.dumps(row), flush=True)
    if not args.skip_client:
        levels = [int(x) for x in args.concurrency.split(",")]
        bench_client(args, prompts, levels, args.client_max_new_tokens)


if __name__ == "__main__":
    main()
