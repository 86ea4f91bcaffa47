"""`medusa-forge pipeline` and `medusa-forge quickstart`: their config dataclasses and run functions, which load
the configuration, run the stages and print the summary (or how to resume)."""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass, field
from typing import ClassVar

from medusa_forge.errors import UserError
from medusa_forge.pipeline.configuration import load_config
from medusa_forge.pipeline.context import Context
from medusa_forge.pipeline.eta import format_seconds
from medusa_forge.pipeline.quickstart import QUICKSTART, QUICKSTART_WORKDIR
from medusa_forge.pipeline.runner import run_pipeline
from medusa_forge.pipeline.stages import STAGES, StageFailed
from medusa_forge.results import DRAFT_RUN, EVAL_REPORT_FILE, EvalReport


@dataclass
class QuickstartConfig:
    """The embedded default end to end (SmolLM2 + ShareGPT), sized for ~15 minutes on a 2-core CPU: re-runs skip
    finished stages and resume an interrupted one."""

    COMMAND: ClassVar[str] = "quickstart"

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

    @property
    def command_line(self) -> str:
        """The command that runs this again (and resumes where it stopped)."""
        argv = ["medusa-forge", self.COMMAND]
        if getattr(self, "config", None):
            argv += ["--config", self.config]
        argv += ["--workdir", self.workdir]
        for override in self.overrides:
            argv += ["--set", override]
        if self.force_from:
            argv += ["--from", self.force_from]
        return shlex.join(argv)


@dataclass
class PipelineRunConfig(QuickstartConfig):
    """Distil -> train -> evaluate (choose the tree) -> export -> push (if asked) -> report, re-runs skip finished
    stages and resume an interrupted one."""

    COMMAND: ClassVar[str] = "pipeline"

    workdir: str = field(
        default="runs/pipeline", metadata={"help": "Folder for every stage's inputs, outputs, state and the report."}
    )
    config: str | None = field(
        default=None, metadata={"help": "YAML config (see pipeline.example.yaml); default: all defaults."}
    )


def _summary(ctx: Context) -> list[str]:
    lines = [f"report: {ctx.workdir / 'report.md'}"]
    eval_json = ctx.eval_dir / EVAL_REPORT_FILE
    if eval_json.is_file():
        report = EvalReport.load(eval_json)
        speed = report.speed
        lines.insert(
            0,
            f"mean accepted tokens per step {report.acceptance.mean_accept_length:.2f}; draft ({speed.dtype}) "
            f"{speed.tokens_per_second[DRAFT_RUN]:.1f} tokens/s vs {speed.reference} "
            f"{speed.tokens_per_second[speed.reference]:.1f} ({speed.draft_speedup:.2f}x); outputs equal to greedy "
            f"in {speed.dtype}: {speed.outputs_equal}",
        )
    total = sum(r.get("seconds", 0.0) for r in ctx.state["stages"].values())
    lines.append(f"time in stages (all runs): {format_seconds(total)}")
    commands = ctx.serve_commands
    if commands.is_file():
        for fmt, cmds in json.loads(commands.read_text()).items():
            lines.append(f"serve with {fmt}: {cmds[0]}")
    return lines


def _run(options: QuickstartConfig, path: str | None, base: dict | None) -> int:
    """Load the config, run the stages, print the summary; a failed stage exits 1, Ctrl-C 130 (both say how to
    resume)."""
    resume = options.command_line
    try:
        ctx = run_pipeline(load_config(path, options.overrides, base), options.workdir, resume, options.force_from)
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
    """`medusa-forge quickstart`: the QUICKSTART config plus --set overrides."""
    return _run(config, None, QUICKSTART)
