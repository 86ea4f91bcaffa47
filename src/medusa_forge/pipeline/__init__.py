"""`medusa-forge pipeline`: distil -> train -> evaluate -> export -> push -> report in one work folder (run.py)."""

from medusa_forge.pipeline.run import (
    QUICKSTART,
    STAGES,
    PipelineConfig,
    StageFailed,
    cli_main,
    load_config,
    quickstart_main,
    run_pipeline,
)

__all__ = [
    "QUICKSTART",
    "STAGES",
    "PipelineConfig",
    "StageFailed",
    "cli_main",
    "load_config",
    "quickstart_main",
    "run_pipeline",
]
