"""What a kind of draft is: everything the rest of the code may ask about one (Medusa heads, an EAGLE-3 draft, the
next kind), so that no other module branches on a kind's name. Each kind is one module of this package that
registers one `DraftKind`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel


class DraftKind(ABC):
    """One kind of draft. Subclasses set the names below and implement the methods."""

    name: str  # the `draft_kind` value: train's --draft_kind, the pipeline's key, eval.json's field
    label: str  # what messages and reports call one draft of the kind ("Medusa heads")
    title: str  # the kind's short name in headings ("Medusa")
    config_name: str = "config.json"  # the draft folder's config file
    weights_name: str  # the draft folder's weights file (what later pipeline stages fingerprint)
    metric_name: str  # training logs name metric i of the draft `{metric_name}{i}_loss`, `_top1`, ...
    metric_label: str  # what one of those i is called in log lines and plots ("head", "step")
    formats: tuple[str, ...]  # the engines `export` writes the kind for
    default_formats: tuple[str, ...]  # the pipeline's export formats when its configuration names none
    expected_files: str  # what its folder holds, for the error that finds no kind in a folder
    # Training: its hidden-state cache records go with the token ids (a draft that embeds the next tokens).
    records_need_token_ids: bool
    # A hidden-state cache the disk cannot hold: train on, computing the records per batch (else: the error).
    trains_without_cache: bool
    # Measured training speed from the cache, tokens per second per epoch per pass (`training_passes`), on the
    # 2-core CPU with the quickstart's settings: what the pipeline's time estimate divides by.
    training_tokens_per_s: float

    @abstractmethod
    def recognises(self, folder: Path) -> bool:
        """Whether `folder` (an existing folder) holds a draft of this kind; cheap, reads no weights."""

    # ----- training -----

    @abstractmethod
    def record_layers(self, base: PreTrainedModel) -> list[int | str]:
        """What each token's hidden-state record holds, in order: `output_hidden_states` indices or "final"
        (each as wide as the base's hidden size)."""

    @abstractmethod
    def records(self, base: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T, width] the records of one frozen forward of `base` (`record_layers`), in its dtype."""

    @abstractmethod
    def training_module(
        self,
        base: PreTrainedModel,
        config: Any,
        base_path: str,
        token_items: Callable[[], list[dict[str, list[int]]]],
    ) -> nn.Module:
        """A fresh draft for `base` inside its training module, as train's flags (`config`: a TrainConfig) say.
        The module's forward(labels, input_ids, attention_mask | hidden_states) returns {"loss", "head_stats"}
        ([K, 3 + len(TOPK)] sums, `fused_ce.summarise_head_stats`); `draft_attribute` names the draft submodule,
        which has `config` and `save(folder)`. `token_items`: the training data's token items, when needed."""

    @abstractmethod
    def checkpoint_state(self, folder: Path) -> dict[str, torch.Tensor]:
        """The draft's weights in a checkpoint folder the trainer saved (checked as far as loading checks)."""

    @abstractmethod
    def read_config(self, folder: Path) -> Any:
        """The draft's config as saved in `folder` (what the model card describes)."""

    def training_passes(self, setting: Callable[[str], Any]) -> int:
        """Passes of the draft per training token (`setting(flag)`: a train flag's value in this run)."""
        return 1

    def training_facts(self, config: Any) -> dict[str, str]:
        """Rows the model card adds about training (a TrainConfig's kind-specific flags)."""
        return {}

    def target_num_layers(self, base: PreTrainedModel) -> int | None:
        """The base's layer count, for a kind whose model card names the layers it reads; else None."""
        return None
