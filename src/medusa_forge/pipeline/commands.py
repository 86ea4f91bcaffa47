"""`medusa-forge pipeline` and `medusa-forge quickstart`: their config dataclasses and run functions, which load
the configuration, run the stages and print the summary (or how to resume)."""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass, field
from typing import ClassVar

from medusa_forge.drafts import get_kind
from medusa_forge.errors import UserError
from medusa_forge.pipeline.configuration import load_config, parse_override
from medusa_forge.pipeline.context import Context
from medusa_forge.pipeline.eta import format_seconds
from medusa_forge.pipeline.quickstart import QUICKSTART, QUICKSTART_WORKDIR, kind_reason, quickstart_config
from medusa_forge.pipeline.runner import run_pipeline
from medusa_forge.pipeline.stages import STAGES, StageFailed
from medusa_forge.results import DRAFT_RUN, EVAL_REPORT_FILE, EvalReport


@dataclass
class _RunOptions:
    """The flags `pipeline` and `quickstart` share; re-runs skip finished stages and resume an interrupted one."""

    COMMAND: ClassVar[str] = ""

    workdir: str = field(
        default=QUICKSTART_WORKDIR, metadata={"help": "Folder for every stage's inputs, outputs, state and the report."}
    )
    overrides: list[str] = field(
        default_factory=list,
        metadata={
            "flag": "--set",
            "metavar": "KEY=VALUE",
            "help": "Override a config key (value read as YAML), e.g. --set train.num_train_epochs=2 "
            "--set eval.max_prompts=3",
        },
    )
    force_from: str | None = field(
        default=None,
        metadata={"flag": "--from", "choices": STAGES, "help": "Run this stage and all later ones again."},
    )

    def __post_init__(self) -> None:
        if self.force_from is not None and self.force_from not in STAGES:
            raise UserError(f"--from {self.force_from}: choose one of {', '.join(STAGES)}")

    def _flags(self) -> list[str]:
        """The command's own flags before --workdir in command_line."""
        return []

    @property
    def command_line(self) -> str:
        """The command that runs this again (and resumes where it stopped)."""
        argv = ["medusa-forge", self.COMMAND, *self._flags(), "--workdir", self.workdir]
        for override in self.overrides:
            argv += ["--set", override]
        if self.force_from:
            argv += ["--from", self.force_from]
        return shlex.join(argv)


@dataclass
class QuickstartConfig(_RunOptions):
    """The embedded default end to end (SmolLM2 + ShareGPT), sized for ~15 minutes on a 2-core CPU: re-runs skip
    finished stages and resume an interrupted one."""

    COMMAND: ClassVar[str] = "quickstart"

    draft_kind: str | None = field(
        default=None,
        metadata={
            "choices": list(QUICKSTART["kinds"]),
            "help": f"Train Medusa heads (medusa) or an EAGLE-3 draft (eagle3), each with the settings measured for "
            f"the quickstart's budget; default {QUICKSTART['default_kind']}: {QUICKSTART['why']}.",
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        quickstart_config(self.draft_kind)  # an unknown kind fails here, naming the flag
        if any(parse_override(text)[0] == ["draft_kind"] for text in self.overrides):
            raise UserError("--set draft_kind=...: use --draft-kind, which also selects that kind's quickstart "
                            "settings")  # fmt: skip

    def _flags(self) -> list[str]:
        return ["--draft-kind", self.draft_kind] if self.draft_kind else []


@dataclass
class PipelineRunConfig(_RunOptions):
    """Distil -> train -> evaluate (choose the tree) -> export -> push (if asked) -> report, re-runs skip finished
    stages and resume an interrupted one. The draft's kind is the config key draft_kind (medusa, eagle3 or dflash)."""

    COMMAND: ClassVar[str] = "pipeline"

    workdir: str = field(
        default="runs/pipeline", metadata={"help": "Folder for every stage's inputs, outputs, state and the report."}
    )
    config: str | None = field(
        default=None, metadata={"help": "YAML config (see pipeline.example.yaml); default: all defaults."}
    )

    def _flags(self) -> list[str]:
        return ["--config", self.config] if self.config else []


def _summary(ctx: Context) -> list[str]:
    lines = [f"report: {ctx.workdir / 'report.md'}"]
    eval_json = ctx.eval_dir / EVAL_REPORT_FILE
    if eval_json.is_file():
        report = EvalReport.load(eval_json)
        speed, tps = report.speed, report.speed.tokens_per_second
        lines.insert(
            0,
            f"{get_kind(report.draft_kind).label}: mean accepted tokens per step "
            f"{report.acceptance.mean_accept_length:.2f}; {tps[DRAFT_RUN]:.1f} tokens/s in {speed.dtype} vs "
            f"{speed.reference} {tps[speed.reference]:.1f} ({speed.draft_speedup:.2f}x); outputs equal to greedy "
            f"in {speed.dtype}: {speed.outputs_equal}",
        )
    total = sum(r.get("seconds", 0.0) for r in ctx.state["stages"].values())
    lines.append(f"time in stages (all runs): {format_seconds(total)}")
    commands = ctx.serve_commands
    if commands.is_file():
        for fmt, cmds in json.loads(commands.read_text()).items():
            lines.append(f"serve with {fmt}: {cmds[0]}")
    return lines


def _run(options: _RunOptions, path: str | None, base: dict | None, kind_note: str | None = None) -> int:
    """Load the config, run the stages, print the summary; a failed stage exits 1, Ctrl-C 130 (both say how to
    resume). kind_note: why the draft is of its kind, for the report."""
    resume = options.command_line
    try:
        config = load_config(path, options.overrides, base)
        ctx = run_pipeline(config, options.workdir, resume, options.force_from, kind_note)
    except StageFailed as err:
        print(f"error: stage {err.stage} failed: {err.reason}", file=sys.stderr)
        print(f"finished stages are kept; after fixing it, resume with:\n  {resume}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished stages are kept and this one resumes; continue with:\n  {resume}",
              file=sys.stderr)  # fmt: skip
        return 130
    print("\n".join(_summary(ctx)))
    return 0


def run_pipeline_command(config: PipelineRunConfig) -> int:
    """`medusa-forge pipeline`: the YAML config (or all defaults) plus --set overrides."""
    return _run(config, config.config, None)


def run_quickstart(config: QuickstartConfig) -> int:
    """`medusa-forge quickstart`: QUICKSTART's config for the chosen kind of draft, plus --set overrides."""
    return _run(config, None, quickstart_config(config.draft_kind), kind_reason(config.draft_kind))
