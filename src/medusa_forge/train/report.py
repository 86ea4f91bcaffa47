"""What a training run leaves besides the heads: training_metrics.json (TrainingMetrics) and a loss/top-1 plot."""

from __future__ import annotations

from pathlib import Path

from medusa_forge.results import TrainingMetrics


def head_history(log_history: list[dict], prefix: str = "", name: str = "medusa") -> dict[int, list[dict]]:
    """Per head (per EAGLE-3 step with name "eagle3_step"): [{step, loss, top1, ...}] from the log history."""
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


def training_metrics(log_history: list[dict], final: dict[str, float], name: str = "medusa") -> TrainingMetrics:
    """What training_metrics.json holds, from the Trainer's log history and the run's final metrics; for an
    EAGLE-3 draft (name "eagle3_step") its train/eval histories are keyed by step instead of head."""
    return TrainingMetrics(
        final=final,
        epoch_seconds=[entry["epoch_seconds"] for entry in log_history if "epoch_seconds" in entry],
        train=head_history(log_history, name=name),
        eval=head_history(log_history, "eval_", name),
    )


def plot_history(folder: Path, metrics: TrainingMetrics, label: str = "head") -> Path | None:
    """training_curves.png: per-head (label "step": per EAGLE-3 step) loss and top-1 against the training step
    (train solid, eval dashed)."""
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
