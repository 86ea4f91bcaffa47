"""An EAGLE-3 draft as a kind of draft: one decoder layer over three of the target's hidden states (`eagle3.py`),
in the folder layout vLLM and SGLang load."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from medusa_forge import eagle3
from medusa_forge.drafts import eagle3_training
from medusa_forge.drafts.kind import DraftKind
from medusa_forge.engine_commands import EAGLE3_ENGINES
from medusa_forge.formats.files import read_json


class Eagle3Kind(DraftKind):
    name = "eagle3"
    label = "EAGLE-3 draft"
    title = "EAGLE-3"
    config_name = eagle3.CONFIG_NAME
    weights_name = eagle3.WEIGHTS_NAME
    metric_name = "eagle3_step"  # eagle3_step{j}_loss: step j of the training-time test
    metric_label = "step"
    formats = EAGLE3_ENGINES  # the same folder loads in both (docs/eagle3-reference.md §0)
    default_formats = EAGLE3_ENGINES
    expected_files = f"{eagle3.CONFIG_NAME} naming {eagle3.ARCHITECTURE} + {eagle3.WEIGHTS_NAME}"
    records_need_token_ids = True  # the draft embeds the next tokens
    trains_without_cache = True  # its features are computed per batch instead (the frozen pass every epoch)
    # The quickstart's 500 conversations at 384 tokens, 3 steps x 3 epochs, took 534 s with --bf16 on 2 cores
    # (Medusa's 3 epochs: 388 s), and the estimate's token count for them over-counts as it does for Medusa.
    training_tokens_per_s = 3000.0

    def recognises(self, folder: Path) -> bool:
        return eagle3.is_eagle3_folder(folder)

    def record_layers(self, base: PreTrainedModel) -> list[int | str]:
        return [*eagle3.target_layers(base.config.get_text_config().num_hidden_layers), "final"]

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
        return eagle3.Eagle3Draft.load(folder).state_dict()  # load() checks the folder as the engines would

    def read_config(self, folder: Path) -> eagle3.Eagle3Config:
        # As saved: its torch_dtype is the saved weights'.
        path = folder / self.config_name
        return eagle3.Eagle3Config.from_json(read_json(path), str(path))

    def training_passes(self, setting: Callable[[str], Any]) -> int:
        return setting("eagle3_ttt_steps")  # every training-time-test step is one more pass of the draft layer

    def training_facts(self, config: Any) -> dict[str, str]:
        return {
            "Training-time test": (
                f"{config.eagle3_ttt_steps} steps, step j's loss weighted {config.eagle3_step_decay:g}**j"
            ),
            "Learning rate": f"{config.learning_rate:g}",
        }

    def target_num_layers(self, base: PreTrainedModel) -> int | None:
        return base.config.get_text_config().num_hidden_layers


EAGLE3 = Eagle3Kind()
