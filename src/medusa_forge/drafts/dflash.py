"""A DFlash block draft as a kind of draft: a few non-causal layers over several of the target's hidden states that
draft a whole block in one pass (`dflash_model.py`), in the folder layout vLLM and SGLang load."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel

from medusa_forge.drafts import dflash_card, dflash_export, dflash_training, model_folder
from medusa_forge.drafts import dflash_config as layout
from medusa_forge.drafts.dflash_drafter import DFlashForDecoding
from medusa_forge.drafts.dflash_model import DFlashDraft
from medusa_forge.drafts.kind import DraftKind, ExportResult, PushCheck
from medusa_forge.engine_commands import DFLASH_ENGINES
from medusa_forge.formats.files import read_json
from medusa_forge.modeling import TargetPlacement
from medusa_forge.results import EvalReport


class DFlashKind(DraftKind):
    name = "dflash"
    label = "DFlash draft"
    title = "DFlash"
    config_name = model_folder.CONFIG_NAME
    config_type = layout.DFlashConfig
    weights_name = model_folder.WEIGHTS_NAME
    metric_name = "dflash_pos"  # dflash_pos{i}_loss: block slot i + 1
    metric_label = "position"
    predictor = "block position"
    first_predictor = 1  # slot 1 drafts the token after the base model's
    tree_note = "; vLLM and SGLang draft the chain of each position's top-1 instead"
    train_flags = ("dflash_block_size", "dflash_num_layers", "dflash_num_anchors", "dflash_loss_gamma",
                   "dflash_mask_token_id")  # fmt: skip
    formats = DFLASH_ENGINES  # the same folder loads in both (docs/dflash-reference.md §0)
    default_formats = DFLASH_ENGINES
    expected_files = f"{model_folder.CONFIG_NAME} naming {layout.ARCHITECTURE} + {model_folder.WEIGHTS_NAME}"
    records_need_token_ids = True  # the block embeds the anchor token
    trains_without_cache = True  # its features are computed per batch instead
    # The quickstart's data (500 conversations at 384 tokens, 2 epochs) with block 5 trained in 314 s where EAGLE-3's
    # 3 steps took 555 s on the same idle VM: 1223 against 2075 estimate-tokens per s per pass there, so EAGLE-3's
    # figure (measured on a faster VM) x 0.59 (BENCHMARKS.md, "DFlash and EAGLE-3 at the quickstart's budget").
    training_tokens_per_s = 1800.0

    def recognises(self, folder: Path) -> bool:
        return layout.is_dflash_folder(folder)

    def record_layers(self, config: PretrainedConfig) -> list[int | str]:
        layers = layout.feature_layer_ids(config.get_text_config().num_hidden_layers)
        return list(layout.hidden_state_indices(layers))

    def records(self, base: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        layers = self.record_layers(base.config)
        return dflash_training.feature_records(base, input_ids, attention_mask, tuple(layers))

    def training_module(
        self,
        base: PreTrainedModel,
        config: Any,
        base_path: str,
        token_items: Callable[[], list[dict[str, list[int]]]],
    ) -> dflash_training.DFlashForTraining:
        return dflash_training.new_training_module(base, config, base_path, token_items)

    def checkpoint_state(self, folder: Path) -> dict[str, torch.Tensor]:
        return DFlashDraft.load(folder).state_dict()  # load() checks the folder as the engines would

    def read_config(self, folder: Path) -> layout.DFlashConfig:
        path = folder / self.config_name
        return layout.DFlashConfig.from_json(read_json(path), str(path))

    def export(
        self,
        source: Path,
        fmt: str,
        output_dir: Path,
        base_model_id: str | None = None,
        tokenizer: str | None = None,
        layout: str | None = None,
    ) -> ExportResult:
        return dflash_export.export_draft(source, fmt, output_dir, base_model_id)

    def check_for_push(self, folder: Path) -> PushCheck:
        return dflash_export.check_for_push(folder)

    def load(
        self,
        folder: Path,
        base_model: str | None,
        dtype: torch.dtype,
        device: str,
        draft_vocab: int | None,
        placement: TargetPlacement | None = None,
    ) -> DFlashForDecoding:
        return DFlashForDecoding.load(self, folder, base_model, dtype, device, draft_vocab, placement)

    def report_rows(self, draft_config: dict[str, Any], setting: Callable[[str], Any]) -> list[tuple[str, str]]:
        layers, size = draft_config.get("num_hidden_layers"), draft_config.get("block_size")
        ids = (draft_config.get("dflash_config") or {}).get("target_layer_ids")
        noun = "layer" if layers == 1 else "layers"
        return [("Draft layers x block", f"{layers} non-causal {noun} x blocks of {size} tokens; target layers {ids}")]

    def training_facts(self, config: Any) -> dict[str, str]:
        gamma = config.dflash_loss_gamma
        decay = f"slot k weighted exp(-(k-1)/{gamma:g})" if gamma > 0 else "every slot weighted 1"
        return {
            "Block objective": f"blocks of {config.dflash_block_size}, up to {config.dflash_num_anchors} anchors "
            f"per sequence, {decay}",
            "Learning rate": f"{config.learning_rate:g}",
        }

    def render_card(
        self,
        config: layout.DFlashConfig,
        base_model_id: str,
        facts: dict[str, str],
        metrics: dict[str, float],
        evaluation: EvalReport | None,
        repo_id: str | None,
        options: dict[str, Any],
    ) -> str:
        metric = (self.metric_label, self.metric_name, self.first_predictor)
        return dflash_card.render_card(config, base_model_id, facts, metrics, evaluation, repo_id, *metric)


DFLASH = DFlashKind()
