"""Train 3 heads on the embedded model (SmolLM2-135M) over a fixed small ShareGPT slice and report
tokens/s, seconds per epoch and final per-head top-1 on held-out conversations.

    .venv/bin/python bench/train_heads.py [--samples 48] [--epochs 2] [--max-length 512]

Uses the training command itself (`medusa_forge.train.run.train`), so it measures what users run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from medusa_forge.data.conversations import load_conversations
from medusa_forge.modeling import load_tokenizer
from medusa_forge.train.dataset import ConversationDataset
from medusa_forge.train.run import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-samples", type=int, default=50)
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args()

    tokenizer = load_tokenizer("smollm2")
    conversations = load_conversations("sharegpt", args.samples)
    dataset = ConversationDataset(conversations, tokenizer, args.max_length)  # what training keeps
    tokens = sum(len(item["input_ids"]) for item in dataset.all_items())
    output = Path(args.output_dir or tempfile.mkdtemp(prefix="medusa-bench-"))
    start = time.perf_counter()
    train(
        ["--model_name_or_path", "smollm2", "--data_path", "sharegpt", "--max_samples", str(args.samples),
         "--max_eval_samples", str(args.eval_samples), "--eval_strategy", "epoch", "--output_dir", str(output),
         "--num_train_epochs", str(args.epochs), "--per_device_train_batch_size", str(args.batch_size),
         "--model_max_length", str(args.max_length), "--learning_rate", "1e-3", "--warmup_ratio", "0.1",
         "--lr_scheduler_type", "cosine", "--logging_steps", "5", "--save_strategy", "no",
         "--medusa_num_heads", "3", "--medusa_num_layers", "1", "--disable_tqdm", "True", "--auto_resume", "False"]
    )  # fmt: skip
    wall = time.perf_counter() - start
    metrics = json.loads((output / "training_metrics.json").read_text())["final"]
    runtime = metrics["train_runtime"]
    report = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "conversations": len(dataset),
        "tokens_per_epoch": tokens,
        "epochs": args.epochs,
        "train_runtime_s": round(runtime, 1),
        "seconds_per_epoch": round(runtime / args.epochs, 1),
        "tokens_per_s": round(tokens * args.epochs / runtime, 1),
        "wall_s_including_load": round(wall, 1),
        "heldout_top1": {f"head{i}": round(metrics[f"eval_medusa{i}_top1"], 4) for i in range(3)},
        "heldout_top5": {f"head{i}": round(metrics[f"eval_medusa{i}_top5"], 4) for i in range(3)},
        "note": "train_runtime includes the per-epoch held-out evaluation",
        "heads_dir": str(output),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
