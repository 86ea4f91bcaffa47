"""Training memory per step: resident memory (RSS) of a `medusa-forge train` run at every optimisation step, for
Medusa heads and an EAGLE-3 draft, over whole epochs (issue 27).

    .venv/bin/python bench/train_memory.py --kinds eagle3,medusa --samples 500 --max-length 384 --epochs 2 --bf16

Each kind trains in its own process (so its memory is its own) with the hidden-state cache on (the cache is built
first, or reused; `--cache-first` builds it in a run of one step beforehand, so that the measured run trains from a
complete cache: since issue 24 such a run never loads the target's layers); this script samples the process's
VmRSS every 50 ms and, at each step (`--logging_steps 1` prints one line per step), records the highest RSS seen
since the previous step. Reported per kind: RSS after the warm-up steps, at the end, the peak over training, the
peak of the whole process (model or stand-in load included), the growth per step over the second half (a
least-squares slope: ~0 when memory is flat), and the median step time. Run it on an idle machine for the step times.
`--primitive-probe` instead measures what oneDNN keeps per distinct product shape (no training).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

STEP_LINE = re.compile(r"^step (\d+) \| loss ")


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """Resident memory of `pid` (0 once it has exited): VmRSS in all, or its part RssAnon (the process's own
    memory) or RssFile (pages of mapped files, such as a memory-mapped hidden-state cache)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


class RssSampler(threading.Thread):
    """Polls a process's RSS; `take()` returns the highest value since the previous `take()`."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.high, self.overall, self.stopped = 0, 0, threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        while not self.stopped.is_set():
            rss = rss_bytes(self.pid)
            with self.lock:
                self.high, self.overall = max(self.high, rss), max(self.overall, rss)
            time.sleep(self.interval)

    def take(self) -> int:
        with self.lock:
            high, self.high = self.high, rss_bytes(self.pid)
        return max(high, self.high)


def slope(ys: list[float]) -> float:
    """Least-squares growth per step of ys (one value per step)."""
    n = len(ys)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(ys) / n
    return sum((x - mean_x) * (y - mean_y) for x, y in enumerate(ys)) / sum((x - mean_x) ** 2 for x in range(n))


def train_one(kind: str, out: Path, args: argparse.Namespace, *extra: str) -> dict:
    command = [
        sys.executable, "-m", "medusa_forge.cli", "train", "--draft_kind", kind, "--model_name_or_path", args.model,
        "--data_path", args.data, "--max_samples", str(args.samples), "--model_max_length", str(args.max_length),
        "--per_device_train_batch_size", str(args.batch_size), "--bf16", str(args.bf16),
        *(["--eagle3_ttt_steps", "3"] if kind == "eagle3" else []),  # a Medusa run refuses EAGLE-3's flags
        "--num_train_epochs", str(args.epochs), "--learning_rate", "1e-3",
        "--logging_steps", "1", "--disable_tqdm", "True", "--save_strategy", "no", "--eval_strategy", "no",
        "--auto_resume", "False", "--overwrite_output_dir", "True", "--output_dir", str(out / kind),
    ]  # fmt: skip
    if args.cache_dir:
        command += ["--medusa_hidden_cache_dir", args.cache_dir]
    command += extra
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    sampler = RssSampler(process.pid)
    sampler.start()
    steps: list[dict] = []
    assert process.stdout is not None
    for line in process.stdout:
        match = STEP_LINE.match(line)
        if match:
            # The first step's peak includes everything before training (model load, cache build).
            steps.append({
                "step": int(match.group(1)), "time": time.perf_counter(), "rss": sampler.take(),
                "anon": rss_bytes(process.pid, "RssAnon"), "file": rss_bytes(process.pid, "RssFile"),
            })  # fmt: skip
        elif args.verbose:
            print(line, end="")
    if process.wait() != 0:
        raise SystemExit(f"{kind}: training failed ({process.returncode})")
    sampler.stopped.set()
    gb = [s["rss"] / 1e9 for s in steps]
    step_seconds = [b["time"] - a["time"] for a, b in zip(steps, steps[1:], strict=False)]
    warm = min(args.warmup, len(steps) - 1)
    second_half = gb[len(gb) // 2 :]
    return {
        "kind": kind,
        "steps": len(steps),
        "rss_gb_after_warmup": round(gb[warm], 3),
        "rss_gb_end": round(gb[-1], 3),
        "peak_rss_gb_training": round(max(gb[warm:]), 3),
        "peak_rss_gb_process": round(sampler.overall / 1e9, 3),
        "growth_mb_per_step_second_half": round(slope(second_half) * 1e3, 2),
        "median_step_s": round(statistics.median(step_seconds[warm:]), 3) if len(step_seconds) > warm else None,
        "rss_gb_per_step": [round(x, 3) for x in gb],
        "rss_anon_gb_per_step": [round(s["anon"] / 1e9, 3) for s in steps],
        "rss_file_gb_per_step": [round(s["file"] / 1e9, 3) for s in steps],
    }


def primitive_probe(products: int = 200) -> None:
    """How much memory oneDNN keeps per product shape, on any CPU: float32 [rows, 576] x [576, 8192] products through
    oneDNN (mkldnn tensors: the path bfloat16 products take on CPUs with native bfloat16), once with `products`
    different row counts, once with one row count; RssAnon before and after each."""
    import random

    import torch

    weight = torch.randn(8192, 576).to_mkldnn()
    for label, rows in (
        ("one shape", [1024] * products),
        ("distinct shapes", random.Random(0).sample(range(1, 1537), products)),
    ):
        before = rss_bytes(os.getpid(), "RssAnon")
        for n in rows:
            torch._C._nn.mkldnn_linear(torch.randn(n, 576).to_mkldnn(), weight)
        after = rss_bytes(os.getpid(), "RssAnon")
        print(
            f"{label}: {products} products, RssAnon {before / 1e6:.0f} -> {after / 1e6:.0f} MB "
            f"({(after - before) / 1e6 / len(set(rows)):.2f} MB per distinct shape)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="eagle3,medusa")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", default="sharegpt")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--bf16", action="store_true", help="--bf16 True (applies only where bfloat16 is native)")
    parser.add_argument("--warmup", type=int, default=10, help="steps before memory counts as warmed up")
    parser.add_argument("--cache-dir", help="--medusa_hidden_cache_dir (default: the user cache)")
    parser.add_argument("--cache-first", action="store_true", help="build the cache in a one-step run first")
    parser.add_argument("--output-dir", default="runs/bench-memory")
    parser.add_argument("--output", help="Write the results (with RSS per step) as JSON here too.")
    parser.add_argument("--verbose", action="store_true", help="echo the training output")
    parser.add_argument("--primitive-probe", action="store_true", help="only measure oneDNN's memory per shape")
    args = parser.parse_args()
    if args.primitive_probe:
        primitive_probe()
        return
    if args.cache_first:
        for kind in args.kinds.split(","):
            train_one(kind, Path(args.output_dir), args, "--max_steps", "1")
    results = [train_one(kind, Path(args.output_dir), args) for kind in args.kinds.split(",")]
    print(
        "| kind | steps | RSS after warm-up GB | RSS at end GB | peak in training GB | peak of the process GB | "
        "MB/step (2nd half) | step s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['kind']} | {r['steps']} | {r['rss_gb_after_warmup']} | {r['rss_gb_end']} | "
            f"{r['peak_rss_gb_training']} | {r['peak_rss_gb_process']} | {r['growth_mb_per_step_second_half']} | "
            f"{r['median_step_s']} |"
        )
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
