"""The evaluation's outputs: eval.json (EvalReport.save), eval.md and the PNG plots."""

from __future__ import annotations

from pathlib import Path

from medusa_forge.drafts import get_kind
from medusa_forge.results import DRAFT_RUN, EvalReport


def write_eval_report(report: EvalReport, folder: Path) -> list[Path]:
    """eval.json, eval.md and the PNG plots; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = [report.save(folder), folder / "eval.md"]
    paths[1].write_text(render_markdown(report))

    histogram = report.acceptance.histogram
    fig, ax = plt.subplots(figsize=(5, 3.2))
    lengths = sorted(histogram)
    total = sum(histogram.values()) or 1
    ax.bar(lengths, [histogram[k] / total for k in lengths])
    ax.set_xlabel("tokens accepted per step (base token included)")
    ax.set_ylabel("fraction of steps")
    ax.set_title(f"mean {report.acceptance.mean_accept_length:.2f} tokens/step")
    fig.tight_layout()
    fig.savefig(folder / "acceptance.png", dpi=120)
    plt.close(fig)

    speed = report.speed
    names = list(speed.tokens_per_second)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    colors = {DRAFT_RUN: "tab:blue", "prompt_lookup": "tab:orange"}
    ax.bar(names, [speed.tokens_per_second[n] for n in names], color=[colors.get(n, "grey") for n in names])
    ax.tick_params(axis="x", labelsize=7)
    ax.set_ylabel("tokens / s")
    ax.set_title(f"{_label(report)} ({speed.dtype}) {speed.draft_speedup:.2f}x over the fastest greedy")
    fig.tight_layout()
    fig.savefig(folder / "tokens_per_second.png", dpi=120)
    plt.close(fig)
    paths += [folder / "acceptance.png", folder / "tokens_per_second.png"]

    tree = report.tree_search
    if tree:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(tree.sizes, tree.expected_tokens_per_second, marker="o")
        ax.axhline(1 / tree.plain_step_seconds, color="grey", linestyle="--", label="plain greedy step")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tree nodes")
        ax.set_ylabel("expected tokens / s")
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "tree_size.png", dpi=120)
        plt.close(fig)
        paths.append(folder / "tree_size.png")
    return paths


def _exactness(speed) -> str:
    """What the draft's output is worth: equal to plain greedy in its dtype, or how much of it agrees."""
    if speed.outputs_equal:
        text = f"The draft's output equals plain greedy's in {speed.dtype} on every prompt."
    else:
        where = ", ".join(
            f"prompt {p} at token {t}" for p, t in zip(speed.mismatched_prompts, speed.first_divergence, strict=False)
        )
        share = f"{100 * speed.agreement:.1f}%" if speed.agreement is not None else "an unknown share"
        text = (
            f"The draft's output differs from plain greedy's in {speed.dtype} on {len(speed.mismatched_prompts)} of "
            f"{speed.prompts} prompts (first divergence: {where}); {share} of greedy's tokens agree before the first "
            "divergence."
        )
        if speed.dtype == "float32":
            text += " In float32 this is a bug: please report it."
        else:
            text += " Near-ties flip because batched and single-token kernels round differently."
    if speed.agreement_float32 is not None:
        text += f" Against float32 greedy, {100 * speed.agreement_float32:.1f}% of the tokens agree."
    return text


def _label(report: EvalReport) -> str:
    return get_kind(report.draft_kind).title


def _chain_section(report: EvalReport) -> list[str]:
    """What the engines will give: they draft a chain, not our tree."""
    if not report.chains:
        return []
    k = report.chains[0].draft_tokens
    lines = [
        "",
        "## In the engines (a chain, not the tree)",
        "",
        f"vLLM (`\"num_speculative_tokens\": {k}`) and SGLang (`--speculative-eagle-topk 1`, as `export` prints) "
        f"draft a chain of {k} tokens per step; greedy, on the timed prompts, float32:",
        "",
        "| measured by | steps | accepted tokens per step | accepted at each draft position | outputs |",
        "|---|---|---|---|---|",
    ]
    for chain in report.chains:
        rates = " / ".join(f"{rate:.2f}" for rate in chain.acceptance_rates)
        outputs = {None: "", True: "equal to ours", False: "**differ from ours**"}[chain.outputs_equal]
        lines.append(f"| {chain.measured_by} | {chain.steps} | {chain.mean_accept_length:.2f} | {rates} | {outputs} |")
    search = report.chain_search
    if search is not None:
        rates = ", ".join(
            f"{n}: {rate:.1f}" for n, rate in zip(search.sizes, search.expected_tokens_per_second, strict=True)
        )
        lines += [
            "",
            f"The chain's length was chosen as the tree's is, by expected tokens/s on this machine ({report.dtype}; "
            f"draft tokens: tokens/s): {rates}. {search.chosen_size} is stored with the tree, and `export`'s vLLM "
            "commands serve it.",
        ]
    return lines


def render_markdown(report: EvalReport) -> str:
    """eval.md, also printed by `medusa-forge eval`. For a report eval wrote (every section present)."""
    lines = [
        f"# {_label(report)} evaluation: {report.draft}",
        "",
        f"Base model: `{report.base_model}`; {report.machine}.",
        "",
    ]
    table = ["| predictor | tokens | top-1 | top-5 |", "|---|---|---|---|"]
    if report.accuracy:
        lines += ["## Teacher-forced accuracy (held-out assistant tokens)", "", *table]
        lines += [f"| {row.name} | {row.tokens} | {row.top1:.3f} | {row.top5:.3f} |" for row in report.accuracy]
        if report.accuracy_own_answers:
            lines += ["", f"On the model's own greedy answers to {report.calibration_prompts} other held-out prompts:"]
            lines += ["", *table]
    else:  # prompt-only data: no reference answers to score on
        lines += [
            "## Accuracy on the model's own greedy answers",
            "",
            f"`{report.data}` holds prompts without assistant replies, so instead of teacher-forced accuracy on "
            f"reference answers the draft is scored on the model's own greedy answers to {report.calibration_prompts} "
            f"held-out prompts (not the timed ones).",
            "",
            *table,
        ]
    for row in report.accuracy_own_answers:
        lines.append(f"| {row.name} | {row.tokens} | {row.top1:.3f} | {row.top5:.3f} |")
    acceptance = report.acceptance
    lines += ["", "## Acceptance", ""]
    lines.append(f"Tree: {len(report.tree)} nodes, built from the draft's accuracy on {report.tree_accuracy_source}.")
    lines.append("")
    lines.append(
        f"Mean accepted tokens per step: **{acceptance.mean_accept_length:.2f}** over {acceptance.steps} steps "
        f"(tree's expected value from the accuracies: {acceptance.expected_accept_length:.2f})."
    )
    lines += ["", "| tokens per step | steps |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(acceptance.histogram.items())]
    lines += _chain_section(report)
    speed = report.speed
    lines += ["", "## Speed", "", "| run | tokens/s | speed-up |", "|---|---|---|"]
    for name, tps in speed.tokens_per_second.items():
        lines.append(f"| {name} | {tps:.2f} | {speed.speedup[name]:.2f}x |")
    lines += [
        "",
        f"{speed.prompts} prompts, at most {speed.max_new_tokens} new tokens each, run back to back per prompt "
        f'after a warm-up ("{DRAFT_RUN}": the {_label(report)} draft, and prompt lookup, in {speed.dtype}). '
        f"Speed-ups are over {speed.reference}, the fastest plain greedy here.",
        "",
        _exactness(speed),
    ]
    tree = report.tree_search
    if tree:
        lines += ["", "## Tree size chosen from measured latency", ""]
        lines += ["| nodes | expected tokens/step | step ms | expected tokens/s |", "|---|---|---|---|"]
        for n, e, s, t in zip(
            tree.sizes,
            tree.expected_accept_length,
            tree.step_seconds,
            tree.expected_tokens_per_second,
            strict=True,
        ):
            lines.append(f"| {n} | {e:.2f} | {1000 * s:.1f} | {t:.2f} |")
        lines += [
            "",
            f"In {report.dtype}. Plain greedy step: {1000 * tree.plain_step_seconds:.1f} ms. "
            f"Chosen: {tree.chosen_size} nodes.",
        ]
    if report.other_dtype_searches and tree:
        lines += ["", "## Decoding dtype chosen from measured latency", ""]
        lines += ["| dtype | plain step ms | best tree | its step ms | expected tokens/s |", "|---|---|---|---|---|"]
        for dtype, search in sorted({report.dtype: tree, **report.other_dtype_searches}.items()):
            lines.append(
                f"| {dtype}{' (chosen)' if dtype == report.dtype else ''} | {1000 * search.plain_step_seconds:.1f} "
                f"| {search.chosen_size} nodes | {1000 * search.chosen_step_seconds:.1f} "
                f"| {search.chosen_tokens_per_second:.2f} |"
            )
    return "\n".join(lines) + "\n"
