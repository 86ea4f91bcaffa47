"""WORKDIR/report.md and its PNGs: what the pipeline produced, how good it is, what it cost, how to serve it.

Everything is read from the stages' own outputs (training_metrics.json, eval.json, the export's serve commands,
the pipeline state), so the report can be rebuilt at any time without re-running a stage.
"""

from __future__ import annotations

import json
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path

from medusa_forge.drafts import DraftKind, get_kind
from medusa_forge.formats.tree_file import TREE_FILE
from medusa_forge.pipeline.configuration import command_default
from medusa_forge.pipeline.context import Context
from medusa_forge.results import (
    DRAFT_RUN,
    EVAL_REPORT_FILE,
    TRAINING_METRICS_FILE,
    Acceptance,
    EvalReport,
    SpeedComparison,
    TrainingMetrics,
)

STAGE_TIMES_PNG = "stage_times.png"
# The engines' names, in the order the report lists their serve commands (a kind's other formats follow).
ENGINE_NAMES = {"tgi": "Text Generation Inference", "vllm": "vLLM", "sglang": "SGLang", "tensorrt-llm": "TensorRT-LLM"}


def tree_lines(choices: list[list[int]], kind: DraftKind) -> list[str]:
    """The tree as an indented outline: one line per node, depth = which of the kind's predictors (a head from 0, an
    EAGLE-3 draft step from 1, as eval names them), rank = which of its guesses."""
    lines = ["base model's next token"]
    for path in sorted(choices):
        depth = len(path)
        node = f"{kind.metric_label} {depth - 1 + kind.first_predictor}"
        lines.append("  " * depth + f"- {node}, guess #{path[-1] + 1}")
    return lines


def _read_json_or_empty(path: Path) -> dict:
    """The JSON object in `path`, or {} when it is missing or unreadable: the report shows what there is."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _plot_stage_times(times: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(times)
    fig, ax = plt.subplots(figsize=(5, 0.5 + 0.45 * len(names)))
    ax.barh(names[::-1], [times[n] / 60 for n in names[::-1]], color="tab:blue")
    ax.set_xlabel("minutes")
    ax.set_title(f"time per stage (total {sum(times.values()) / 60:.1f} min)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def _chain_rows(evaluation: EvalReport) -> list[tuple[str, str]]:
    """What the engines will give: they draft a chain (the commands under "Serve it"), not our tree."""
    rows = []
    for chain in evaluation.chains:
        who = "our decoder, same chain" if chain.measured_by == "medusa-forge" else f"measured in {chain.measured_by}"
        rows.append((
            f"In vLLM / SGLang as served below (a chain of {chain.draft_tokens})",
            f"{chain.mean_accept_length:.2f} accepted tokens per step ({who})",
        ))  # fmt: skip
    return rows


def _summary_rows(ctx: Context, kind: DraftKind, evaluation: EvalReport | None) -> list[tuple[str, str]]:
    """The report's first table: what was trained on what, and what eval measured."""
    config = ctx.config
    draft_config = _read_json_or_empty(ctx.draft / kind.config_name)
    distilled = ctx.state.get("stages", {}).get("distill", {}).get("details", {}).get("conversations")
    data = f"`{config.data}`" + (f", self-distilled: {distilled} conversations" if distilled else "")
    why = ctx.kind_note or f"`draft_kind: {config.draft_kind}` in the configuration"
    rows = [
        ("Draft", f"{kind.label}: {why}"),
        ("Base model", f"`{config.model}` (`{draft_config.get('base_model_name_or_path', '?')}`)"),
        ("Training data", data),
        *kind.report_rows(draft_config, lambda flag: config.train.get(flag, command_default("train", flag))),
    ]
    if evaluation is None:
        return rows
    speed = evaluation.speed or SpeedComparison()
    tps = speed.tokens_per_second
    mean_accept_length = (evaluation.acceptance or Acceptance()).mean_accept_length or 0
    rows += [
        ("Mean accepted tokens per step", f"**{mean_accept_length:.2f}** with medusa-forge's "
         f"{len(evaluation.tree)}-node tree (plain: 1.00)"),
        *_chain_rows(evaluation),
        ("Speed-up over the fastest plain greedy", f"**{speed.speedup.get(DRAFT_RUN, 0):.2f}x** "
         f"({tps.get(DRAFT_RUN, 0):.1f} tokens/s in {speed.dtype} vs {tps.get(speed.reference, 0):.1f}, "
         f"{speed.reference})"),
    ]  # fmt: skip
    if "prompt_lookup" in tps:
        rows.append(("Prompt-lookup decoding", f"{speed.speedup['prompt_lookup']:.2f}x"))
    return rows + [
        (f"Output identical to greedy in {speed.dtype}", str(speed.outputs_equal)),
        ("Measured on", f"{evaluation.machine}; {speed.prompts} held-out prompts "
         f"(`{evaluation.data}`), up to {speed.max_new_tokens} new tokens each"),
    ]  # fmt: skip


def _time_section(ctx: Context, written: list[Path]) -> list[str]:
    stages = ctx.state.get("stages", {})
    times = {name: record.get("seconds", 0.0) for name, record in stages.items() if name != "report"}
    if not times:
        return []
    lines = ["## Time per stage", "", "| stage | time |", "|---|---|"]
    lines += [f"| {name} | {_minutes(seconds)} |" for name, seconds in times.items()]
    lines += [f"| **total** | **{_minutes(sum(times.values()))}** |", ""]
    _plot_stage_times(times, ctx.workdir / STAGE_TIMES_PNG)
    written.append(ctx.workdir / STAGE_TIMES_PNG)
    lines += [f"![time per stage]({STAGE_TIMES_PNG})", ""]
    if stages.get("train", {}).get("details", {}).get("resumed_from"):
        lines += [f"Training resumed from `{stages['train']['details']['resumed_from']}`.", ""]
    return lines


def _training_section(ctx: Context, kind: DraftKind, copy_png: Callable[[Path], str | None]) -> list[str]:
    metrics_path = ctx.draft / TRAINING_METRICS_FILE
    metrics = TrainingMetrics.load(metrics_path) if metrics_path.is_file() else TrainingMetrics()
    predictor = kind.predictor  # a row of training_metrics.json
    lines = ["## Training", ""]
    curves = copy_png(ctx.draft / "training_curves.png")
    if curves:
        lines += [f"![loss and top-1 per {predictor} during training]({curves})", ""]
    if metrics.train:
        lines += [f"| {predictor} | predicts | last logged loss | last logged top-1 (training batches) |",
                  "|---|---|---|---|"]  # fmt: skip
        for index, entries in sorted(metrics.train.items()):  # metric i drafts token t+2+i
            last = entries[-1]
            name = index + kind.first_predictor  # eval's (and the tree's) numbering
            lines.append(f"| {name} | t+{index + 2} | {last.get('loss', 0):.3f} | {last.get('top1', 0):.3f} |")
        if kind.first_predictor:
            first = f"`{kind.metric_name}0` is {predictor} {kind.first_predictor}"
            lines.append(f"\n`training_metrics.json` numbers the {predictor}s from 0 ({first}).")
        lines.append("")
    final = metrics.final
    if final.get("train_runtime"):
        cache = final.get("hidden_cache_seconds", 0)
        before = f", after {cache:.0f} s building the hidden-state cache (one frozen pass)" if cache >= 1 else ""
        lines += [f"{kind.label} training {final['train_runtime']:.0f} s{before}.", ""]
    return lines


def _evaluation_section(
    ctx: Context, kind: DraftKind, evaluation: EvalReport, copy_png: Callable[[Path], str | None]
) -> list[str]:
    tree = evaluation.tree
    lines = [
        "## The decoding tree",
        "",
        f"{len(tree)} nodes, built from the {kind.predictor}s' accuracy on {evaluation.tree_accuracy_source} and "
        f"sized by the step latency measured on this machine; stored as `heads/{TREE_FILE}` (`medusa-forge "
        f"generate` and `serve` use it{kind.tree_note}).",
        "",
        "```",
        *tree_lines(tree, kind),
        "```",
        "",
        f"`medusa_choices = {json.dumps(tree, separators=(',', ':'))}`",
        "",
    ]
    size_png = copy_png(ctx.eval_dir / "tree_size.png")
    if size_png:
        lines += [f"![expected tokens per second against tree size]({size_png})", ""]
    lines += ["## Acceptance and speed", ""]
    for name, alt in (("acceptance.png", "accepted tokens per step"), ("tokens_per_second.png", "tokens/s")):
        if copy_png(ctx.eval_dir / name):
            lines += [f"![{alt}]({name})", ""]
    lines += ["| predictor | top-1 (held-out) | top-5 (held-out) |", "|---|---|---|"]
    lines += [f"| {r.name} | {r.top1:.3f} | {r.top5:.3f} |" for r in evaluation.accuracy]
    return lines + ["", "Full evaluation: [`heads/eval/eval.md`](heads/eval/eval.md).", ""]


def _serve_section(ctx: Context) -> list[str]:
    lines = ["## Serve it", ""]
    commands = _read_json_or_empty(ctx.serve_commands)
    for fmt in [*(f for f in ENGINE_NAMES if f in commands), *(f for f in commands if f not in ENGINE_NAMES)]:
        engine = ENGINE_NAMES.get(fmt, fmt)
        lines += [f"{engine} (folder `export/{fmt}`):", "", "```bash", *commands[fmt], "```", ""]
    draft_path = shlex.quote(str(ctx.draft))
    lines += [
        "Here, with the in-process model (OpenAI-compatible server, and one-off generation):",
        "",
        "```bash",
        f"medusa-forge serve --draft {draft_path} --port 8000",
        f"medusa-forge generate --draft {draft_path} --prompt 'Explain KV caches in two sentences.'",
        "```",
        "",
    ]
    push = _read_json_or_empty(ctx.workdir / "push.json")
    if push:
        verb = "would be uploaded (dry run)" if push.get("dry_run") else "uploaded"
        lines += [f"Hub: {len(push.get('files', []))} files {verb} to `{push.get('repo')}`"
                  + (f" ({push['url']})" if push.get("url") else "") + ".", ""]  # fmt: skip
    return lines


def write_pipeline_report(ctx: Context) -> list[Path]:
    """Write report.md + PNGs into ctx.workdir; returns the files written."""
    workdir: Path = ctx.workdir
    kind = get_kind(ctx.config.draft_kind)
    eval_path = ctx.eval_dir / EVAL_REPORT_FILE
    evaluation = EvalReport.load(eval_path) if eval_path.is_file() else None
    written: list[Path] = []

    def copy_png(source: Path) -> str | None:
        if not source.is_file():
            return None
        target = workdir / source.name
        shutil.copyfile(source, target)
        written.append(target)
        return source.name

    rows = _summary_rows(ctx, kind, evaluation)
    lines = [f"# {kind.label} for `{ctx.config.model}`", "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]
    lines += ["", *_time_section(ctx, written), *_training_section(ctx, kind, copy_png)]
    if evaluation:
        lines += _evaluation_section(ctx, kind, evaluation, copy_png)
    lines += _serve_section(ctx)
    lines += [
        "## Reproduce",
        "",
        "The effective configuration is in `pipeline.yaml`. Re-running skips every finished stage:",
        "",
        "```bash",
        ctx.resume_command,
        "```",
    ]
    path = workdir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return [path, *written]
