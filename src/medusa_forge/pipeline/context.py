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

    @property
    def distilled(self) -> Path:
        return self.workdir / "distill" / "conversations.jsonl"

    @property
    def train_data(self) -> str:
        return str(self.distilled) if self.config.distill.enabled else self.config.data

    @property
    def heads(self) -> Path:
        return self.workdir / "heads"

    @property
    def eval_dir(self) -> Path:
        return self.heads / "eval"

    def export_dir(self, fmt: str) -> Path:
        return self.workdir / "export" / fmt

    @property
    def serve_commands(self) -> Path:
        return self.workdir / "export" / "serve_commands.json"
