"""Training speed and quality: the original recipe vs medusa-forge's defaults, same data, same epochs.

    .venv/bin/python bench/train_speed.py [--data runs/distill-bench.jsonl] [--epochs 5] [--configs baseline,defaults]

Each configuration trains 3 heads on the embedded model (SmolLM2-135M) in its own process (so peak memory is
its own), then is scored the same way: teacher-forced top-1 per head on held-out ShareGPT conversations, and
mean accepted length of greedy Medusa decoding with one fixed tree on held-out prompts.
The data set is self-distilled by `medusa-forge distill` on first use (first user turn of the training
conversations, greedy replies of at most 200 tokens, enough for --samples), then reused and extended as needed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

# baseline = the original recipe: base model recomputed every step, hard labels, equal weights, full heads.
FULL = ["--medusa_draft_vocab_size", "0"]
CONFIGS = {
    "baseline": ["--medusa_hidden_cache", "False", "--medusa_soft_labels", "False",
                 "--medusa_freeze_projection", "False", "--medusa_decay_coefficient", "1.0", *FULL],
    "defaults": [],
    "cache": ["--medusa_hidden_cache", "True", *FULL],
    "cache+soft": ["--medusa_hidden_cache", "True", "--medusa_soft_labels", "True", *FULL],
    "cache+frozen": ["--medusa_hidden_cache", "True", "--medusa_freeze_projection", "True", *FULL],
    "cache+draft8k": ["--medusa_hidden_cache", "True", "--medusa_draft_vocab_size", "8192"],
    "cache+draft8k+soft": ["--medusa_hidden_cache", "True", "--medusa_draft_vocab_size", "8192",
                           "--medusa_soft_labels", "True"],
    "cache+draft8k+frozen": ["--medusa_hidden_cache", "True", "--medusa_draft_vocab_size", "8192",
                             "--medusa_freeze_projection", "True"],
    "cache+draft8k+decay0.8": ["--medusa_hidden_cache", "True", "--medusa_draft_vocab_size", "8192",
                               "--medusa_decay_coefficient", "0.8"],
}  # fmt: skip


def ensure_data(path: Path, samples: int) -> Path:
    """Distil (or extend, resuming) until the file holds `samples` conversations; prompts that leave no room for
    a reply within 512 tokens are skipped, hence the margin."""
    if not path.is_file() or sum(1 for _ in path.open()) < samples:
        subprocess.run(
            [sys.executable, "-m", "medusa_forge.cli", "distill", "--input-filename", "sharegpt", "--output-filename",
             str(path), "--max-samples", str(samples * 5 // 4 + 8), "--max-new-tokens", "200", "--max-turns", "1",
             "--temperature", "0", "--concurrency", "16", "--max-context", "512"],
            check=True,
        )  # fmt: skip
    return path


def train_one(name: str, data: Path, out: Path, args: argparse.Namespace) -> dict:
    command = [
        sys.executable, "-m", "medusa_forge.train", "--model_name_or_path", "smollm2", "--data_path", str(data),
        "--max_samples", str(args.samples), "--output_dir", str(out), "--num_train_epochs", str(args.epochs),
        "--per_device_train_batch_size", "4",
        "--model_max_length", str(args.max_length), "--learning_rate", str(args.learning_rate), "--warmup_ratio", "0.1",
        "--lr_scheduler_type", "cosine", "--logging_steps", "10", "--save_strategy", "no", "--eval_strategy", "no",
        "--medusa_num_heads", "3", "--medusa_num_layers", "1", "--disable_tqdm", "True", "--auto_resume", "False",
        "--medusa_hidden_cache_dir", str(out / "hidden-cache"), *CONFIGS[name],
    ]  # fmt: skip
    start = time.perf_counter()
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{name}: training failed ({status})")
    metrics = json.loads((out / "training_metrics.json").read_text())
    return {
        "total_seconds": round(wall, 1),
        "hidden_cache_seconds": round(metrics["final"]["hidden_cache_seconds"], 1),
        "epoch_seconds": [round(s, 1) for s in metrics["epoch_seconds"]],
        "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2),
    }


def score(out: Path, args: argparse.Namespace) -> dict:
    from medusa_forge.data.conversations import load_conversations
    from medusa_forge.decode.generation import SpeculativeDecoder
    from medusa_forge.decode.loading import load_draft
    from medusa_forge.drafts.medusa_drafter import MedusaDrafter
    from medusa_forge.evaluate.accuracy import measure_accuracy
    from medusa_forge.evaluate.speed import first_prompts
    from medusa_forge.formats.tree_file import default_choices

    loaded = load_draft(out, device="cpu")  # the heads rank their trained draft vocabulary, as they decode
    model, tokenizer = loaded.draft.model, loaded.tokenizer
    draft = model.heads.config.draft_vocab_size
    heldout = load_conversations("sharegpt-heldout", args.eval_conversations)
    accuracy = measure_accuracy(loaded.draft, tokenizer, heldout, args.max_length, progress=False)
    prompts = first_prompts(tokenizer, heldout, args.eval_prompts, 384)

    def accepted_length(draft_vocab: int | None) -> float:
        decoder = SpeculativeDecoder(model.base, MedusaDrafter(model, draft_vocab), default_choices(16, 3))
        steps = tokens = 0
        for prompt in prompts:
            result = decoder.generate(prompt, args.max_new_tokens, eos_token_ids={tokenizer.eos_token_id})
            steps, tokens = steps + result.steps, tokens + sum(result.accept_lengths)
        return round(tokens / steps, 3)

    scores = {
        "heldout_top1": [round(a.top(1), 4) for a in accuracy[1:]],
        "mean_accepted_length": accepted_length(draft),
    }
    if draft and not args.skip_full_vocab:  # what an engine proposing from the whole vocabulary (TGI) gets
        scores["mean_accepted_length_full_vocab"] = accepted_length(model.base.get_output_embeddings().weight.shape[0])
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="runs/distill-bench.jsonl")
    parser.add_argument("--samples", type=int, default=64, help="Conversations trained on (of the data file).")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="The tutorial's 1e-3.")
    parser.add_argument("--skip-full-vocab", action="store_true", help="Score draft-vocabulary heads only as trained.")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--configs", default="baseline,defaults")
    parser.add_argument("--eval-conversations", type=int, default=30)
    parser.add_argument("--eval-prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--output-dir", default="runs/train-speed")
    args = parser.parse_args()
    data = ensure_data(Path(args.data), args.samples)
    results = {}
    for name in args.configs.split(","):
        out = Path(args.output_dir) / name
        results[name] = {**train_one(name, data, out, args), **score(out, args)}
        print(json.dumps({name: results[name]}), flush=True)
    if "baseline" in results:
        base = results["baseline"]
        results["vs_baseline"] = {
            name: {
                "time_ratio": round(base["total_seconds"] / r["total_seconds"], 2),
                "accepted_length_ratio": round(r["mean_accepted_length"] / base["mean_accepted_length"], 3),
            }
            for name, r in list(results.items())
            if name != "baseline"
        }
    results["machine"] = f"{os.cpu_count()} cores, torch {torch.__version__}, load avg {os.getloadavg()[0]:.1f}"
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
