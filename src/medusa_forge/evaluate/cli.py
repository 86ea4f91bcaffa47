"""`medusa-forge eval`: are the heads worth deploying? Per-head accuracy, accepted tokens per step, and the
real speed-up over plain greedy decoding on this machine, with transformers' prompt-lookup decoding as a peer.

Steps: (1) teacher-forced per-head top-k accuracy on held-out conversations (assistant tokens only);
(2) the tree: from those rank accuracies, the best tree for each node budget, each budget's step latency
measured here, the budget with the most expected tokens/s wins and is stored in the heads folder;
(3) for each prompt, back to back: plain greedy (`generate(do_sample=False)`), Medusa, prompt lookup, each
timed after a warm-up, outputs checked equal; (4) eval.json, eval.md and PNG plots.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from medusa_forge.data.conversations import load_conversations
from medusa_forge.errors import UserError
from medusa_forge.evaluate.accuracy import measure_accuracy, measure_self_accuracy
from medusa_forge.evaluate.report import render_markdown, write_eval_report
from medusa_forge.evaluate.speed import (
    acceptance,
    choose_tree,
    first_prompts,
    machine_description,
    run_speed,
    speed_comparison,
)
from medusa_forge.results import EvalReport

logger = logging.getLogger("medusa_forge.eval")


def evaluate(args: argparse.Namespace) -> EvalReport:
    from medusa_forge.decode.drafters import trained_draft_vocab
    from medusa_forge.decode.generation import MedusaDecoder
    from medusa_forge.decode.loading import load_medusa
    from medusa_forge.decode.tree import expected_accept_length, resolve_tree
    from medusa_forge.formats.tree_file import save_tree
    from medusa_forge.generation.text import eos_token_ids

    if args.max_prompts < 1 or args.max_new_tokens < 1:
        raise UserError("--max-prompts and --max-new-tokens must be at least 1")
    sizes = _parse_sizes(args.tree_sizes)
    model, tokenizer = load_medusa(args.heads, args.model, args.dtype, args.device)
    if args.draft_vocab is None:
        args.draft_vocab = trained_draft_vocab(model)
    conversations = load_conversations(args.data, args.max_conversations)
    accuracy = measure_accuracy(model, tokenizer, conversations, args.max_length, draft_vocab=args.draft_vocab)
    for row in accuracy:
        logger.warning("%s: top-1 %.3f top-5 %.3f over %d tokens", row.name, row.top(1), row.top(5), row.tokens)
    eos = eos_token_ids(model.base, tokenizer)
    prompts = first_prompts(
        tokenizer,
        load_conversations(args.data, None),
        args.max_prompts + args.calibration_prompts,
        args.max_prompt_tokens,
    )
    prompts, calibration = prompts[: args.max_prompts], prompts[args.max_prompts :]
    self_accuracy = None
    if calibration:
        self_accuracy = measure_self_accuracy(model, calibration, args.max_new_tokens, eos, args.draft_vocab)
        for row in self_accuracy:
            logger.warning("%s on its own answers: top-1 %.3f top-5 %.3f", row.name, row.top(1), row.top(5))
    rank_accuracy = [row.rank_accuracy for row in (self_accuracy or accuracy)[1:]]

    tree_search = None
    if args.tree == "auto":
        tree_search = choose_tree(
            model, rank_accuracy, sizes, prefix_length=args.latency_prefix, draft_vocab=args.draft_vocab
        )
        choices = tree_search.choices
        if not args.no_save_tree:
            path = save_tree(
                args.heads,
                choices,
                chosen_by="medusa-forge eval",
                expected_accept_length=expected_accept_length(choices, rank_accuracy),
                step_seconds=tree_search.step_seconds[tree_search.sizes.index(tree_search.chosen_size)],
                machine=machine_description(),
            )
            logger.warning("tree of %d nodes stored in %s", len(choices), path)
    else:
        choices = resolve_tree(args.tree, args.heads, len(model.heads))

    decoder = MedusaDecoder(model, choices, draft_vocab=args.draft_vocab)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    lookup = None if args.prompt_lookup_tokens <= 0 else args.prompt_lookup_tokens
    runs, accept_lengths, mismatches = run_speed(model, decoder, prompts, args.max_new_tokens, eos, pad_id, lookup)
    report = EvalReport(
        heads=str(args.heads),
        base_model=model.base.config.name_or_path,
        data=args.data,
        machine=machine_description(),
        accuracy=[row.to_result() for row in accuracy],
        accuracy_own_answers=[row.to_result() for row in self_accuracy or []],
        tree_accuracy_source="own greedy answers" if self_accuracy else "reference answers",
        calibration_prompts=len(calibration),
        tree=choices,
        draft_vocab=args.draft_vocab,
        tree_search=tree_search,
        acceptance=acceptance(accept_lengths, expected_accept_length(choices, rank_accuracy)),
        speed=speed_comparison(runs, len(prompts), args.max_new_tokens, mismatches),
    )
    folder = Path(args.output_dir) if args.output_dir else Path(args.heads) / "eval"
    for path in write_eval_report(report, folder):
        logger.warning("wrote %s", path)
    if mismatches:
        logger.error("Medusa output differed from plain greedy on prompts %s: please report this", mismatches)
    return report


def _parse_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise UserError(f"--tree-sizes {text!r}: expected comma-separated node counts, e.g. 4,8,16,32") from None
    if not sizes or sizes[0] < 1:
        raise UserError(f"--tree-sizes {text!r}: node counts must be >= 1")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medusa-forge eval",
        description="Per-head accuracy, accepted tokens per step, and the real speed-up of Medusa decoding here.",
    )
    parser.add_argument("--heads", required=True, help="Heads folder written by `medusa-forge train`.")
    parser.add_argument("--model", help="Base model (default: base_model_name_or_path in the heads' config.json).")
    parser.add_argument(
        "--data",
        default="sharegpt-heldout",
        help="Held-out conversations (file or sharegpt-heldout). A self-distilled held-out file measures the heads "
        "on the model's own answers, which is what decoding accepts.",
    )
    parser.add_argument("--max-prompts", "--max_prompts", type=int, default=10, help="Prompts timed.")
    parser.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=128)
    parser.add_argument("--max-conversations", "--max_conversations", type=int, default=50, help="For accuracy.")
    parser.add_argument("--max-length", "--max_length", type=int, default=1024, help="Tokens per scored conversation.")
    parser.add_argument("--max-prompt-tokens", "--max_prompt_tokens", type=int, default=512)
    parser.add_argument(
        "--calibration-prompts",
        "--calibration_prompts",
        type=int,
        default=4,
        help="Further held-out prompts (not timed) whose greedy answers measure the heads on the model's own text; "
        "the tree is built from that. 0 = build it from the reference answers' accuracy.",
    )
    parser.add_argument(
        "--tree",
        default="auto",
        help="auto: build from the measured accuracies and latency and store it in the heads folder; "
        "or a JSON file of choices, or default-N.",
    )
    parser.add_argument("--tree-sizes", "--tree_sizes", default="4,8,16,24,32,48,64", help="Node budgets tried.")
    parser.add_argument(
        "--latency-prefix", "--latency_prefix", type=int, default=256, help="Cached tokens when timing."
    )
    parser.add_argument("--no-save-tree", "--no_save_tree", action="store_true", help="Do not write the tree file.")
    parser.add_argument("--prompt-lookup-tokens", "--prompt_lookup_tokens", type=int, default=10, help="0 = skip.")
    parser.add_argument("--output-dir", "--output_dir", help="Report folder (default: HEADS/eval).")
    parser.add_argument(
        "--draft-vocab",
        "--draft_vocab",
        type=int,
        help="Heads propose only token ids below N (cheaper heads on CPU; output unchanged). Default: the "
        "heads' draft_vocab_size from training, else the whole vocabulary.",
    )
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16.")
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, ...")
    return parser


def cli_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = evaluate(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(render_markdown(report))
    return 0
