"""`medusa-forge pipeline`: distil -> train -> evaluate -> export -> push -> report in one work folder.

configuration.py (PipelineConfig, YAML, --set, each stage's command config), fingerprints.py, context.py,
stages.py, eta.py, runner.py (the driver loop, state and log), commands.py (`pipeline`, `quickstart`),
quickstart.py (the quickstart's sizes), report.py (report.md)."""

from medusa_forge.pipeline.commands import (
    PipelineRunConfig,
    QuickstartConfig,
    run_pipeline_command,
    run_quickstart,
)
from medusa_forge.pipeline.configuration import PipelineConfig, load_config
from medusa_forge.pipeline.quickstart import QUICKSTART
from medusa_forge.pipeline.runner import run_pipeline
from medusa_forge.pipeline.stages import STAGES, StageFailed

__all__ = [
    "QUICKSTART",
    "STAGES",
    "PipelineConfig",
    "PipelineRunConfig",
    "QuickstartConfig",
    "StageFailed",
    "load_config",
    "run_pipeline",
    "run_pipeline_command",
    "run_quickstart",
]
