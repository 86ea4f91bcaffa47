"""Scale bench (issue 24, part 5): an 8B-shaped target (Llama-3.1-8B's shape: hidden 4096, 32 heads, 8 KV heads,
intermediate 14336, vocabulary 128256) with random weights written to disk as safetensors, then per draft kind and
per rank count: the frozen pass (the hidden-state cache build, `build_hidden_cache`: the code path `train` takes;
its cache key, a fingerprint of the target's files, timed apart) of each rank's share of the data, and a few
training steps from that cache (the kind's training module in `DraftTrainer`, DDP over the ranks) with the target
freed, as `train` goes on from a complete cache. Reported per process: tokens/s
of the frozen pass and of training, and peak memory (GPU: torch's peak allocated; CPU: the process's peak RSS,
VmHWM, reset between phases).

    python bench/scale.py --layers 2 --ranks 1,2 --sequences-per-rank 8 --length 128 --batch 2 --steps 4 \
        --train-flags "--medusa_num_heads 1 --medusa_freeze_projection True --eagle3_intermediate_size 1024 \
                       --eagle3_draft_vocab_size 2048 --eagle3_ttt_steps 2"   # a 24 GB CPU box: ~10 GB per rank
    python bench/scale.py --layers 32 --bf16 --ranks 1            # a CUDA device: the whole 8B shape

Each (rank count, kind) is one `torchrun --standalone` launch of this script as workers (gloo on the CPU, nccl on
GPUs: the Trainer's choice), so memory is per process and per kind; peaks are reset between the phases. Every rank
loads the whole target, builds its share of one cache (as `train` does: shards balanced by tokens), frees the
target (keeping its embedding and lm_head, read from the files) and trains from the cache for --steps optimizer
steps; training tokens/s is batch x length / the median step time over steps after the first (warm-up).
--layers N keeps only the first N decoder layers where memory forbids 32 (2 layers fp32 = 6 GB per rank: the
embeddings and lm_head alone are 1.05B weights). Sequences are random token
ids of one length (a multiple of 64: no padding), the first quarter unlabelled (a user turn). The table goes to
stdout, every figure to --out.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import TrainerCallback

from medusa_forge.data.tokenize import IGNORE_INDEX
from medusa_forge.drafts import get_kind, kinds
from medusa_forge.modeling import load_base_model
from medusa_forge.train.args import parse_args
from medusa_forge.train.dataset import PadCollator
from medusa_forge.train.hidden_cache import CachedHiddenDataset, build_hidden_cache
from medusa_forge.train.target_files import TargetFiles
from medusa_forge.train.trainer import DraftTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import LLAMA3_8B, TINY_SHAPE, print_scale_rows, random_llama  # noqa: E402  (shared with the GPU check)

SCRIPT = Path(__file__).resolve()
COMPLETE = "complete.json"  # written last into a target folder: the weights there are whole
CACHE_BATCH_TOKENS = 8192  # build_hidden_cache's batches (max_tokens_per_batch), as `train` builds them
SHAPE_KEYS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size")


# -- the target on disk ----------------------------------------------------------------------------------------


def make_target(folder: Path, shape: dict, layers: int, dtype: torch.dtype) -> Path:
    """A random Llama of `shape` with `layers` decoder layers saved as safetensors in `folder` (reused when it holds
    one of the same shape and dtype). Drawn on the GPU when there is one (seconds for 8B), else on the CPU."""
    wanted = {"shape": {**shape, "num_hidden_layers": layers}, "dtype": str(dtype)}
    marker = folder / COMPLETE
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = random_llama(wanted["shape"], device, dtype)
    model.save_pretrained(folder)
    del model
    marker.write_text(json.dumps(wanted))
    return folder


def random_items(count: int, length: int, vocab: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """`count` random sequences of `length` token ids; the first quarter of each unlabelled (a user turn)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (count, length), generator=generator)
    items = []
    for row in ids.tolist():
        labels = [IGNORE_INDEX] * (length // 4) + row[length // 4 :]
        items.append({"input_ids": row, "labels": labels})
    return items


# -- one rank --------------------------------------------------------------------------------------------------


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        # Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM) to its current RSS.
        Path("/proc/self/clear_refs").write_text("5")


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) * 1024 / 2**30, 3)
    raise RuntimeError("no VmHWM in /proc/self/status")


class StepTimer(TrainerCallback):
    """Seconds of each optimizer step (forward, backward, optimizer), the device synchronised at both ends."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds, self.start = device, [], 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        self._sync()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self._sync()
        self.seconds.append(time.perf_counter() - self.start)


def worker(args: argparse.Namespace) -> None:
    """One rank of one launch (one kind: `launch` gives it): load the target, build the cache of this rank's share,
    train --steps steps from it; write this rank's figures to --results/rank{R}.json."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    work, kind = Path(args.work), args.kinds[0]
    config = parse_args(train_flags(args, kind, work / "runs" / f"{world}-{kind}-{rank}"))
    device = config.device  # under torchrun: joined the process group (gloo on the CPU, nccl on GPUs)
    dtype = torch.bfloat16 if config.bf16 else torch.float32  # as `train` loads the target
    start = time.perf_counter()
    base = load_base_model(args.target, dtype=dtype).to(device)
    load_seconds = time.perf_counter() - start
    loaded_gib = peak_gib(device)
    items = random_items(world * args.sequences_per_rank, args.length, base.config.vocab_size)

    reset_peak(device)
    # The cache key is a fingerprint of the target's files (every weight file's bytes hashed): timed alone here, so
    # that the frozen pass's figure is the forward passes and the writes.
    start = time.perf_counter()
    target = TargetFiles(args.target, dtype)
    target.fingerprint  # noqa: B018  (computed and kept: the build below reuses it)
    key_seconds = time.perf_counter() - start
    start = time.perf_counter()
    # As `train` builds it: every rank computes its share (balanced by tokens) into its own shard of one cache.
    cache = build_hidden_cache(base, target, items, Path(args.work) / "cache" / f"{world}-{kind}", kind=kind)
    frozen_seconds = time.perf_counter() - start
    frozen_peak = peak_gib(device)
    frozen_tokens = sum(len(item["input_ids"]) for item in items) // world  # equal lengths: equal shares
    print(f"rank {rank}/{world} {kind}: cache build {frozen_seconds:.1f} s for ~{frozen_tokens} tokens, the cache "
          f"key {key_seconds:.1f} s before it", flush=True)  # fmt: skip

    # As `train` goes on from a complete cache: the target freed, only its embedding and lm_head kept.
    spec = get_kind(kind)
    stand_in = target.stand_in(spec.records_need_token_ids).to(device)
    del base
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model = spec.training_module(stand_in, config, args.target, lambda: items)
    timer = StepTimer(device)
    trainer = DraftTrainer(
        model=model,
        args=config,
        train_dataset=CachedHiddenDataset(items, cache),
        data_collator=PadCollator(0, args.length),
        callbacks=[timer],
    )
    reset_peak(device)
    trainer.train()
    training_peak = peak_gib(device)
    steps = timer.seconds[1:] or timer.seconds  # the first step warms up (allocations, kernel choice)
    step_seconds = statistics.median(steps)
    tokens_per_step = args.batch * args.length * config.gradient_accumulation_steps
    row = {
        "rank": rank,
        "world_size": world,
        "kind": kind,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "load_seconds": round(load_seconds, 2),
        "loaded_gib": loaded_gib,
        "frozen_tokens": frozen_tokens,
        "cache_key_seconds": round(key_seconds, 3),
        "frozen_seconds": round(frozen_seconds, 3),
        "frozen_tokens_per_s": round(frozen_tokens / frozen_seconds, 1),
        "frozen_peak_gib": frozen_peak,
        "training_steps": len(timer.seconds),
        "training_tokens_per_step": tokens_per_step,
        "training_step_seconds": round(step_seconds, 4),
        "training_tokens_per_s": round(tokens_per_step / step_seconds, 1),
        "training_peak_gib": training_peak,
    }
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"rank{rank}.json").write_text(json.dumps(row, indent=1) + "\n")


def own_flags(text: str, kind: str) -> list[str]:
    """--train-flags without the flags of other kinds (`train` refuses them; one --train-flags serves every kind);
    each flag is `--name=value` or `--name value`."""
    tokens, kept = shlex.split(text), []
    others = {flag for other in kinds() if other.name != kind for flag in other.train_flags}
    while tokens:
        flag = [tokens.pop(0)]
        if "=" not in flag[0] and tokens and not tokens[0].startswith("--"):
            flag.append(tokens.pop(0))
        if flag[0].removeprefix("--").partition("=")[0] not in others:
            kept += flag
    return kept


def train_flags(args: argparse.Namespace, kind: str, output_dir: Path) -> list[str]:
    """The `train` flags of one kind's run (its TrainConfig: batch, steps, precision, the kind's own flags)."""
    return [
        "--model_name_or_path", args.target, "--output_dir", str(output_dir), "--draft_kind", kind,
        "--per_device_train_batch_size", str(args.batch), "--max_steps", str(args.steps), "--save_strategy", "no",
        "--report_to", "none", "--logging_steps", str(args.steps), "--disable_tqdm", "True",
        "--model_max_length", str(args.length), "--seed", "0", "--bf16", str(args.bf16),
        *own_flags(args.train_flags, kind),
    ]  # fmt: skip


# -- the launches and the table --------------------------------------------------------------------------------


def launch(args: argparse.Namespace, target: Path, ranks: int, kind: str) -> list[dict]:
    """One torchrun launch of `ranks` workers for `kind` (its own processes: the peaks are the kind's alone); their
    figures, by rank. Their output streams through."""
    results = Path(args.work) / "results" / f"{ranks}-{kind}"
    shutil.rmtree(results, ignore_errors=True)
    shutil.rmtree(Path(args.work) / "cache" / f"{ranks}-{kind}", ignore_errors=True)  # a reused cache times nothing
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--standalone", str(SCRIPT),
        "--worker", "--target", str(target), "--kinds", kind, "--results", str(results),
        "--work", args.work, "--sequences-per-rank", str(args.sequences_per_rank), "--length", str(args.length),
        "--batch", str(args.batch), "--steps", str(args.steps), "--train-flags", args.train_flags,
        *(["--bf16"] if args.bf16 else []),
    ]  # fmt: skip
    env = dict(os.environ)
    if not torch.cuda.is_available():  # the CPU's cores shared out between the ranks
        env["OMP_NUM_THREADS"] = str(max(1, (args.threads or os.cpu_count() or 1) // ranks))
    print(f"[{ranks} rank(s), {kind}] {' '.join(command)}", flush=True)
    done = subprocess.run(command, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{ranks} rank(s), {kind}: the workers exited with {done.returncode} (output above)")
    return [json.loads((results / f"rank{r}.json").read_text()) for r in range(ranks)]


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32, help="Decoder layers of the 8B shape kept (32: all).")
    parser.add_argument("--tiny", action="store_true", help="A tiny shape instead of the 8B one (the tests' run).")
    parser.add_argument("--ranks", default="1,2", help="Rank counts, one launch each (e.g. 1,2).")
    parser.add_argument("--kinds", default="medusa,eagle3")
    parser.add_argument("--sequences-per-rank", type=int, default=16, help="Sequences each rank's frozen pass covers.")
    parser.add_argument("--length", type=int, default=512, help="Tokens per sequence (a multiple of 64).")
    parser.add_argument("--batch", type=int, default=4, help="Sequences per training step per rank.")
    parser.add_argument("--steps", type=int, default=4, help="Training steps (the first is warm-up, not timed).")
    parser.add_argument("--bf16", action="store_true", help="Target in bfloat16 and train --bf16 True (GPU).")
    parser.add_argument("--train-flags", default="", help="More `train` flags, e.g. '--medusa_num_heads 1'.")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads shared by the ranks (0: all cores).")
    parser.add_argument("--work", default="scale-work", help="Target, caches and per-rank results go here.")
    parser.add_argument("--out", default="scale.json", help="Where the JSON of every figure is written.")
    # a worker's own flags (set by `launch`)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--results", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if args.worker:
        return args
    if args.length % 64:
        parser.error(f"--length {args.length}: use a multiple of 64 (training pads to one; padding is not counted)")
    if not 1 <= args.layers <= LLAMA3_8B["num_hidden_layers"]:
        parser.error(f"--layers {args.layers}: 1 to {LLAMA3_8B['num_hidden_layers']}")
    try:
        args.ranks = sorted({int(r) for r in args.ranks.split(",") if r.strip()})
    except ValueError:
        parser.error(f"--ranks {args.ranks}: comma-separated counts, e.g. 1,2")
    if not args.ranks or args.ranks[0] < 1:
        parser.error(f"--ranks {args.ranks}: counts of at least 1")
    if torch.cuda.is_available() and args.ranks[-1] > torch.cuda.device_count():
        parser.error(f"--ranks {args.ranks[-1]}: this machine has {torch.cuda.device_count()} GPU(s), one per rank")
    for kind in args.kinds:
        get_kind(kind)  # a UserError naming the kinds
    if args.sequences_per_rank < args.batch:
        parser.error("--sequences-per-rank must be at least --batch")
    if args.ranks[-1] > 1 and args.sequences_per_rank * args.length < CACHE_BATCH_TOKENS:
        # The cache is built in batches of up to 8192 tokens dealt out between the ranks: fewer batches than ranks
        # leave ranks idle, and the frozen pass's tokens/s per rank would be the busy rank's alone.
        print(f"warning: --sequences-per-rank x --length = {args.sequences_per_rank * args.length} tokens < "
              f"{CACHE_BATCH_TOKENS}: some ranks get no batch of the cache to build", flush=True)  # fmt: skip
    return args


def run(args: argparse.Namespace) -> dict:
    """Every launch; the report (also written to --out)."""
    shape = TINY_SHAPE if args.tiny else LLAMA3_8B
    layers = min(args.layers, shape["num_hidden_layers"])
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    start = time.perf_counter()
    target = make_target(Path(args.work) / "target", shape, layers, dtype)
    target_seconds = time.perf_counter() - start
    rows = [row for ranks in args.ranks for kind in args.kinds for row in launch(args, target, ranks, kind)]
    report = {
        "machine": {
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
        "shape": {**{k: shape[k] for k in SHAPE_KEYS}, "layers": layers},
        "dtype": str(dtype).removeprefix("torch."),
        "settings": {k: getattr(args, k) for k in ("sequences_per_rank", "length", "batch", "steps", "train_flags")},
        "target_seconds": round(target_seconds, 1),
        "rows": rows,
        "seconds": round(time.perf_counter() - start, 1),
    }
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.worker:
        worker(args)
        return 0
    report = run(args)
    print_scale_rows(report["rows"])
    print(f"wrote {args.out} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
