"""`medusa-forge pipeline`: distil -> train -> evaluate -> export -> push -> report in one work folder (run.py)."""

from medusa_forge.pipeline.run import (
    QUICKSTART,
    STAGES,
    PipelineConfig,
    PipelineRunConfig,
    QuickstartConfig,
    StageFailed,
    load_config,
    run_pipeline,
    run_pipeline_command,
    run_quickstart,
)

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
