"""Keep less in the hidden-state cache? (issue 24, part 4: measured before offered.) The cache stores each token's
record in float16; float8 (e4m3, one scale per token and per record part: the final state and each EAGLE-3 feature
layer apart; now `--medusa_hidden_cache_precision float8`) halves the disk. This bench measures what that costs the
draft: per kind, `train` builds the float16 cache once; a copy of it is rounded in place to what a float8 cache
gives back (`float8_round_trip`, the cache's own quantisation, stored again as float16: the numbers training
reads), and the draft is trained again from the copy with the same seed and recipe (a complete cache is reused as
it is). Both drafts are then scored on held-out conversations with the target's true (float32) features, as `eval`
scores them: teacher-forced top-1 and top-5 per head or draft step; the training loss of the last step next to them.

    python bench/cache_precision.py --samples 100 --max-length 256 --epochs 1 --kinds medusa,eagle3 \
        --heldout 30 --work precision-work --out precision.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from medusa_forge.cli import main as cli_main
from medusa_forge.data.conversations import load_conversations
from medusa_forge.decode.loading import load_draft
from medusa_forge.evaluate.accuracy import measure_accuracy
from medusa_forge.train.cache_records import float8_round_trip


def round_cache(cache: Path, part: int) -> int:
    """Every shard's records rounded in place (chunks of 4096 tokens); the number of tokens."""
    tokens = 0
    for data in sorted(cache.rglob("hidden.f16")):
        folder = next(p for p in data.parents if (p / "meta.json").is_file())
        width = int(json.loads((folder / "meta.json").read_text())["hidden"])  # the record's width
        records = np.memmap(data, dtype=np.float16, mode="r+").reshape(-1, width)
        for start in range(0, len(records), 4096):
            records[start : start + 4096] = float8_round_trip(records[start : start + 4096], part)
        records.flush()
        tokens += len(records)
    return tokens


def train(args: argparse.Namespace, kind: str, cache: Path, out: Path) -> float:
    """One `train` run from (or building) `cache`; the loss of its last logged step."""
    flags = [
        "train", "--model_name_or_path", "smollm2", "--data_path", "sharegpt", "--max_samples", str(args.samples),
        "--model_max_length", str(args.max_length), "--per_device_train_batch_size", "4", "--num_train_epochs",
        str(args.epochs), "--learning_rate", "1e-3", "--seed", "0", "--save_strategy", "no", "--report_to", "none",
        "--logging_steps", "1", "--disable_tqdm", "True", "--medusa_hidden_cache_dir", str(cache),
        "--output_dir", str(out), "--draft_kind", kind,
        *(["--eagle3_ttt_steps", "2"] if kind == "eagle3" else []),
    ]  # fmt: skip
    if cli_main(flags) != 0:
        raise RuntimeError(f"train {kind} failed")
    rows = json.loads((out / "training_metrics.json").read_text())["train"]
    return float(next(iter(rows.values()))[-1]["loss"])


def score(folder: Path, conversations, max_length: int) -> list[dict]:
    loaded = load_draft(folder, dtype="float32", device="cpu")
    rows = measure_accuracy(loaded.draft, loaded.tokenizer, conversations, max_length, progress=False)
    return [{"name": r.name, "tokens": r.tokens, "top1": round(r.top(1), 4), "top5": round(r.top(5), 4)} for r in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--kinds", default="medusa,eagle3")
    parser.add_argument("--heldout", type=int, default=30, help="sharegpt-heldout conversations scored.")
    parser.add_argument("--work", default="precision-work")
    parser.add_argument("--out", default="precision.json")
    args = parser.parse_args(argv)
    work = Path(args.work)
    heldout = load_conversations("sharegpt-heldout", args.heldout)
    report = {"settings": vars(args), "rows": []}
    for kind in [k.strip() for k in args.kinds.split(",") if k.strip()]:
        caches = {"float16": work / kind / "cache-float16", "float8": work / kind / "cache-float8"}
        shutil.rmtree(work / kind, ignore_errors=True)
        for precision, cache in caches.items():
            if precision == "float8":
                shutil.copytree(caches["float16"], cache)
                meta = json.loads(next(cache.rglob("meta.json")).read_text())
                tokens = round_cache(cache, part=int(meta["hidden"]) // len(meta["layers"]))
                print(f"{kind}: {tokens} tokens' records rounded through float8", flush=True)
            out = work / kind / f"draft-{precision}"
            loss = train(args, kind, cache, out)
            row = {"kind": kind, "cache": precision, "final_loss": round(loss, 4),
                   "heldout": score(out, heldout, args.max_length)}  # fmt: skip
            print(json.dumps(row), flush=True)
            report["rows"].append(row)
            Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
