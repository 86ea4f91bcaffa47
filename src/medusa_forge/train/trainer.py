"""DraftTrainer: the HF Trainer with a draft's loss (Medusa heads or an EAGLE-3 draft), per-head (per-step)
metrics, and checkpoints in the draft's own layout."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from transformers import Trainer
from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerCallback

from medusa_forge.drafts import get_kind, kinds
from medusa_forge.drafts.fused_ce import summarise_head_stats
from medusa_forge.errors import UserError
from medusa_forge.tokenizer_files import save_tokenizer


class DraftTrainer(Trainer):
    """The trainer of every kind of draft. Checkpoints hold only the draft (its kind's config file and weights file)
    plus the Trainer's optimizer/scheduler/RNG state, so a checkpoint folder is itself a
    loadable draft folder. The model (the draft kind's training module) names its draft submodule
    (`draft_attribute`); the kind (`args.draft_kind`) names its metrics and reads its checkpoints."""

    def __init__(self, *args, train_sampler: torch.utils.data.Sampler | None = None, **kwargs) -> None:
        # `train_sampler`: the order of the training items when the Trainer's own would not do (a node's share of a
        # hidden-state cache, `NodeShareSampler`); None: the Trainer's.
        self.train_sampler = train_sampler
        super().__init__(*args, **kwargs)
        self._head_stats = {"train": None, "eval": None}
        self.remove_callback(PrinterCallback if self.args.disable_tqdm else ProgressCallback)
        self.add_callback(MedusaPrinterCallback() if self.args.disable_tqdm else MedusaProgressCallback())
        self.add_callback(EpochTimer())

    def _get_train_sampler(self, train_dataset=None):
        return self.train_sampler or super()._get_train_sampler(train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        phase = "train" if model.training else "eval"
        stats = outputs["head_stats"].detach()
        current = self._head_stats[phase]
        self._head_stats[phase] = stats if current is None else current + stats
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        phase = "eval" if "eval_loss" in logs else "train" if "loss" in logs else None
        if phase is not None and self._head_stats[phase] is not None:
            stats = self._head_stats[phase].to(self.args.device)
            if self.accelerator.num_processes > 1:
                stats = self.accelerator.reduce(stats, reduction="sum")
            name = get_kind(self.args.draft_kind).metric_name
            logs.update(summarise_head_stats(stats.cpu(), name, prefix="eval_" if phase == "eval" else ""))
            self._head_stats[phase] = None
        super().log(logs, start_time)

    def _draft(self, model=None) -> torch.nn.Module:
        unwrapped = self.accelerator.unwrap_model(model or self.model)
        return getattr(unwrapped, unwrapped.draft_attribute)

    def _draft_state_dict(self, state_dict: dict | None) -> dict[str, torch.Tensor]:
        if state_dict is None:
            return self._draft().state_dict()
        # DeepSpeed/FSDP hand us the gathered full state dict: keep the draft's part.
        prefix = self.accelerator.unwrap_model(self.model).draft_attribute + "."
        return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        draft_state = self._draft_state_dict(state_dict)
        if not self.args.should_save:
            return
        draft = self._draft()
        os.makedirs(output_dir, exist_ok=True)
        original = draft.state_dict()
        saved = type(draft)(draft.config)
        saved.load_state_dict({k: draft_state.get(k, v) for k, v in original.items()})
        saved.save(output_dir)
        if self.processing_class is not None:
            save_tokenizer(self.processing_class, output_dir)  # readable by TGI's transformers 4.x too
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        draft = self._draft(model)
        try:
            draft.load_state_dict(get_kind(self.args.draft_kind).checkpoint_state(Path(resume_from_checkpoint)))
        except (UserError, RuntimeError) as err:  # another kind, head count, layer count or base model
            reason = str(err).strip().splitlines()[0][:300]
            raise UserError(
                f"{resume_from_checkpoint} holds a draft of another shape than this run's ({reason}); it was "
                f"written by a run with other flags. Pass --overwrite_output_dir True to start over there, or "
                f"another --output_dir"
            ) from None

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)


class EpochTimer(TrainerCallback):
    """Adds {"epoch_seconds": wall time of the epoch} to the log history at the end of each epoch."""

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):
        seconds = time.perf_counter() - self.start
        state.log_history.append({"epoch": state.epoch, "epoch_seconds": seconds, "step": state.global_step})


def format_logs(step: int, logs: dict) -> str:
    """One readable console line: losses, learning rate, then each head's (step's) loss / top-1 / top-5."""
    parts = [f"step {step}"]
    for key in ("loss", "eval_loss", "learning_rate", "epoch", "train_loss", "train_runtime"):
        if key in logs:
            parts.append(f"{key} {logs[key]:.4g}")
    for prefix in ("", "eval_"):
        for name, label in ((kind.metric_name, kind.metric_label) for kind in kinds()):
            i = 0
            while f"{prefix}{name}{i}_loss" in logs:
                key = f"{prefix}{name}{i}"
                parts.append(
                    f"{prefix}{label}{i} loss {logs[f'{key}_loss']:.3f} "
                    f"top1 {logs[f'{key}_top1']:.3f} top5 {logs[f'{key}_top5']:.3f}"
                )
                i += 1
    return " | ".join(parts)


class MedusaProgressCallback(ProgressCallback):
    """The usual progress bar, with metrics written as one line per logging step instead of a dict."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and self.training_bar is not None:
            self.training_bar.write(format_logs(state.global_step, logs))


class MedusaPrinterCallback(TrainerCallback):
    """--disable_tqdm True: the same lines, printed."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            print(format_logs(state.global_step, logs), flush=True)
