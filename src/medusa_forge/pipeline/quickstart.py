"""The quickstart's sizes, all in one place: `medusa-forge quickstart` is the pipeline with this config.

Chosen by measurement on a 2-core CPU (BENCHMARKS.md, "Quickstart" and the EAGLE-3 section): change them here.
QUICKSTART holds the settings shared by both kinds of draft, each kind's own training/eval settings (merged over
the shared ones section by section; export writes each kind's default engines), the kind the quickstart trains
unless `--draft-kind` says otherwise, and why. Training flags not named here take the train command's own
defaults.
"""

from __future__ import annotations

import copy

from medusa_forge.errors import UserError

# Keyed by the registry's kind names on purpose: these are measured settings (data, like BENCHMARKS.md), not a
# switch on the kind; the quickstart offers exactly the kinds measured here, and a new kind joins with its numbers.
QUICKSTART: dict = {
    # The kind trained without --draft-kind, and the measurement behind that choice (the report prints it).
    "default_kind": "eagle3",
    "why": "at the quickstart's budget on a 2-core CPU, from the same data and in about the same training minutes, an "
    "EAGLE-3 draft measured 1.46 accepted tokens per step and 1.07x over the fastest plain greedy, EAGLE 3.1 1.41 "
    "and 1.06x, Medusa heads 1.42 and 1.04x, a DFlash draft 1.31 and 0.94x (BENCHMARKS.md, 'Every kind of draft at "
    "the quickstart's budget'); every current engine serves EAGLE-3",
    "shared": {
        "model": "smollm2",
        "data": "sharegpt",
        # No generation: on a CPU, ShareGPT's own text with soft labels trains drafts at least as well per minute
        # as self-distilled replies (BENCHMARKS.md, "Quickstart" and "What did not lift the EAGLE-3 draft"). With a
        # GPU server, distil (pipeline.example.yaml).
        "distill": {"enabled": False},
        # The same data for both kinds (500 ShareGPT conversations at 384 tokens, batches of 4); bfloat16 where the
        # CPU multiplies it natively (elsewhere train falls back to float32 with a warning): there the frozen pass
        # is 3.5x and an EAGLE-3 training step ~1.7x faster, head training about as fast (BENCHMARKS.md, "bfloat16
        # on a CPU ..."); the logging and checkpoint cadence is result-neutral (not part of any fingerprint).
        "train": {
            "max_samples": 500,
            "model_max_length": 384,
            "per_device_train_batch_size": 4,
            "bf16": True,
            "logging_steps": 10,
            "save_steps": 100,
            "disable_tqdm": False,
        },
        "eval": {
            "max_prompts": 5,
            "max_new_tokens": 96,
            "calibration_prompts": 3,
            "max_conversations": 10,
            "max_length": 512,
            "tree_sizes": "4,8,16,32",
        },
    },
    "kinds": {
        "medusa": {
            "train": {"num_train_epochs": 3, "learning_rate": 3e-3, "medusa_soft_labels": True},
        },
        "eagle3": {
            "train": {"eagle3_ttt_steps": 3, "num_train_epochs": 2, "learning_rate": 1e-3},
            "eval": {"depth": 4},
        },
        # A block of 5 (4 drafted tokens, EAGLE-3's eval depth) and the epochs that take about EAGLE-3's 2 epochs'
        # minutes: one pass over a block trains faster than 3 training-time-test steps (BENCHMARKS.md, "Every kind
        # of draft at the quickstart's budget").
        "dflash": {
            "train": {"dflash_block_size": 5, "num_train_epochs": 3.5, "learning_rate": 1e-3},
            "eval": {"depth": 4},
        },
    },
}
QUICKSTART_WORKDIR = "runs/quickstart"


def quickstart_config(kind: str | None = None) -> dict:
    """The pipeline config (as from YAML) the quickstart runs for `kind` (None: QUICKSTART's default kind)."""
    kind = kind or QUICKSTART["default_kind"]
    kinds = QUICKSTART["kinds"]
    if kind not in kinds:
        raise UserError(f"--draft-kind {kind}: choose one of {', '.join(kinds)}")
    config = copy.deepcopy(QUICKSTART["shared"])
    for section, values in kinds[kind].items():
        config[section] = {**config.get(section, {}), **copy.deepcopy(values)}
    return {**config, "draft_kind": kind}


def kind_reason(forced: str | None) -> str:
    """Why the quickstart trains the kind it does, for its report: the flag, or QUICKSTART's measured choice."""
    if forced and forced != QUICKSTART["default_kind"]:
        return f"chosen with `--draft-kind {forced}` (the quickstart's default is {QUICKSTART['default_kind']})"
    return f"the quickstart's default: {QUICKSTART['why']}"
