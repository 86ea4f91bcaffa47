"""What a training run leaves besides the heads: training_metrics.json, a loss/top-1 plot, the model card."""

from __future__ import annotations

import json
from pathlib import Path


def head_history(log_history: list[dict], prefix: str = "") -> dict[int, list[dict]]:
    """Per head: [{step, loss, top1, ...}] from the Trainer's log history."""
    history: dict[int, list[dict]] = {}
    for entry in log_history:
        i = 0
        while f"{prefix}medusa{i}_loss" in entry:
            row = {"step": entry["step"]}
            for key, value in entry.items():
                name = f"{prefix}medusa{i}_"
                if key.startswith(name):
                    row[key[len(name) :]] = value
            history.setdefault(i, []).append(row)
            i += 1
    return history


def write_metrics(folder: Path, log_history: list[dict], final: dict) -> None:
    payload = {
        "final": final,
        "epoch_seconds": [entry["epoch_seconds"] for entry in log_history if "epoch_seconds" in entry],
        "train": head_history(log_history),
        "eval": head_history(log_history, "eval_"),
    }
    (folder / "training_metrics.json").write_text(json.dumps(payload, indent=2) + "\n")


def plot_history(folder: Path, log_history: list[dict]) -> Path | None:
    """training_curves.png: per-head loss and top-1 against step (train solid, eval dashed)."""
    train, evaluation = head_history(log_history), head_history(log_history, "eval_")
    if not train and not evaluation:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_top1) = plt.subplots(1, 2, figsize=(11, 4))
    for history, style, label in ((train, "-", "train"), (evaluation, "--", "eval")):
        for i, rows in sorted(history.items()):
            steps = [r["step"] for r in rows]
            color = f"C{i}"
            ax_loss.plot(steps, [r["loss"] for r in rows], style, color=color, label=f"head {i} {label}")
            ax_top1.plot(steps, [r["top1"] for r in rows], style, color=color, label=f"head {i} {label}")
    ax_loss.set(xlabel="step", ylabel="cross-entropy", title="Per-head loss")
    ax_top1.set(xlabel="step", ylabel="top-1 accuracy", title="Per-head top-1")
    ax_loss.legend(fontsize=7)
    ax_top1.legend(fontsize=7)
    fig.tight_layout()
    path = folder / "training_curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
