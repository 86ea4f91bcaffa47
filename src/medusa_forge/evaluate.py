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
import json
import logging
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from medusa_forge.data.conversations import load_conversations
from medusa_forge.data.tokenize import IGNORE_INDEX, tokenize_conversation
from medusa_forge.errors import UserError

logger = logging.getLogger("medusa_forge.eval")

RANKS = 10  # rank accuracies kept per head: enough for trees up to top-10 per head


@dataclass
class HeadAccuracy:
    """Teacher-forced accuracy of one predictor (the base lm_head or a head) on assistant tokens."""

    name: str
    tokens: int
    rank_counts: list[int]  # how often the target was the rank-k guess, k < RANKS

    @property
    def rank_accuracy(self) -> list[float]:
        return [c / self.tokens if self.tokens else 0.0 for c in self.rank_counts]

    def top(self, k: int) -> float:
        return sum(self.rank_counts[:k]) / self.tokens if self.tokens else 0.0


@torch.no_grad()
def score_samples(
    model, samples, progress: bool = True, draft_vocab: int | None = None, desc: str = "head accuracy"
) -> list[HeadAccuracy]:
    """Rank of the true token under the base lm_head (predicts t+1) and each head i (predicts t+2+i), at every
    position whose target is labelled (not IGNORE_INDEX). `samples`: (input_ids, labels) pairs. With
    `draft_vocab` the heads rank only ids below it (a target outside is a miss), as the decoder then proposes."""
    num_heads = len(model.heads)
    names = ["base"] + [f"head {i}" for i in range(num_heads)]
    counts = [[0] * RANKS for _ in names]
    totals = [0] * len(names)
    device = next(model.base.parameters()).device
    lm_head = model.base.get_output_embeddings()
    heads_dtype = next(model.heads.parameters()).dtype
    for input_ids, label_ids in tqdm(samples, desc=desc, disable=not progress, leave=False):
        ids = torch.tensor(input_ids, device=device)
        labels = torch.tensor(label_ids, device=device)
        if len(ids) < 2 or (labels != IGNORE_INDEX).sum() == 0:
            continue
        hidden = model.hidden_states(ids[None])[0]
        for which in range(len(names)):
            shift = which + 1  # base: t+1, head i: t+2+i
            if len(ids) <= shift:
                continue
            mask = labels[shift:] != IGNORE_INDEX
            if not mask.any():
                continue
            rows, targets = hidden[: len(ids) - shift][mask], ids[shift:][mask]
            logits = lm_head(rows) if which == 0 else model.heads[which - 1](rows.to(heads_dtype))
            target_logit = logits.gather(1, targets[:, None])
            if which and draft_vocab is not None:
                logits = logits[:, :draft_vocab]
            ranks = (logits > target_logit).sum(dim=1)
            if which and draft_vocab is not None:
                ranks[targets >= draft_vocab] = RANKS  # the decoder could not propose it
            totals[which] += len(targets)
            for rank, n in zip(*torch.unique(ranks[ranks < RANKS], return_counts=True), strict=True):
                counts[which][int(rank)] += int(n)
    if totals[0] == 0:
        raise UserError("no sample had a labelled token to score; check --data")
    return [HeadAccuracy(name, total, count) for name, total, count in zip(names, totals, counts, strict=True)]


def measure_accuracy(
    model, tokenizer, conversations, max_length: int = 1024, progress: bool = True, draft_vocab: int | None = None
) -> list[HeadAccuracy]:
    """Teacher-forced accuracy on the conversations' assistant tokens (the reference answers)."""
    samples = []
    for conversation in conversations:
        try:
            sample = tokenize_conversation(tokenizer, conversation.messages, max_length)
        except ValueError:
            continue
        samples.append((sample["input_ids"], sample["labels"]))
    return score_samples(model, samples, progress, draft_vocab)


def measure_self_accuracy(
    model, prompts: list[list[int]], max_new_tokens: int, eos: set[int], draft_vocab: int | None = None
) -> list[HeadAccuracy]:
    """Teacher-forced accuracy on the model's own greedy answers to `prompts`: what greedy decoding accepts."""
    from medusa_forge.decode.generation import greedy_generate

    samples = []
    for prompt in tqdm(prompts, desc="greedy answers for calibration", leave=False):
        answer = greedy_generate(model.base, prompt, max_new_tokens, eos)
        samples.append((prompt + answer, [IGNORE_INDEX] * len(prompt) + answer))
    return score_samples(model, samples, draft_vocab=draft_vocab, desc="head accuracy (own answers)")


@dataclass
class TreeChoice:
    sizes: list[int]
    expected_accept_length: list[float]
    step_seconds: list[float]
    plain_step_seconds: float
    chosen_size: int
    choices: list[list[int]]

    @property
    def expected_tokens_per_second(self) -> list[float]:
        return [a / s for a, s in zip(self.expected_accept_length, self.step_seconds, strict=True)]


def choose_tree(
    model,
    rank_accuracy: list[list[float]],
    sizes: list[int],
    prefix_length: int = 256,
    repeats: int = 5,
    draft_vocab: int | None = None,
) -> TreeChoice:
    """Best tree per node budget from the rank accuracies, its step latency measured on this machine, and the
    budget with the most expected tokens per second."""
    from medusa_forge.decode.step_latency import measure_step_seconds
    from medusa_forge.decode.tree import build_tree, expected_accept_length

    trees = [build_tree(rank_accuracy, n) for n in sizes]
    expected = [expected_accept_length(t, rank_accuracy) for t in trees]
    plain, *seconds = measure_step_seconds(model, [None, *trees], prefix_length, repeats, draft_vocab)
    best = max(range(len(sizes)), key=lambda i: expected[i] / seconds[i])
    if expected[best] / seconds[best] <= 1 / plain:
        logger.warning(
            "no tree is expected to beat plain greedy here: best %.2f tokens/s (%d nodes) vs %.2f for a plain step; "
            "the heads' accuracy is too low for this machine's cost of verifying a tree",
            expected[best] / seconds[best],
            len(trees[best]),
            1 / plain,
        )
    return TreeChoice([len(t) for t in trees], expected, seconds, plain, len(trees[best]), trees[best])


def _first_prompts(tokenizer, conversations, count: int, max_prompt_tokens: int) -> list[list[int]]:
    """The first user turn of each conversation (with any system turn before it), chat template applied."""
    prompts = []
    for conversation in conversations:
        messages = []
        for message in conversation.messages:
            messages.append(message)
            if message["role"] == "user":
                break
        if not messages or messages[-1]["role"] != "user":
            continue
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= max_prompt_tokens:
            prompts.append(ids)
        if len(prompts) == count:
            break
    if not prompts:
        raise UserError(f"no held-out conversation starts with a user turn of at most {max_prompt_tokens} tokens")
    return prompts


@dataclass
class SpeedRun:
    name: str
    tokens: int = 0
    seconds: float = 0.0
    per_prompt_tokens_per_second: list[float] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds
        self.per_prompt_tokens_per_second.append(tokens / seconds if seconds else 0.0)


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_speed(
    model,
    decoder,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos: set[int],
    pad_id: int,
    prompt_lookup_tokens: int | None,
) -> tuple[dict[str, SpeedRun], list[int], list[int]]:
    """Per prompt, back to back: plain greedy, Medusa, prompt lookup. Returns the runs, every step's accepted
    length, and the indices of prompts whose Medusa output differed from plain greedy (must be empty)."""
    base = model.base
    device = next(base.parameters()).device
    eos_list = sorted(eos)

    def hf(ids: list[int], n: int, **extra) -> list[int]:
        out = base.generate(
            torch.tensor([ids], device=device),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=eos_list,
            pad_token_id=pad_id,
            **extra,
        )
        return out[0, len(ids) :].tolist()

    lookup = {"prompt_lookup_num_tokens": prompt_lookup_tokens} if prompt_lookup_tokens else None
    with torch.no_grad():  # warm-up, excluded: first calls pay allocation and kernel selection
        hf(prompts[0], 8)
        decoder.generate(prompts[0], 8, eos_token_ids=eos)
        if lookup:
            hf(prompts[0], 8, **lookup)
    runs = {"greedy": SpeedRun("greedy"), "medusa": SpeedRun("medusa")}
    if lookup:
        runs["prompt_lookup"] = SpeedRun("prompt_lookup")
    accept_lengths: list[int] = []
    mismatches: list[int] = []
    for index, ids in enumerate(tqdm(prompts, desc="greedy / medusa / prompt lookup")):
        with torch.no_grad():
            reference, seconds = _timed(lambda ids=ids: hf(ids, max_new_tokens))
            # generate() may pad after an EOS; keep up to the first EOS like the other decoders
            reference = _cut_at_eos(reference, eos)
            runs["greedy"].add(len(reference), seconds)
            result, seconds = _timed(lambda ids=ids: decoder.generate(ids, max_new_tokens, eos_token_ids=eos))
            runs["medusa"].add(len(result.tokens), seconds)
            accept_lengths.extend(result.accept_lengths)
            if result.tokens != reference:
                mismatches.append(index)
            if lookup:
                tokens, seconds = _timed(lambda ids=ids: _cut_at_eos(hf(ids, max_new_tokens, **lookup), eos))
                runs["prompt_lookup"].add(len(tokens), seconds)
                if tokens != reference:
                    logger.warning("prompt lookup's output differed from plain greedy on prompt %d", index)
    return runs, accept_lengths, mismatches


def _cut_at_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[: i + 1]
    return tokens


def write_report(report: dict, folder: Path) -> list[Path]:
    """eval.json, eval.md and the PNG plots; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "eval.json", folder / "eval.md"]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    paths[1].write_text(render_markdown(report))

    histogram = report["acceptance"]["histogram"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    lengths = sorted(int(k) for k in histogram)
    total = sum(histogram.values()) or 1
    ax.bar(lengths, [histogram[str(k)] / total for k in lengths])
    ax.set_xlabel("tokens accepted per step (base token included)")
    ax.set_ylabel("fraction of steps")
    ax.set_title(f"mean {report['acceptance']['mean_accept_length']:.2f} tokens/step")
    fig.tight_layout()
    fig.savefig(folder / "acceptance.png", dpi=120)
    plt.close(fig)

    speed = report["speed"]
    names = list(speed["tokens_per_second"])
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(
        names, [speed["tokens_per_second"][n] for n in names], color=["grey", "tab:blue", "tab:orange"][: len(names)]
    )
    ax.set_ylabel("tokens / s")
    ax.set_title(f"Medusa {speed['speedup']['medusa']:.2f}x over greedy")
    fig.tight_layout()
    fig.savefig(folder / "tokens_per_second.png", dpi=120)
    plt.close(fig)
    paths += [folder / "acceptance.png", folder / "tokens_per_second.png"]

    tree = report.get("tree_search")
    if tree:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(tree["sizes"], tree["expected_tokens_per_second"], marker="o")
        ax.axhline(1 / tree["plain_step_seconds"], color="grey", linestyle="--", label="plain greedy step")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tree nodes")
        ax.set_ylabel("expected tokens / s")
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "tree_size.png", dpi=120)
        plt.close(fig)
        paths.append(folder / "tree_size.png")
    return paths


def render_markdown(report: dict) -> str:
    lines = [
        f"# Medusa evaluation: {report['heads']}",
        "",
        f"Base model: `{report['base_model']}`; {report['machine']}.",
        "",
    ]
    lines += ["## Teacher-forced accuracy (held-out assistant tokens)", "", "| predictor | tokens | top-1 | top-5 |"]
    lines += ["|---|---|---|---|"]
    for row in report["accuracy"]:
        lines.append(f"| {row['name']} | {row['tokens']} | {row['top1']:.3f} | {row['top5']:.3f} |")
    if report["accuracy_own_answers"]:
        lines += [
            "",
            f"On the model's own greedy answers to {report['calibration_prompts']} other held-out prompts:",
            "",
        ]
        lines += ["| predictor | tokens | top-1 | top-5 |", "|---|---|---|---|"]
        for row in report["accuracy_own_answers"]:
            lines.append(f"| {row['name']} | {row['tokens']} | {row['top1']:.3f} | {row['top5']:.3f} |")
    acceptance = report["acceptance"]
    lines += ["", "## Acceptance", ""]
    lines.append(
        f"Tree: {len(report['tree'])} nodes, built from the heads' accuracy on {report['tree_accuracy_source']}."
    )
    lines.append("")
    lines.append(
        f"Mean accepted tokens per step: **{acceptance['mean_accept_length']:.2f}** over {acceptance['steps']} steps "
        f"(tree's expected value from the accuracies: {acceptance['expected_accept_length']:.2f})."
    )
    lines += ["", "| tokens per step | steps |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(acceptance["histogram"].items(), key=lambda kv: int(kv[0]))]
    speed = report["speed"]
    lines += ["", "## Speed", "", "| decoder | tokens/s | speed-up |", "|---|---|---|"]
    for name, tps in speed["tokens_per_second"].items():
        lines.append(f"| {name} | {tps:.2f} | {speed['speedup'][name]:.2f}x |")
    lines += [
        "",
        f"{speed['prompts']} prompts, at most {speed['max_new_tokens']} new tokens each, run back to back per prompt "
        f"after a warm-up; Medusa output equal to plain greedy on every prompt: {speed['outputs_equal']}.",
    ]
    tree = report.get("tree_search")
    if tree:
        lines += ["", "## Tree size chosen from measured latency", ""]
        lines += ["| nodes | expected tokens/step | step ms | expected tokens/s |", "|---|---|---|---|"]
        for n, e, s, t in zip(
            tree["sizes"],
            tree["expected_accept_length"],
            tree["step_seconds"],
            tree["expected_tokens_per_second"],
            strict=True,
        ):
            lines.append(f"| {n} | {e:.2f} | {1000 * s:.1f} | {t:.2f} |")
        lines += [
            "",
            f"Plain greedy step: {1000 * tree['plain_step_seconds']:.1f} ms. Chosen: {tree['chosen_size']} nodes.",
        ]
    return "\n".join(lines) + "\n"


def evaluate(args: argparse.Namespace) -> dict:
    from medusa_forge.decode.drafters import trained_draft_vocab
    from medusa_forge.decode.generation import MedusaDecoder
    from medusa_forge.decode.loading import eos_token_ids, load_medusa
    from medusa_forge.decode.tree import expected_accept_length, resolve_tree, save_tree

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
    eos = eos_token_ids(model, tokenizer)
    prompts = _first_prompts(
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
        choice = choose_tree(
            model, rank_accuracy, sizes, prefix_length=args.latency_prefix, draft_vocab=args.draft_vocab
        )
        tree_search = asdict(choice) | {"expected_tokens_per_second": choice.expected_tokens_per_second}
        choices = choice.choices
        if not args.no_save_tree:
            path = save_tree(
                args.heads,
                choices,
                chosen_by="medusa-forge eval",
                expected_accept_length=expected_accept_length(choices, rank_accuracy),
                step_seconds=choice.step_seconds[choice.sizes.index(choice.chosen_size)],
                machine=_machine(),
            )
            logger.warning("tree of %d nodes stored in %s", len(choices), path)
    else:
        choices = resolve_tree(args.tree, args.heads, len(model.heads))

    decoder = MedusaDecoder(model, choices, draft_vocab=args.draft_vocab)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    lookup = None if args.prompt_lookup_tokens <= 0 else args.prompt_lookup_tokens
    runs, accept_lengths, mismatches = run_speed(model, decoder, prompts, args.max_new_tokens, eos, pad_id, lookup)
    greedy_tps = runs["greedy"].tokens_per_second
    histogram = Counter(accept_lengths)
    report = {
        "heads": str(args.heads),
        "base_model": model.base.config.name_or_path,
        "data": args.data,
        "machine": _machine(),
        "accuracy": [
            {"name": r.name, "tokens": r.tokens, "top1": r.top(1), "top5": r.top(5), "rank_accuracy": r.rank_accuracy}
            for r in accuracy
        ],
        "accuracy_own_answers": [
            {"name": r.name, "tokens": r.tokens, "top1": r.top(1), "top5": r.top(5), "rank_accuracy": r.rank_accuracy}
            for r in self_accuracy or []
        ],
        "tree_accuracy_source": "own greedy answers" if self_accuracy else "reference answers",
        "calibration_prompts": len(calibration),
        "tree": choices,
        "draft_vocab": args.draft_vocab,
        "tree_search": tree_search,
        "acceptance": {
            "mean_accept_length": sum(accept_lengths) / len(accept_lengths) if accept_lengths else 0.0,
            "expected_accept_length": expected_accept_length(choices, rank_accuracy),
            "steps": len(accept_lengths),
            "histogram": {str(k): histogram[k] for k in sorted(histogram)},
        },
        "speed": {
            "prompts": len(prompts),
            "max_new_tokens": args.max_new_tokens,
            "tokens": {name: run.tokens for name, run in runs.items()},
            "seconds": {name: run.seconds for name, run in runs.items()},
            "tokens_per_second": {name: run.tokens_per_second for name, run in runs.items()},
            "speedup": {name: run.tokens_per_second / greedy_tps if greedy_tps else 0.0 for name, run in runs.items()},
            "median_per_prompt_speedup": statistics.median(
                m / g
                for m, g in zip(
                    runs["medusa"].per_prompt_tokens_per_second,
                    runs["greedy"].per_prompt_tokens_per_second,
                    strict=True,
                )
                if g
            ),
            "outputs_equal": not mismatches,
            "mismatched_prompts": mismatches,
        },
    }
    folder = Path(args.output_dir) if args.output_dir else Path(args.heads) / "eval"
    for path in write_report(report, folder):
        logger.warning("wrote %s", path)
    if mismatches:
        logger.error("Medusa output differed from plain greedy on prompts %s: please report this", mismatches)
    return report


def _machine() -> str:
    import os
    import platform

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"


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
