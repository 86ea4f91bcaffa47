"""What a training run leaves besides the draft: training_metrics.json (TrainingMetrics) and a loss/top-1 plot."""

from __future__ import annotations

from pathlib import Path

from medusa_forge.results import TrainingMetrics


def head_history(log_history: list[dict], name: str, prefix: str = "") -> dict[int, list[dict]]:
    """Per metric i of the draft (`{name}{i}_loss`, ...: the kind's `metric_name`): [{step, loss, top1, ...}] from
    the log history."""
    history: dict[int, list[dict]] = {}
    for entry in log_history:
        i = 0
        while f"{prefix}{name}{i}_loss" in entry:
            row = {"step": entry["step"]}
            for key, value in entry.items():
                start = f"{prefix}{name}{i}_"
                if key.startswith(start):
                    row[key[len(start) :]] = value
            history.setdefault(i, []).append(row)
            i += 1
    return history


def training_metrics(log_history: list[dict], final: dict[str, float], name: str) -> TrainingMetrics:
    """What training_metrics.json holds, from the Trainer's log history and the run's final metrics; its train/eval
    histories are keyed by the draft's metric number (`name`: the kind's `metric_name`)."""
    return TrainingMetrics(
        final=final,
        epoch_seconds=[entry["epoch_seconds"] for entry in log_history if "epoch_seconds" in entry],
        train=head_history(log_history, name),
        eval=head_history(log_history, name, "eval_"),
    )


def plot_history(folder: Path, metrics: TrainingMetrics, label: str) -> Path | None:
    """training_curves.png: loss and top-1 of each of the draft's metrics (`label`: the kind's `metric_label`)
    against the training step (train solid, eval dashed)."""
    train, evaluation = metrics.train, metrics.eval
    if not train and not evaluation:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_top1) = plt.subplots(1, 2, figsize=(11, 4))
    for history, style, phase in ((train, "-", "train"), (evaluation, "--", "eval")):
        for i, rows in sorted(history.items()):
            steps = [r["step"] for r in rows]
            color = f"C{i}"
            ax_loss.plot(steps, [r["loss"] for r in rows], style, color=color, label=f"{label} {i} {phase}")
            ax_top1.plot(steps, [r["top1"] for r in rows], style, color=color, label=f"{label} {i} {phase}")
    ax_loss.set(xlabel="step", ylabel="cross-entropy", title=f"Per-{label} loss")
    ax_top1.set(xlabel="step", ylabel="top-1 accuracy", title=f"Per-{label} top-1")
    ax_loss.legend(fontsize=7)
    ax_top1.legend(fontsize=7)
    fig.tight_layout()
    path = folder / "training_curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
