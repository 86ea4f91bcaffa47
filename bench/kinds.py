"""Every kind of draft at the quickstart's budget, side by side: the same data (QUICKSTART's 500 ShareGPT
conversations at 384 tokens), about the same training minutes, the same eval (held-out accuracy per position,
the tree chosen by measured latency, greedy / draft / prompt lookup back to back), one after another on one
machine. Each variant is `medusa-forge quickstart --draft-kind KIND` plus its `--set` overrides, in its own
workdir; hidden-state caches are shared through the default cache folder (a kind whose cache exists skips the
frozen pass). The table goes to stdout and `--out` (JSON); copy it to BENCHMARKS.md by hand with the commit.

    .venv/bin/python bench/kinds.py --workdir /tmp/kinds
    .venv/bin/python bench/kinds.py --workdir /tmp/kinds --only dflash --epochs dflash=3   # one variant again

"The same training minutes": each variant's epochs (below, or `--epochs NAME=N`) are set so that its training
takes about as long as EAGLE-3's quickstart training on the machine the epochs were chosen on; the table prints
the seconds each one took, so the claim is checked, not assumed. Run it on an idle machine (timings).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from medusa_forge.results import DRAFT_RUN, EVAL_REPORT_FILE, EvalReport

# name -> (kind, quickstart --set overrides). Epochs for ~9 training minutes each on a 2-core AVX2 VM, where
# EAGLE-3's 2 epochs took 527-555 s, DFlash's 157 s per epoch and Medusa's heads' 139 s per epoch (BENCHMARKS.md,
# "Every kind of draft at the quickstart's budget").
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "medusa": ("medusa", ["train.num_train_epochs=4"]),
    "eagle3": ("eagle3", ["train.num_train_epochs=2"]),
    "eagle3.1": ("eagle3", ["train.num_train_epochs=2", "train.eagle3_fc_norm=true", "train.eagle3_norm_output=true"]),
    "dflash": ("dflash", ["train.num_train_epochs=3.5"]),
}


def run_variant(name: str, kind: str, overrides: list[str], workdir: Path) -> dict:
    """Run one variant's quickstart (resuming a finished one costs nothing) and read back what the table shows."""
    folder = workdir / name
    argv = [sys.executable, "-m", "medusa_forge.cli", "quickstart", "--draft-kind", kind, "--workdir", str(folder)]
    for override in overrides:
        argv += ["--set", override]
    print("$", " ".join(argv[2:]), flush=True)
    subprocess.run(argv, check=True)
    draft = folder / "heads"
    metrics = json.loads((draft / "training_metrics.json").read_text())["final"]
    report = EvalReport.load(draft / "eval" / EVAL_REPORT_FILE)
    speed = report.speed
    tps = speed.tokens_per_second
    chain = report.chains[0] if report.chains else None
    return {
        "name": name,
        "kind": kind,
        "overrides": overrides,
        "train_seconds": metrics["train_runtime"],
        "cache_seconds": metrics.get("hidden_cache_seconds", 0.0),
        "epochs": metrics["epoch"],
        "top1": [row.top1 for row in report.accuracy[1:5]],
        "top5_first": report.accuracy[1].top5 if len(report.accuracy) > 1 else None,
        "tree_nodes": len(report.tree),
        "dtype": speed.dtype,
        "accepted": report.acceptance.mean_accept_length,
        "chain": (chain.draft_tokens, chain.mean_accept_length) if chain else None,
        "tokens_per_s": dict(tps),
        "reference": speed.reference,
        "speedup": tps[DRAFT_RUN] / tps[speed.reference],
        "over_prompt_lookup": tps[DRAFT_RUN] / tps["prompt_lookup"],
        "prompt_lookup_speedup": tps["prompt_lookup"] / tps[speed.reference],
    }


def table(rows: list[dict]) -> str:
    """The markdown table BENCHMARKS.md shows, one column per variant."""
    lines = ["| | " + " | ".join(row["name"] for row in rows) + " |", "|---" * (len(rows) + 1) + "|"]

    def add(label: str, cell) -> None:
        lines.append(f"| {label} | " + " | ".join(cell(row) for row in rows) + " |")

    add("epochs; training s (cache s)", lambda r: (
        f"{r['epochs']:.2g}; {r['train_seconds']:.0f} ({r['cache_seconds']:.0f})"
    ))
    add("held-out top-1 at position 1 / 2 / 3 / 4", lambda r: " / ".join(f"{v:.3f}" for v in r["top1"]))
    add("held-out top-5 at position 1", lambda r: f"{r['top5_first']:.3f}")
    add("tree chosen (nodes, dtype)", lambda r: f"{r['tree_nodes']}, {r['dtype']}")
    add("mean accepted tokens per step", lambda r: f"**{r['accepted']:.2f}**")
    add("the engines' chain, our decoder", lambda r: f"{r['chain'][1]:.2f} (of {r['chain'][0]})" if r["chain"] else "-")
    add(
        "tokens/s: float32 / bfloat16 greedy / draft / prompt lookup",
        lambda r: " / ".join(
            f"{r['tokens_per_s'][k]:.1f}" for k in ("greedy_float32", "greedy_bfloat16", DRAFT_RUN, "prompt_lookup")
        ),
    )
    add("speed-up over the fastest plain greedy", lambda r: f"**{r['speedup']:.2f}x** ({r['reference']})")
    add("prompt lookup's speed-up", lambda r: f"{r['prompt_lookup_speedup']:.2f}x")
    add("draft over prompt lookup", lambda r: f"{r['over_prompt_lookup']:.2f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variant names")
    parser.add_argument("--epochs", default="", help="NAME=EPOCHS,... overriding a variant's epochs")
    parser.add_argument("--out", type=Path, help="JSON of the rows (default: WORKDIR/kinds.json)")
    args = parser.parse_args()
    epochs = dict(item.split("=", 1) for item in args.epochs.split(",") if item)
    rows = []
    for name in args.only.split(","):
        if name not in VARIANTS:
            parser.error(f"--only {name}: choose from {', '.join(VARIANTS)}")
        kind, overrides = VARIANTS[name]
        if name in epochs:
            overrides = [o for o in overrides if not o.startswith("train.num_train_epochs=")]
            overrides.append(f"train.num_train_epochs={epochs[name]}")
        rows.append(run_variant(name, kind, overrides, args.workdir))
    out = args.out or args.workdir / "kinds.json"
    out.write_text(json.dumps(rows, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()
