"""The quickstart's sizes, all in one place: `medusa-forge quickstart` is the pipeline with this config.

Chosen by measurement on a 2-core CPU (BENCHMARKS.md, "Quickstart"): change them here. Training flags not named
here take the train command's own defaults."""

from __future__ import annotations

QUICKSTART: dict = {
    "model": "smollm2",
    "data": "sharegpt",
    # No generation: on a CPU, ShareGPT's own text with soft labels trains better heads per minute than
    # self-distilled replies (BENCHMARKS.md, "Quickstart"). With a GPU server, distil (pipeline.example.yaml).
    "distill": {"enabled": False},
    "train": {
        "max_samples": 500,
        "num_train_epochs": 3,
        "learning_rate": 3e-3,
        "medusa_soft_labels": True,
        "per_device_train_batch_size": 4,
        "model_max_length": 384,
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
    "export": {"formats": ["tgi", "vllm"]},
}
QUICKSTART_WORKDIR = "runs/quickstart"
