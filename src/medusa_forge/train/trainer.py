"""MedusaTrainer: the HF Trainer with the Medusa loss, per-head metrics, and checkpoints in the heads layout."""

from __future__ import annotations

import os
import time

import torch
from safetensors.torch import load_file
from transformers import Trainer
from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerCallback

from medusa_forge.heads import WEIGHTS_NAME
from medusa_forge.tokenizer_files import save_tokenizer
from medusa_forge.train.model import summarise_head_stats


class MedusaTrainer(Trainer):
    """Checkpoints hold only the heads (config.json + medusa_lm_head.safetensors) plus the Trainer's
    optimizer/scheduler/RNG state, so a checkpoint folder is itself a loadable heads folder."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._head_stats = {"train": None, "eval": None}
        self.remove_callback(PrinterCallback if self.args.disable_tqdm else ProgressCallback)
        self.add_callback(MedusaPrinterCallback() if self.args.disable_tqdm else MedusaProgressCallback())
        self.add_callback(EpochTimer())

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
            logs.update(summarise_head_stats(stats.cpu(), prefix="eval_" if phase == "eval" else ""))
            self._head_stats[phase] = None
        super().log(logs, start_time)

    def _heads_state_dict(self, state_dict: dict | None) -> dict[str, torch.Tensor]:
        if state_dict is None:
            return self.accelerator.unwrap_model(self.model).heads.state_dict()
        # DeepSpeed/FSDP hand us the gathered full state dict: keep the heads' part.
        return {k[len("heads.") :]: v for k, v in state_dict.items() if k.startswith("heads.")}

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        heads_state = self._heads_state_dict(state_dict)
        if not self.args.should_save:
            return
        heads = self.accelerator.unwrap_model(self.model).heads
        os.makedirs(output_dir, exist_ok=True)
        original = heads.state_dict()
        saved = type(heads)(heads.config)
        saved.load_state_dict({k: heads_state.get(k, v) for k, v in original.items()})
        saved.save(output_dir)
        if self.processing_class is not None:
            save_tokenizer(self.processing_class, output_dir)  # readable by TGI's transformers 4.x too
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model or self.model
        path = os.path.join(resume_from_checkpoint, WEIGHTS_NAME)
        self.accelerator.unwrap_model(model).heads.load_state_dict(load_file(path))

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
    """One readable console line: losses, learning rate, then each head's loss / top-1 / top-5."""
    parts = [f"step {step}"]
    for key in ("loss", "eval_loss", "learning_rate", "epoch", "train_loss", "train_runtime"):
        if key in logs:
            parts.append(f"{key} {logs[key]:.4g}")
    for prefix in ("", "eval_"):
        i = 0
        while f"{prefix}medusa{i}_loss" in logs:
            parts.append(
                f"{prefix}head{i} loss {logs[f'{prefix}medusa{i}_loss']:.3f} "
                f"top1 {logs[f'{prefix}medusa{i}_top1']:.3f} top5 {logs[f'{prefix}medusa{i}_top5']:.3f}"
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
