"""`medusa-forge <command> ...`: parses argv into the command's config and calls its `run_x(config)`.

Logging, and the exit for a user's mistake (`error: MESSAGE` on stderr, status 2), are set up here for every
command; a command's own statuses (distill 1: some conversations failed, 130: interrupted) come from its run.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from dataclasses import dataclass

from medusa_forge.errors import UserError
from medusa_forge.flags import parse_config


@dataclass(frozen=True)
class Command:
    module: str  # holds the config class and run function
    config: str  # config dataclass; argv -> config through medusa_forge.flags unless `parse` is set
    run: str  # run_x(config) -> exit status
    summary: str
    parse: str | None = None  # "module:function" parsing argv into the config instead (train: HfArgumentParser)
    log_level: int = logging.WARNING


COMMANDS = {
    "train": Command("medusa_forge.train.run", "TrainConfig", "run_train",
                     "train a draft (--draft_kind) on a frozen model (the original Medusa trainer's flags)",
                     parse="medusa_forge.train.args:parse_args"),
    "distill": Command("medusa_forge.distill.cli", "DistillConfig", "run_distill",
                       "replay conversations against the model and keep its replies"),
    "serve": Command("medusa_forge.serve", "ServeConfig", "run_serve",
                     "OpenAI-compatible chat completions server over the local model", log_level=logging.INFO),
    "generate": Command("medusa_forge.decode.cli", "GenerateConfig", "run_generate",
                        "generate with a draft; reports tokens/s and accepted tokens/step"),
    "eval": Command("medusa_forge.evaluate.cli", "EvalConfig", "run_eval",
                    "a draft's accuracy, accepted tokens per step and real speed-up vs greedy"),
    "export": Command("medusa_forge.export", "ExportConfig", "run_export",
                      "write a draft for the engines of its kind; prints the serve command"),
    "import": Command("medusa_forge.drafts.medusa_import", "ImportConfig", "run_import",
                      "convert Medusa heads from any known layout (.pt, version 2, vLLM, ...) to ours"),
    "push": Command("medusa_forge.hub", "PushConfig", "run_push",
                    "validate a draft folder, refresh its model card and upload it to the Hub"),
    "pipeline": Command("medusa_forge.pipeline.commands", "PipelineRunConfig", "run_pipeline_command",
                        "distil -> train -> eval (tree) -> export -> report; re-runs skip, resume"),
    "quickstart": Command("medusa_forge.pipeline.commands", "QuickstartConfig", "run_quickstart",
                          "the pipeline on the embedded model and data (~15 min CPU)"),
}  # fmt: skip


def parse_command(name: str, argv: list[str]):
    """argv (after the command name) -> the command's validated config."""
    command = COMMANDS[name]
    module = importlib.import_module(command.module)
    if command.parse:
        parse_module, function = command.parse.split(":")
        return getattr(importlib.import_module(parse_module), function)(argv)
    return parse_config(getattr(module, command.config), argv, f"medusa-forge {name}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: medusa-forge <command> [flags]   (medusa-forge <command> --help for its flags)\n\ncommands:")
        for name, command in COMMANDS.items():
            print(f"  {name:<10} {command.summary}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    command = COMMANDS[name]
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=command.log_level)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        config = parse_command(name, rest)
        return getattr(importlib.import_module(command.module), command.run)(config)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
