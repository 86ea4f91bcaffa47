"""`medusa-forge <command> ...`: parses the command name and hands the rest to the command's module."""

from __future__ import annotations

import importlib
import sys

# command -> (module with cli_main(argv) -> int, one-line help)
COMMANDS = {
    "train": ("medusa_forge.train.run", "train Medusa heads on a frozen model (the tutorial's flags)"),
    "distill": ("medusa_forge.distill.cli", "replay conversations against the model and keep its replies"),
    "serve": ("medusa_forge.serve", "OpenAI-compatible chat completions server over the local model"),
    "generate": ("medusa_forge.decode.cli", "generate with Medusa heads; reports tokens/s and accepted tokens/step"),
    "eval": ("medusa_forge.evaluate.cli", "head accuracy, accepted tokens per step and real speed-up vs greedy"),
    "export": ("medusa_forge.export", "write heads for TGI, vLLM or TensorRT-LLM; prints the serve command"),
    "import": ("medusa_forge.import_heads", "convert heads from any known layout (.pt, version 2, vLLM, ...) to ours"),
    "push": ("medusa_forge.hub", "validate a heads folder, refresh its model card and upload it to the Hub"),
    "pipeline": ("medusa_forge.pipeline", "distil -> train -> eval (tree) -> export -> report; re-runs skip, resume"),
    "quickstart": ("medusa_forge.pipeline.quickstart", "the pipeline on the embedded model and data (~15 min CPU)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: medusa-forge <command> [flags]   (medusa-forge <command> --help for its flags)\n\ncommands:")
        for name, (_, summary) in COMMANDS.items():
            print(f"  {name:<10} {summary}")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return module.cli_main(rest)


if __name__ == "__main__":
    sys.exit(main())
