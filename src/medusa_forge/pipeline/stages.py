"""The stages, in order: each is a pair of functions, what its result depends on (its fingerprint; None: not
configured, nothing to do) and how it runs (start over or resume, as the runner decides), which calls the existing
command (distill, train, eval, export, push) as a library and returns the files it wrote and the facts the report
shows."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

from medusa_forge.drafts import default_kind, get_kind
from medusa_forge.pipeline.configuration import (
    PushSection,
    distill_config,
    distill_flags,
    eval_config,
    train_config,
    train_owned,
)
from medusa_forge.pipeline.context import Context
from medusa_forge.pipeline.fingerprints import StageFingerprint, file_digest, source_identity, split_section
from medusa_forge.results import EVAL_REPORT_FILE, TRAINING_METRICS_FILE


class StageFailed(Exception):
    def __init__(self, stage: str, reason: str):
        super().__init__(reason)
        self.stage = stage
        self.reason = reason


@dataclass
class StageResult:
    outputs: list[Path]  # the files written, recorded with their digests (a later run checks them before skipping)
    details: dict = field(default_factory=dict)  # facts for the report (counts, where training resumed from)


def _exit_ok(stage: str, code: int, what: str) -> None:
    if code != 0:
        raise StageFailed(stage, f"`medusa-forge {what}` exited with status {code} (its message is above)")


def _draft_files(ctx: Context) -> list[Path]:
    """What training writes that later stages read: the draft's config and weights (file names by kind)."""
    kind = get_kind(ctx.config.draft_kind)
    return [ctx.draft / kind.config_name, ctx.draft / kind.weights_name]


def _draft_inputs(ctx: Context) -> dict:
    return {path.name: file_digest(path) for path in _draft_files(ctx) if path.is_file()}


# --- distill ------------------------------------------------------------------------------------------------------


def fingerprint_distill(ctx: Context) -> StageFingerprint | None:
    if not ctx.config.distill.enabled:
        return None
    settings, extend = split_section(distill_flags(ctx.config), "distill")
    inputs = {"data": source_identity(ctx.config.data), "model": source_identity(ctx.config.model)}
    return StageFingerprint({**settings, "urls": ctx.config.distill.urls}, inputs, extend)


def run_distill_stage(ctx: Context, fresh: bool) -> StageResult:
    """fresh: overwrite the conversations written so far instead of adding the missing ones."""
    from medusa_forge.distill.cli import distill

    ctx.distilled.parent.mkdir(parents=True, exist_ok=True)
    summary = distill(distill_config(ctx.config, ctx.distilled, fresh))
    for line in summary.lines():
        print(line, file=sys.stderr)
    if summary.fatal:
        raise StageFailed("distill", summary.stopped_early)
    if summary.failed or summary.not_attempted:
        raise StageFailed("distill", "some conversations failed or were not attempted (listed above); run the same "
                          "command again to retry only those")  # fmt: skip
    records = sum(1 for line in ctx.distilled.open() if line.strip())
    if records == 0:
        raise StageFailed("distill", f"{ctx.distilled} holds no conversation: check 'data' and distill.max_samples")
    return StageResult([ctx.distilled], {"conversations": records})


# --- train --------------------------------------------------------------------------------------------------------


def fingerprint_train(ctx: Context) -> StageFingerprint:
    settings, extend = split_section(ctx.config.train, "train")
    if ctx.config.draft_kind != default_kind().name:  # left out: work folders from before the key keep their state
        settings["draft_kind"] = ctx.config.draft_kind
    inputs = {"data": source_identity(ctx.train_data), "model": source_identity(ctx.config.model)}
    return StageFingerprint(settings, inputs, extend)


def launcher_argv(ctx: Context) -> list[str]:
    """The train command's flags for the train stage, for a launcher's own processes (`-m medusa_forge.train`).
    Every flag of the train command takes a value, so each key becomes `--key VALUE...`."""
    owned = train_owned(ctx.config, ctx.train_data, ctx.draft)
    argv: list[str] = []
    for key, value in {**ctx.config.train, **owned}.items():
        if value is not None:
            argv += [f"--{key}", *(str(v) for v in (value if isinstance(value, list) else [value]))]
    return argv


def run_train_stage(ctx: Context, fresh: bool) -> StageResult:
    """fresh: delete the draft folder first; otherwise training restarts from its last checkpoint-*."""
    from medusa_forge.train.run import train

    if fresh and ctx.draft.exists():
        shutil.rmtree(ctx.draft)  # another configuration's checkpoints must not be resumed
    checkpoints = sorted(ctx.draft.glob("checkpoint-*")) if ctx.draft.is_dir() else []
    details = {}
    if checkpoints:
        print(f"pipeline: train resumes from {checkpoints[-1].name}", file=sys.stderr)
        details["resumed_from"] = checkpoints[-1].name
    if ctx.config.train_launcher:  # e.g. torchrun over several GPUs: training in its own processes
        command = [*shlex.split(ctx.config.train_launcher), "-m", "medusa_forge.train", *launcher_argv(ctx)]
        print(f"pipeline: {shlex.join(command)}", file=sys.stderr)
        _exit_ok("train", subprocess.run(command).returncode, "train (under train_launcher)")
    else:
        train(train_config(ctx.config, ctx.train_data, ctx.draft))  # writes into ctx.draft (its output_dir)
    return StageResult([*_draft_files(ctx), ctx.draft / TRAINING_METRICS_FILE], details)


# --- evaluate -----------------------------------------------------------------------------------------------------


def fingerprint_evaluate(ctx: Context) -> StageFingerprint:
    inputs = {"heads": _draft_inputs(ctx), "data": source_identity(ctx.config.held_out)}
    return StageFingerprint(dict(ctx.config.eval), inputs)


def run_evaluate_stage(ctx: Context, fresh: bool) -> StageResult:
    """Runs whole every time: there is nothing to resume, so `fresh` changes nothing."""
    from medusa_forge.evaluate.cli import evaluate
    from medusa_forge.formats.tree_file import TREE_FILE

    config = eval_config(ctx.config, ctx.draft, ctx.eval_dir)
    (ctx.draft / TREE_FILE).unlink(missing_ok=True)  # a tree from an earlier evaluation must not survive
    evaluate(config)
    outputs = [ctx.eval_dir / EVAL_REPORT_FILE]
    if (ctx.draft / TREE_FILE).is_file():
        outputs.append(ctx.draft / TREE_FILE)
    return StageResult(outputs)


# --- export -------------------------------------------------------------------------------------------------------


def fingerprint_export(ctx: Context) -> StageFingerprint:
    from medusa_forge.formats.tree_file import TREE_FILE

    draft = _draft_inputs(ctx)
    if (ctx.draft / TREE_FILE).is_file():
        draft[TREE_FILE] = file_digest(ctx.draft / TREE_FILE)
    settings = {"formats": ctx.config.export.formats, "base_model_id": ctx.config.export.base_model_id}
    # "heads": the draft's key in the digests since before other kinds; renamed, every finished run would rerun.
    return StageFingerprint(settings, {"heads": draft})


def run_export_stage(ctx: Context, fresh: bool) -> StageResult:
    """Runs whole every time: there is nothing to resume, so `fresh` changes nothing."""
    from medusa_forge.export import export_draft

    outputs: list[Path] = []
    commands: dict[str, list[str]] = {}
    for fmt in ctx.config.export.formats:
        folder = ctx.export_dir(fmt)
        if folder.exists():
            shutil.rmtree(folder)  # ours: an export refuses a folder holding other weights
        result = export_draft(ctx.draft, fmt, folder, base_model_id=ctx.config.export.base_model_id)
        for note in result.notes:
            print(f"pipeline: export {fmt}: {note}", file=sys.stderr)
        commands[fmt] = result.serve_commands
        outputs += sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "README.md")
    ctx.serve_commands.write_text(json.dumps(commands, indent=2) + "\n")
    return StageResult([ctx.serve_commands, *outputs])


# --- push ---------------------------------------------------------------------------------------------------------


def fingerprint_push(ctx: Context) -> StageFingerprint | None:
    push = ctx.config.push
    if not push.repo:
        return None
    settings = {f.name: getattr(push, f.name) for f in fields(PushSection)}
    inputs = {"heads": _draft_inputs(ctx), "eval": file_digest(ctx.eval_dir / EVAL_REPORT_FILE)}
    return StageFingerprint(settings, inputs)


def run_push_stage(ctx: Context, fresh: bool) -> StageResult:
    """Runs whole every time: there is nothing to resume, so `fresh` changes nothing."""
    from medusa_forge.hub import push

    config = ctx.config.push
    result = push(ctx.draft, config.repo, config.private, config.revision, config.dry_run, config.base_model_id)
    for note in result.notes:
        print(f"pipeline: push: {note}", file=sys.stderr)
    record = ctx.workdir / "push.json"
    record.write_text(
        json.dumps({"repo": config.repo, "dry_run": config.dry_run, "files": result.files, "url": result.url}) + "\n"
    )
    return StageResult([record])


# --- report -------------------------------------------------------------------------------------------------------


def _report_inputs(ctx: Context) -> list[Path]:
    candidates = [
        ctx.draft / TRAINING_METRICS_FILE,
        ctx.draft / "training_curves.png",
        ctx.eval_dir / EVAL_REPORT_FILE,
        ctx.serve_commands,
        ctx.workdir / "push.json",
    ]
    return [p for p in candidates if p.is_file()]


def fingerprint_report(ctx: Context) -> StageFingerprint:
    """The report also shows every other stage's time: those are final once the report's turn comes."""
    inputs = {}
    for path in _report_inputs(ctx):
        inputs[str(path.relative_to(ctx.workdir))] = file_digest(path)
    times = {name: record.get("seconds") for name, record in ctx.state.get("stages", {}).items() if name != "report"}
    return StageFingerprint({"stage_seconds": times, "kind_note": ctx.kind_note}, inputs)


def run_report_stage(ctx: Context, fresh: bool) -> StageResult:
    """Runs whole every time: there is nothing to resume, so `fresh` changes nothing."""
    from medusa_forge.pipeline.report import write_pipeline_report

    return StageResult(write_pipeline_report(ctx))


@dataclass
class Stage:
    name: str
    title: str
    fingerprint: Callable[[Context], StageFingerprint | None]
    run: Callable[[Context, bool], StageResult]  # (context, fresh: start over instead of resuming)


PIPELINE = [
    Stage("distill", "self-distil: replay conversations against the model", fingerprint_distill, run_distill_stage),
    Stage("train", "train the draft on the frozen model", fingerprint_train, run_train_stage),
    Stage("evaluate", "choose the tree, measure acceptance and speed", fingerprint_evaluate, run_evaluate_stage),
    Stage("export", "write the engines' folders (export.formats)", fingerprint_export, run_export_stage),
    Stage("push", "upload to the Hub", fingerprint_push, run_push_stage),
    Stage("report", "write report.md", fingerprint_report, run_report_stage),
]
STAGES = tuple(stage.name for stage in PIPELINE)
