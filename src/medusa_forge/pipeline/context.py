"""What every stage reads: the configuration, where each stage's files live in the work folder, and the state of
the run (the runner writes it; stages only read it: the report shows every stage's time and details)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from medusa_forge.pipeline.configuration import PipelineConfig


@dataclass
class Context:
    config: PipelineConfig
    workdir: Path
    resume_command: str  # the command that runs this again (the report prints it)
    state: dict = field(default_factory=dict)  # pipeline-state.json's content, kept current by the runner
    kind_note: str | None = None  # why the draft is of its kind (the quickstart says); None: the config's key

    @property
    def distilled(self) -> Path:
        return self.workdir / "distill" / "conversations.jsonl"

    @property
    def train_data(self) -> str:
        return str(self.distilled) if self.config.distill.enabled else self.config.data

    @property
    def draft(self) -> Path:
        """The trained draft (Medusa heads or an EAGLE-3 draft). Named heads/ since before EAGLE-3 drafts: the
        state records outputs by path, so a work folder from then still skips or resumes its finished stages."""
        return self.workdir / "heads"

    @property
    def eval_dir(self) -> Path:
        return self.draft / "eval"

    def export_dir(self, fmt: str) -> Path:
        return self.workdir / "export" / fmt

    @property
    def serve_commands(self) -> Path:
        return self.workdir / "export" / "serve_commands.json"
