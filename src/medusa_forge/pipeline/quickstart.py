"""`medusa-forge quickstart`: the pipeline on the embedded default; its sizes live in run.QUICKSTART."""

from medusa_forge.pipeline.run import quickstart_main


def cli_main(argv: list[str]) -> int:
    return quickstart_main(argv)
