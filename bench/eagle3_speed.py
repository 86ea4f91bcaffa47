"""EAGLE-3 decoding speed on held-out prompts: per tree, mean accepted tokens per step, tokens/s against plain
greedy (transformers' generate) and prompt lookup, and whether every output equals plain greedy.

    .venv/bin/python bench/eagle3_speed.py --draft runs/eagle3 --max-prompts 8 --max-new-tokens 96

Trees: `chain-N` (one candidate per depth, N deep) or `default-N` (N nodes built from typical accuracies).
Time it on an idle machine; the numbers go to BENCHMARKS.md with the command and the commit.
"""

from __future__ import annotations

import argparse
import json

import torch

from medusa_forge.data.conversations import load_conversations
from medusa_forge.decode.generation import SpeculativeDecoder
from medusa_forge.decode.loading import load_draft
from medusa_forge.decode.tree import resolve_tree
from medusa_forge.drafts.eagle3_drafter import EAGLE3_TREE_DEPTH, Eagle3Drafter
from medusa_forge.evaluate.speed import acceptance, first_prompts, run_speed, speed_comparison
from medusa_forge.generation.text import eos_token_ids
from medusa_forge.results import DRAFT_RUN


def tree(spec: str, draft_dir: str) -> list[list[int]]:
    if spec.startswith("chain-"):
        return [[0] * depth for depth in range(1, int(spec.removeprefix("chain-")) + 1)]
    return resolve_tree(spec, draft_dir, EAGLE3_TREE_DEPTH)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", required=True, help="EAGLE-3 draft folder (medusa-forge train --draft_kind eagle3)")
    parser.add_argument("--data", default="sharegpt-heldout")
    parser.add_argument("--max-prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--max-prompt-tokens", type=int, default=256)
    parser.add_argument("--trees", default="chain-3,chain-5,default-8,default-16")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--output", help="Write the table as JSON here too.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_draft(args.draft, dtype=args.dtype, device="cpu")
    base, draft, tokenizer = loaded.base, loaded.draft.draft, loaded.tokenizer
    conversations = load_conversations(args.data, 40 * args.max_prompts)
    prompts = first_prompts(tokenizer, conversations, args.max_prompts, args.max_prompt_tokens)
    eos = eos_token_ids(base, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    rows = []
    for spec in args.trees.split(","):
        choices = tree(spec, args.draft)
        decoder = SpeculativeDecoder(base, Eagle3Drafter(base, draft), choices)
        runs, outputs, accepted = run_speed(
            {args.dtype: base}, decoder, args.dtype, prompts, args.max_new_tokens, eos, pad, 3
        )
        speed = speed_comparison(runs, outputs, args.dtype, args.max_new_tokens)
        rows.append(
            {
                "tree": spec,
                "nodes": len(choices),
                "mean_accept_length": acceptance(accepted, 0.0).mean_accept_length,
                "tokens_per_second": speed.tokens_per_second,
                "speedup": speed.speedup,
                "outputs_equal": speed.outputs_equal,
            }
        )
        row = rows[-1]
        print(
            f"{spec:>11} {row['nodes']:>3} nodes: {row['mean_accept_length']:.2f} accepted/step, "
            f"{row['tokens_per_second'][DRAFT_RUN]:.1f} vs greedy {row['tokens_per_second'][speed.reference]:.1f} "
            f"tokens/s ({row['speedup'][DRAFT_RUN]:.2f}x; "
            f"prompt lookup {row['speedup'].get('prompt_lookup', 0):.2f}x), "
            f"outputs equal: {row['outputs_equal']}",
            flush=True,
        )
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
