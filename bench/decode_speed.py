"""Medusa decoding speed on the embedded model: mean accepted length on held-out ShareGPT prompts, speed-up over
plain greedy, and where the time of one step goes.

1. Runs `medusa-forge eval` (teacher-forced head accuracy, tree from accuracy + measured latency, then greedy /
   Medusa / prompt lookup back to back per prompt, outputs checked equal).
2. Profiles one decoding step per tree size: the heads' proposal (top-k), the backbone forward over the tree, lm_head
   + acceptance, KV pruning, heads on the last accepted node; next to one plain greedy step.

Heads: --heads DIR (trained e.g. by `medusa-forge distill` + `medusa-forge train`, see BENCHMARKS.md); no weights
are committed. Run: python bench/decode_speed.py --heads DIR [--max-prompts 8] [--max-new-tokens 128]
[--sizes 1,4,8,16,32,64] [--threads N]. Results go to BENCHMARKS.md by hand: this machine is shared, so numbers
vary from run to run; the ratios are measured back to back.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
from pathlib import Path

import torch

from medusa_forge.decode.generation import STEP_PARTS, SpeculativeDecoder
from medusa_forge.decode.loading import load_draft
from medusa_forge.decode.step_latency import time_step_parts
from medusa_forge.drafts.medusa_drafter import MedusaDrafter
from medusa_forge.evaluate.cli import EvalConfig, evaluate
from medusa_forge.formats.tree_file import build_tree


def profile_steps(model, trees, prefix_length: int, repeats: int, draft_vocab=None) -> list[dict[str, float]]:
    """Median milliseconds of each part of one step, per tree (None: a plain one-token step), timed round-robin."""
    make_decoder = functools.partial(SpeculativeDecoder, model.base, MedusaDrafter(model, draft_vocab), check=False)
    timings = time_step_parts([(make_decoder, tree) for tree in trees], prefix_length, repeats)
    return [{part: 1000 * statistics.median(s[part] for s in steps) for part in STEP_PARTS} for steps in timings]


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
        eval_config = EvalConfig(
            draft=args.heads,
            max_prompts=args.max_prompts,
            max_new_tokens=args.max_new_tokens,
            max_conversations=args.max_conversations,
            tree_sizes=args.sizes,
            output_dir=str(out),
            device="cpu",
            draft_vocab=args.draft_vocab or None,
        )
        report = evaluate(eval_config)
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
    model = load_draft(args.heads, device="cpu").draft.model
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
        "\n| step | propose ms | backbone ms | lm_head + accept ms | KV prune ms | heads ms | total ms |"
        "\n|---|---|---|---|---|---|---|"
    )
    for name, parts in profile.items():
        cells = " | ".join(f"{v:.1f}" for v in parts.values())
        print(f"| {name} | {cells} | {sum(parts.values()):.1f} |")
    (out / "bench.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
