"""What one DFlash draft step costs against one plain greedy step of its target, per block size, and where the
draft step's time goes: the block's forward (one pass over B tokens against the kept context keys/values), the
target's lm_head over the B-1 drafted slots, and `advance` (the context keys/values of the accepted positions).

    .venv/bin/python bench/dflash_speed.py --model smollm2 --blocks 4,8,16 --threads 1
    .venv/bin/python bench/dflash_speed.py --accuracy-conversations 2   # also time eval's per-position scorer

A random draft is enough for cost (`DFlashDraft.for_target`); `--draft DIR` times a trained one instead. Every
case starts from the same `--prefix` cached tokens and the cases are timed round-robin, medians of `--repeats`;
on a shared machine use `--threads 1` (two threads stall on each other when another job holds a core).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from transformers import AutoTokenizer

from medusa_forge.data.conversations import load_conversations
from medusa_forge.decode.generation import SpeculativeDecoder
from medusa_forge.decode.step_latency import Stopwatch, plain_step
from medusa_forge.drafts.dflash_drafter import DFlashDrafter, score_dflash_samples
from medusa_forge.drafts.dflash_model import DFlashDraft
from medusa_forge.evaluate.accuracy import conversation_samples
from medusa_forge.generation.device import resolve_dtype
from medusa_forge.modeling import load_base_model, resolve_model


def seconds(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def draft_parts(decoder: SpeculativeDecoder, prefix: torch.Tensor, accepted: int) -> dict[str, float]:
    """One draft step's parts after `prefix`: the block forward, the lm_head over the drafted slots, the whole
    `propose` (both, top-k and the tree's candidates) and `advance` by `accepted` positions."""
    drafter: DFlashDrafter = decoder.drafter  # type: ignore[assignment]
    config, tree = drafter.draft.config, decoder.tree
    state = decoder.prefill(prefix)
    ids = torch.full((config.block_size,), config.mask_token_id, dtype=torch.long)
    ids[0] = state.root
    embeds = drafter.embedding(ids).to(drafter.dtype)[None, None]
    positions = torch.arange(state.draft.length, state.draft.length + config.block_size)[None, None]
    context = list(zip(state.draft.keys, state.draft.values, strict=True))
    out: list[torch.Tensor] = []
    parts = {"block": seconds(lambda: out.append(drafter.draft.block(embeds, positions, context)[0, 0]))}
    parts["head"] = seconds(lambda: drafter.head(out[0][1 : tree.depth + 1]))
    parts["propose"] = seconds(lambda: drafter.propose(state.draft, state.root, tree))
    features = torch.randn(accepted, len(drafter.feature_layers) * drafter.embedding.weight.shape[1])
    nodes, tokens = torch.arange(accepted), torch.zeros(accepted, dtype=torch.long)
    parts["advance"] = seconds(lambda: drafter.advance(state.draft, nodes, tokens, features.to(drafter.dtype)))
    return parts


def plain_seconds(decoder: SpeculativeDecoder, prefix: torch.Tensor) -> float:
    state = decoder.prefill(prefix)
    mark = Stopwatch(decoder.device)
    plain_step(decoder, state, mark)
    return sum(mark.seconds().values())


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--draft", help="a trained DFlash draft folder (default: a random draft per block size)")
    parser.add_argument("--blocks", default="4,8,16")
    parser.add_argument("--prefix", type=int, default=256, help="cached tokens before the timed step")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--accuracy-conversations", type=int, default=0, help="also time eval's scorer on these")
    parser.add_argument("--max-length", type=int, default=1024, help="tokens per scored conversation")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype)
    base = load_base_model(args.model, dtype=dtype)
    drafts = {}
    for block in map(int, args.blocks.split(",")):
        torch.manual_seed(block)
        draft = DFlashDraft.load(args.draft) if args.draft else DFlashDraft.for_target(base, args.model, 0, block)
        drafts[draft.config.block_size] = draft.to(dtype).eval()
    decoders = {
        block: SpeculativeDecoder(base, DFlashDrafter(base, draft), [[0] * d for d in range(1, block)], check=False)
        for block, draft in drafts.items()
    }
    prefix = torch.randint(0, base.get_output_embeddings().weight.shape[0], (args.prefix,))
    plain: list[float] = []
    parts: dict[int, list[dict[str, float]]] = {block: [] for block in decoders}
    for _ in range(args.repeats + 1):  # round-robin; the first round warms up and is dropped
        plain.append(plain_seconds(next(iter(decoders.values())), prefix))
        for block, decoder in decoders.items():
            parts[block].append(draft_parts(decoder, prefix, accepted=max(1, block // 2)))
    plain_ms = statistics.median(plain[1:]) * 1000
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, prefix {args.prefix}")
    print(f"plain greedy step: {plain_ms:.1f} ms")
    for block, steps in parts.items():
        ms = {name: statistics.median(step[name] for step in steps[1:]) * 1000 for name in steps[0]}
        step = ms["propose"] + ms["advance"]
        print(
            f"block {block:>2}: draft step {step:.1f} ms ({step / plain_ms:.2f}x plain) = propose {ms['propose']:.1f} "
            f"(block forward {ms['block']:.1f}, lm_head over {block - 1} slots {ms['head']:.1f}) "
            f"+ advance by {max(1, block // 2)} {ms['advance']:.2f}",
            flush=True,
        )
    if args.accuracy_conversations:
        time_scorer(base, drafts, args)


def time_scorer(base, drafts: dict[int, DFlashDraft], args: argparse.Namespace) -> None:
    """Seconds per conversation of eval's per-position scorer, per block size, against the base forward alone."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
    conversations = load_conversations("sharegpt-heldout", args.accuracy_conversations)
    samples = conversation_samples(tokenizer, conversations, args.max_length)
    count = len(samples)
    forward = sum(seconds(lambda ids=ids: base(torch.tensor(ids)[None])) for ids, _ in samples)
    print(f"scorer, {count} conversations of {[len(ids) for ids, _ in samples]} tokens: "
          f"base forward alone {forward / count:.1f} s per conversation")  # fmt: skip
    for block, draft in drafts.items():
        took = seconds(lambda d=draft, b=block: score_dflash_samples(base, d, samples, b - 1, progress=False))
        print(f"block {block:>2}: {took / count:.1f} s per conversation", flush=True)


if __name__ == "__main__":
    main()
