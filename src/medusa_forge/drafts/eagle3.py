"""An EAGLE-3 draft as a kind of draft: one decoder layer over three of the target's hidden states
(`eagle3_model.py`), in the folder layout vLLM and SGLang load."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel

from medusa_forge.drafts import eagle3_card, eagle3_export, eagle3_training, model_folder
from medusa_forge.drafts import eagle3_config as layout
from medusa_forge.drafts.eagle3_drafter import Eagle3ForDecoding
from medusa_forge.drafts.eagle3_model import Eagle3Draft
from medusa_forge.drafts.kind import DraftKind, ExportResult, PushCheck
from medusa_forge.engine_commands import EAGLE3_ENGINES
from medusa_forge.formats.files import read_json
from medusa_forge.modeling import TargetPlacement
from medusa_forge.results import EvalReport


class Eagle3Kind(DraftKind):
    name = "eagle3"
    label = "EAGLE-3 draft"
    title = "EAGLE-3"
    config_name = model_folder.CONFIG_NAME
    config_type = layout.Eagle3Config
    weights_name = model_folder.WEIGHTS_NAME
    metric_name = "eagle3_step"  # eagle3_step{j}_loss: step j of the training-time test
    metric_label = "step"
    predictor = "draft step"
    first_predictor = 1  # step 1 drafts the token after the base model's
    train_flags = ("eagle3_ttt_steps", "eagle3_step_decay", "eagle3_draft_vocab_size", "eagle3_intermediate_size",
                   "eagle3_fc_norm", "eagle3_norm_output")
    formats = EAGLE3_ENGINES  # the same folder loads in both (docs/eagle3-reference.md §0)
    default_formats = EAGLE3_ENGINES
    expected_files = f"{model_folder.CONFIG_NAME} naming {layout.ARCHITECTURE} + {model_folder.WEIGHTS_NAME}"
    records_need_token_ids = True  # the draft embeds the next tokens
    trains_without_cache = True  # its features are computed per batch instead (the frozen pass every epoch)
    # The quickstart's 500 conversations at 384 tokens, 3 steps x 3 epochs, took 534 s with --bf16 on 2 cores
    # (Medusa's 3 epochs: 388 s), and the estimate's token count for them over-counts as it does for Medusa.
    training_tokens_per_s = 3000.0

    def recognises(self, folder: Path) -> bool:
        return layout.is_eagle3_folder(folder)

    def record_layers(self, config: PretrainedConfig) -> list[int | str]:
        return [*layout.target_layers(config.get_text_config().num_hidden_layers), "final"]

    def records(self, base: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return eagle3_training.feature_records(base, input_ids, attention_mask)

    def training_module(
        self,
        base: PreTrainedModel,
        config: Any,
        base_path: str,
        token_items: Callable[[], list[dict[str, list[int]]]],
    ) -> eagle3_training.Eagle3ForTraining:
        return eagle3_training.new_training_module(base, config, base_path, token_items)

    def checkpoint_state(self, folder: Path) -> dict[str, torch.Tensor]:
        return Eagle3Draft.load(folder).state_dict()  # load() checks the folder as the engines would

    def read_config(self, folder: Path) -> layout.Eagle3Config:
        # As saved: its torch_dtype is the saved weights'.
        path = folder / self.config_name
        return layout.Eagle3Config.from_json(read_json(path), str(path))

    def export(
        self,
        source: Path,
        fmt: str,
        output_dir: Path,
        base_model_id: str | None = None,
        tokenizer: str | None = None,
        layout: str | None = None,
    ) -> ExportResult:
        return eagle3_export.export_draft(source, fmt, output_dir, base_model_id)

    def check_for_push(self, folder: Path) -> PushCheck:
        return eagle3_export.check_for_push(folder)

    def load(
        self,
        folder: Path,
        base_model: str | None,
        dtype: torch.dtype,
        device: str,
        draft_vocab: int | None,
        placement: TargetPlacement | None = None,
    ) -> Eagle3ForDecoding:
        return Eagle3ForDecoding.load(self, folder, base_model, dtype, device, draft_vocab, placement)

    def training_passes(self, setting: Callable[[str], Any]) -> int:
        return setting("eagle3_ttt_steps")  # every training-time-test step is one more pass of the draft layer

    def report_rows(self, draft_config: dict[str, Any], setting: Callable[[str], Any]) -> list[tuple[str, str]]:
        layers, vocabulary = draft_config.get("num_hidden_layers"), draft_config.get("draft_vocab_size")
        steps = setting("eagle3_ttt_steps")
        switches = [key for key in layout.EAGLE31_SWITCHES if draft_config.get(key)]
        eagle31 = f"; EAGLE 3.1: {', '.join(switches)}" if switches else ""
        return [
            ("Draft layers x vocabulary", f"{layers} x {vocabulary} tokens; {steps} training-time-test steps{eagle31}")
        ]

    def training_facts(self, config: Any) -> dict[str, str]:
        return {
            "Training-time test": (
                f"{config.eagle3_ttt_steps} steps, step j's loss weighted {config.eagle3_step_decay:g}**j"
            ),
            "Learning rate": f"{config.learning_rate:g}",
        }

    def card_options(self, base: PreTrainedModel) -> dict[str, Any]:
        return {"target_num_layers": base.config.get_text_config().num_hidden_layers}  # names the feature layers

    def render_card(
        self,
        config: layout.Eagle3Config,
        base_model_id: str,
        facts: dict[str, str],
        metrics: dict[str, float],
        evaluation: EvalReport | None,
        repo_id: str | None,
        options: dict[str, Any],
    ) -> str:
        layers = options.get("target_num_layers")
        layers = layers if isinstance(layers, int) and not isinstance(layers, bool) else None
        metric = (self.metric_label, self.metric_name, self.first_predictor)
        return eagle3_card.render_card(config, base_model_id, facts, metrics, evaluation, repo_id, *metric, layers)


EAGLE3 = Eagle3Kind()
