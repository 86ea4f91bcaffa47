"""Medusa heads as a kind of draft: K heads over the base model's final hidden state (`medusa_heads.py`), stored in
TGI's layout or any other Medusa layout (`medusa_layouts.py`, read by `medusa_read.py`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel

from medusa_forge.drafts import medusa_card, medusa_export, medusa_training
from medusa_forge.drafts import medusa_heads as heads
from medusa_forge.drafts.kind import DraftKind, ExportResult, PushCheck
from medusa_forge.drafts.medusa_drafter import MedusaForDecoding
from medusa_forge.drafts.medusa_layouts import FORMATS, LAYOUTS
from medusa_forge.drafts.medusa_read import folder_layouts
from medusa_forge.formats.files import load_safetensors
from medusa_forge.modeling import TargetPlacement
from medusa_forge.results import EvalReport


class MedusaKind(DraftKind):
    name = "medusa"
    label = "Medusa heads"
    title = "Medusa"
    config_name = heads.CONFIG_NAME
    config_type = heads.MedusaConfig
    weights_name = heads.WEIGHTS_NAME
    metric_name = "medusa"  # logged as medusa{i}_loss, medusa{i}_top1, ... (the original trainer's names)
    metric_label = "head"
    predictor = "head"
    first_predictor = 0
    tree_note = "; TensorRT-LLM takes it as `--medusa_choices`"
    # medusa_hidden_cache, medusa_hidden_cache_dir and medusa_loss_chunk_size (the tutorial's names) serve both kinds.
    train_flags = ("medusa_num_heads", "medusa_num_layers", "medusa_decay_coefficient", "medusa_soft_labels",
                   "medusa_freeze_projection", "medusa_draft_vocab_size")  # fmt: skip
    formats = FORMATS
    default_formats = ("tgi", "vllm")
    layouts = tuple(LAYOUTS)
    expected_files = "; ".join(LAYOUTS.values())
    records_need_token_ids = False
    trains_without_cache = False  # the user turned the cache on (the tutorial's flag): say what to change
    training_tokens_per_s = 1300.0  # with a draft vocabulary

    def recognises(self, folder: Path) -> bool:
        return bool(folder_layouts(folder))

    def record_layers(self, config: PretrainedConfig) -> list[int | str]:
        return ["final"]

    def records(self, base: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return medusa_training.final_hidden_records(base, input_ids, attention_mask)

    def training_module(
        self,
        base: PreTrainedModel,
        config: Any,
        base_path: str,
        token_items: Callable[[], list[dict[str, list[int]]]],
    ) -> medusa_training.MedusaForTraining:
        return medusa_training.new_training_module(base, config, base_path)

    def checkpoint_state(self, folder: Path) -> dict[str, torch.Tensor]:
        return load_safetensors(folder / self.weights_name)

    def report_rows(self, draft_config: dict[str, Any], setting: Callable[[str], Any]) -> list[tuple[str, str]]:
        shape = f"{draft_config.get('medusa_num_heads')} x {draft_config.get('medusa_num_layers')}"
        return [("Heads x residual blocks", shape)]

    def read_config(self, folder: Path) -> heads.MedusaConfig:
        return heads.MedusaConfig.load(folder)

    def render_card(
        self,
        config: heads.MedusaConfig,
        base_model_id: str,
        facts: dict[str, str],
        metrics: dict[str, float],
        evaluation: EvalReport | None,
        repo_id: str | None,
        options: dict[str, Any],
    ) -> str:
        layout = "vllm" if options.get("layout") == "vllm" else "medusa"  # the layouts push uploads
        metric = (self.metric_label, self.metric_name, self.first_predictor)
        return medusa_card.render_card(config, base_model_id, facts, metrics, evaluation, repo_id, *metric, layout)

    def export(
        self,
        source: Path,
        fmt: str,
        output_dir: Path,
        base_model_id: str | None = None,
        tokenizer: str | None = None,
        layout: str | None = None,
    ) -> ExportResult:
        return medusa_export.export_heads(source, fmt, output_dir, base_model_id, tokenizer, layout)

    def check_for_push(self, folder: Path) -> PushCheck:
        return medusa_export.check_for_push(folder)

    def load(
        self,
        folder: Path,
        base_model: str | None,
        dtype: torch.dtype,
        device: str,
        draft_vocab: int | None,
        placement: TargetPlacement | None = None,
    ) -> MedusaForDecoding:
        return MedusaForDecoding.load(self, folder, base_model, dtype, device, draft_vocab, placement)


MEDUSA = MedusaKind()
