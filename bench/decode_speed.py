"""Medusa decoding speed on the embedded model: mean accepted length on held-out ShareGPT prompts, speed-up over
plain greedy, and where the time of one step goes.

1. Runs `medusa-forge eval` (teacher-forced head accuracy, tree from accuracy + measured latency, then greedy /
   Medusa / prompt lookup back to back per prompt, outputs checked equal).
2. Profiles one decoding step per tree size: backbone forward, lm_head over the tree, acceptance + KV pruning,
   heads on the accepted node; next to one plain greedy step.

Heads: --heads DIR (trained e.g. by `medusa-forge distill` + `medusa-forge train`, see BENCHMARKS.md); no weights
are committed. Run: python bench/decode_speed.py --heads DIR [--max-prompts 8] [--max-new-tokens 128]
[--sizes 1,4,8,16,32,64] [--threads N]. Results go to BENCHMARKS.md by hand: this machine is shared, so numbers
vary from run to run; the ratios are measured back to back.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from medusa_forge.decode.generation import MedusaDecoder, causal_bias, keep_cache_entries
from medusa_forge.decode.loading import load_medusa
from medusa_forge.evaluate.cli import build_parser as eval_parser
from medusa_forge.evaluate.cli import evaluate
from medusa_forge.formats.tree_file import build_tree


@torch.no_grad()
def profile_steps(model, trees, prefix_length: int, repeats: int, draft_vocab=None) -> list[dict[str, float]]:
    """Median milliseconds of each part of one step, per tree (None: a plain one-token step), timed round-robin."""
    decoders = [MedusaDecoder(model, t or [[0]], check=False, draft_vocab=draft_vocab) for t in trees]
    vocab = decoders[0].lm_head.weight.shape[0]
    dtype = decoders[0].dtype
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, vocab, (prefix_length,), generator=gen)
    caches = []
    for decoder in decoders:
        caches.append(DynamicCache())
        decoder._forward(prefix, torch.arange(prefix_length), causal_bias(prefix_length, dtype), caches[-1])
    names = ("backbone", "lm_head+accept", "kv prune", "heads")
    parts = [{name: [] for name in names} for _ in trees]
    for _ in range(repeats + 1):
        for choices, decoder, cache, timings in zip(trees, decoders, caches, parts, strict=True):
            tree = decoder.tree
            tokens = torch.randint(0, vocab, (tree.size if choices else 1,), generator=gen)
            if choices:
                bias, positions = tree.attention_bias(prefix_length, dtype), prefix_length + tree.depths
            else:
                bias, positions = torch.zeros(1, 1, 1, prefix_length + 1), torch.tensor([prefix_length])
            t0 = time.perf_counter()
            hidden = decoder._forward(tokens, positions, bias, cache)
            t1 = time.perf_counter()
            if choices:
                nodes, _ = decoder._accept(tokens, hidden)  # lm_head over internal nodes (+ a leaf) and acceptance
                t2 = time.perf_counter()
                keep_cache_entries(cache, prefix_length, nodes)
                kept = len(nodes)
            else:
                int(decoder.lm_head(hidden[-1]).argmax())
                t2 = time.perf_counter()
                kept = 1
            t3 = time.perf_counter()
            if choices:
                decoder._heads(hidden[-1])
            t4 = time.perf_counter()
            cache.crop(-kept)
            for name, seconds in zip(names, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                timings[name].append(seconds)
    return [{name: 1000 * statistics.median(v[1:]) for name, v in timings.items()} for timings in parts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", required=True)
    parser.add_argument("--max-prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-conversations", type=int, default=40)
    parser.add_argument("--sizes", default="1,4,8,16,24,32,48,64")
    parser.add_argument("--prefix", type=int, default=256, help="Cached tokens when profiling a step.")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output-dir", default=None, help="Default: HEADS/eval-bench.")
    parser.add_argument("--skip-eval", action="store_true", help="Only profile the step.")
    parser.add_argument("--draft-vocab", type=int, default=None, help="Also profile with this draft vocabulary.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output_dir or Path(args.heads) / "eval-bench")
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"threads": torch.get_num_threads()}
    if not args.skip_eval:
        eval_args = eval_parser().parse_args(
            [
                "--heads", args.heads, "--max-prompts", str(args.max_prompts),
                "--max-new-tokens", str(args.max_new_tokens), "--max-conversations", str(args.max_conversations),
                "--tree-sizes", args.sizes, "--output-dir", str(out), "--device", "cpu",
                *(["--draft-vocab", str(args.draft_vocab)] if args.draft_vocab else []),
            ]
        )  # fmt: skip
        report = evaluate(eval_args)
        summary["eval"] = {
            "accuracy": {r.name: [round(r.top1, 3), round(r.top5, 3)] for r in report.accuracy},
            "accuracy_own_answers": {r.name: [round(r.top1, 3), round(r.top5, 3)] for r in report.accuracy_own_answers},
            "tree_nodes": len(report.tree),
            "mean_accept_length": report.acceptance.mean_accept_length,
            "expected_accept_length": report.acceptance.expected_accept_length,
            "tokens_per_second": report.speed.tokens_per_second,
            "speedup": report.speed.speedup,
            "median_per_prompt_speedup": report.speed.median_per_prompt_speedup,
            "outputs_equal": report.speed.outputs_equal,
        }
        rank_accuracy = [r.rank_accuracy for r in (report.accuracy_own_answers or report.accuracy)[1:]]
    else:
        rank_accuracy = None
    model, _ = load_medusa(args.heads, device="cpu")
    prior = [[0.5, 0.1, 0.05]] * 3
    trees = [build_tree(rank_accuracy or prior, int(size)) for size in args.sizes.split(",")]
    profile = {}
    for draft in [None] + ([args.draft_vocab] if args.draft_vocab else []):
        suffix = f" (draft vocab {draft})" if draft else ""
        timings = profile_steps(model, [None, *trees], args.prefix, args.repeats, draft)
        profile["plain" + suffix] = timings[0]
        for tree, parts in zip(trees, timings[1:], strict=True):
            profile[f"tree {len(tree)}{suffix}"] = parts
    summary["step_profile_ms"] = profile
    print(json.dumps(summary, indent=2))
    print(
        "\n| step | backbone ms | lm_head + accept ms | KV prune ms | heads ms | total ms |\n|---|---|---|---|---|---|"
    )
    for name, parts in profile.items():
        cells = " | ".join(f"{v:.1f}" for v in parts.values())
        print(f"| {name} | {cells} | {sum(parts.values()):.1f} |")
    (out / "bench.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
