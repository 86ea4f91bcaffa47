"""Medusa heads as a kind of draft: K heads over the base model's final hidden state (`heads.py`), stored in
TGI's layout or any other Medusa layout (`formats/`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from medusa_forge import heads
from medusa_forge.drafts import medusa_training
from medusa_forge.drafts.kind import DraftKind
from medusa_forge.formats.files import load_safetensors
from medusa_forge.formats.layouts import FORMATS, LAYOUTS
from medusa_forge.formats.read import folder_layouts


class MedusaKind(DraftKind):
    name = "medusa"
    label = "Medusa heads"
    title = "Medusa"
    config_name = heads.CONFIG_NAME
    weights_name = heads.WEIGHTS_NAME
    metric_name = "medusa"  # logged as medusa{i}_loss, medusa{i}_top1, ... (the original trainer's names)
    metric_label = "head"
    formats = FORMATS
    default_formats = ("tgi", "vllm")
    expected_files = "; ".join(LAYOUTS.values())
    records_need_token_ids = False
    trains_without_cache = False  # the user turned the cache on (the tutorial's flag): say what to change
    training_tokens_per_s = 1300.0  # with a draft vocabulary

    def recognises(self, folder: Path) -> bool:
        return bool(folder_layouts(folder))

    def record_layers(self, base: PreTrainedModel) -> list[int | str]:
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

    def read_config(self, folder: Path) -> heads.MedusaConfig:
        return heads.MedusaConfig.load(folder)


MEDUSA = MedusaKind()
