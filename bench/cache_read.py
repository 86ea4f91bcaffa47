"""What float8 hidden-state cache records cost and save (`--medusa_hidden_cache_precision`): per precision, `train`
builds the cache (one step of training, the build is what is measured here), then this reads every record back as
training does (`HiddenStateCache.get`: float16 as stored, float8 dequantised) and reports the bytes on disk, the
build's seconds, and the records read per second (best of --passes over the whole cache: the files are then in the
page cache, so this is the reader's own cost, the dequantisation included, not the disk's).

    python bench/cache_read.py --samples 60 --max-length 256 --kind eagle3 --work read-work --out read.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from medusa_forge.cli import main as cli_main
from medusa_forge.train.cache_records import PRECISIONS
from medusa_forge.train.hidden_cache import HiddenStateCache


def build(args: argparse.Namespace, precision: str) -> tuple[Path, float]:
    """The cache folder `train` built at `precision`, and the run's seconds."""
    root = Path(args.work) / precision
    shutil.rmtree(root, ignore_errors=True)
    flags = [
        "train", "--model_name_or_path", "smollm2", "--data_path", "sharegpt", "--max_samples", str(args.samples),
        "--model_max_length", str(args.max_length), "--per_device_train_batch_size", "4", "--max_steps", "1",
        "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True", "--draft_kind", args.kind,
        "--medusa_hidden_cache_dir", str(root / "cache"), "--medusa_hidden_cache_precision", precision,
        "--output_dir", str(root / "out"),
    ]  # fmt: skip
    start = time.perf_counter()
    if cli_main(flags) != 0:
        raise RuntimeError(f"train at {precision} failed")
    seconds = time.perf_counter() - start
    folders = [p for p in (root / "cache").iterdir() if (p / "meta.json").is_file()]
    # The training set's (a held-out set, when there is one, has a cache of its own; it is the smaller).
    return max(folders, key=lambda p: json.loads((p / "meta.json").read_text())["tokens"]), seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=60)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--kind", default="eagle3")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--work", default="read-work")
    parser.add_argument("--out", default="read.json")
    args = parser.parse_args(argv)
    rows = []
    for precision in PRECISIONS:
        folder, seconds = build(args, precision)
        cache = HiddenStateCache(folder)
        tokens = json.loads((folder / "meta.json").read_text())["tokens"]
        best = float("inf")
        for _ in range(args.passes):
            start = time.perf_counter()
            for index in range(len(cache)):
                cache.get(index)
            best = min(best, time.perf_counter() - start)
        size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
        per_token = round(size / tokens, 1)
        rows.append({"precision": precision, "tokens": tokens, "bytes": size, "bytes_per_token": per_token,
                     "train_seconds": round(seconds, 1), "read_tokens_per_s": round(tokens / best)})  # fmt: skip
        print(json.dumps(rows[-1]), file=sys.stderr)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
