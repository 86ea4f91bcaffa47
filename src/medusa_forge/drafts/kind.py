"""What a kind of draft is: everything the rest of the code may ask about one (Medusa heads, an EAGLE-3 draft, the
next kind), so that no other module branches on a kind's name. Each kind is one module of this package that
registers one `DraftKind`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from medusa_forge.drafts.accuracy import HeadAccuracy
from medusa_forge.drafts.drafter import Drafter
from medusa_forge.generation.device import pack_linear_weights, place_for_decoding, resolve_device
from medusa_forge.modeling import TargetPlacement, input_device, load_base_model
from medusa_forge.pairing import check_fits, draft_base, model_shape
from medusa_forge.results import EvalReport


@dataclass
class ExportResult:
    """What `export` wrote for an engine, and how to serve it."""

    output_dir: Path
    files: list[Path]
    serve_commands: list[str]  # copy-paste commands that serve the written folder, pinned to a release
    notes: list[str] = field(default_factory=list)


@dataclass
class PushCheck:
    """A draft folder checked by its kind before `push` uploads it."""

    config: Any  # the draft's config as read (its base_model_name_or_path; what the card is rendered from)
    notes: list[str]
    readers: str  # who loads the base model from config.json's base_model_name_or_path (for a local path's error)
    card_options: dict[str, Any]  # the kind's own model card options known from the folder
    uploads: tuple[str, ...] | None  # the kind's own files to upload; None: every file of the folder
    commit_message: str


class DecodingDraft(ABC):
    """A draft loaded for decoding next to its base model (`DraftKind.load`): what generate, serve and eval decode
    with, through its drafter (the decoder never asks which kind it is)."""

    kind: DraftKind
    base: PreTrainedModel  # the base model it drafts for, loaded with it
    base_name: str  # the base model's name or path (where its tokenizer is, when the folder ships none)
    folder: Path  # where the draft was read from
    # The ids below which the drafter proposes, where it is cut from the whole vocabulary (eval.json's draft_vocab);
    # None: the whole vocabulary, or a draft vocabulary of the kind's own.
    draft_vocab: int | None = None

    @property
    @abstractmethod
    def max_depth(self) -> int:
        """The deepest tree decoding builds for it (its own bound, or the default trees' depth)."""

    def served_chain(self) -> int:
        """Draft tokens per step of the chain that `export`'s serve commands have the engines draft (vLLM's
        num_speculative_tokens): eval measures that chain by default, so the figure it reports is the one served."""
        return self.max_depth

    def chain_lengths(self) -> list[int]:
        """The chains `export` may have the engines draft, of which eval chooses by measured latency (and stores
        for export); one, the served chain, where the kind's commands fix it."""
        return [self.served_chain()]

    def scored_depth(self, requested: int) -> int:
        """The depth eval scores and builds trees to, `requested` being eval's --depth (a kind with a fixed depth,
        a predictor per depth, keeps its own)."""
        return requested

    @abstractmethod
    def accuracy(
        self,
        samples: list[tuple[list[int], list[int]]],
        depth: int,
        progress: bool = True,
        desc: str = "draft accuracy",
    ) -> list[HeadAccuracy]:
        """Teacher-forced rank counts of the base lm_head (predicts t+1), then of the draft's predictor for each depth
        d = 1..`depth` (predicts t+1+d), at every labelled position of `samples` ((input_ids, labels) pairs), as the
        drafter proposes: a token it cannot propose is a miss."""

    @abstractmethod
    def drafter(self) -> Drafter:
        """A fresh drafter over the loaded draft, for one decoder."""

    @abstractmethod
    def engine_drafter(self) -> Drafter:
        """A drafter that drafts as the engines that serve the kind do (what they will accept)."""

    @abstractmethod
    def vllm_speculative_config(self, scratch: Path, num_speculative_tokens: int) -> dict:
        """vLLM's --speculative-config for this draft; `scratch`: an empty folder it may write the draft into in
        the layout vLLM loads."""


def base_for_draft(
    kind: DraftKind,
    draft: nn.Module,
    config_path: Path,
    base_model: str | None,
    dtype: torch.dtype,
    device: str,
    placement: TargetPlacement | None,
) -> tuple[PreTrainedModel, str]:
    """The base model a draft model (`draft.config`: base_model_name_or_path, hidden_size, vocab_size) decodes with,
    placed for decoding and checked to fit it, and its name; the draft is moved to the base's input device in `dtype`
    and packed. For kinds whose draft is a model next to the base (not a wrapper around it)."""
    config = draft.config
    base_name = draft_base(config.base_model_name_or_path, base_model, config_path)
    base = load_base_model(base_name, dtype=dtype, placement=placement)
    base = place_for_decoding(base, resolve_device(device), dispatched=placement is not None)
    # Before any use (eval scores accuracy before it drafts): another shape is one clear error, not a traceback.
    check_fits(kind.label, config.hidden_size, config.vocab_size, model_shape(base), base_name, str(config_path.parent))
    draft.to(device=input_device(base), dtype=dtype)
    pack_linear_weights(draft)  # on a CPU: faster products (see there)
    return base, base_name


class DraftKind(ABC):
    """One kind of draft. Subclasses set the names below and implement the methods."""

    name: str  # the `draft_kind` value: train's --draft_kind, the pipeline's key, eval.json's field
    label: str  # what messages and reports call one draft of the kind ("Medusa heads")
    title: str  # the kind's short name in headings ("Medusa")
    config_name: str = "config.json"  # the draft folder's config file
    weights_name: str  # the draft folder's weights file (what later pipeline stages fingerprint)
    metric_name: str  # training logs name metric i of the draft `{metric_name}{i}_loss`, `_top1`, ...
    metric_label: str  # what one of those i is called in log lines and plots ("head", "step")
    predictor: str  # what the pipeline report calls one of them ("head", "draft step")
    first_predictor: int  # the number eval, the tree and the reports give metric 0 (heads from 0, steps from 1)
    # What the stored tree is to engines, after "`medusa-forge generate` and `serve` use it" (or "").
    tree_note: str = ""
    # Train flags only this kind reads: set to another value on a run of another kind, they are refused (not ignored).
    train_flags: tuple[str, ...] = ()
    formats: tuple[str, ...]  # the engines `export` writes the kind for
    default_formats: tuple[str, ...]  # the pipeline's export formats when its configuration names none
    # The on-disk layouts export's --layout may name for this kind's folders (read when detection is ambiguous);
    # () for a kind with one layout.
    layouts: tuple[str, ...] = ()
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
        """Whether `folder` (an existing folder) holds a draft of this kind; cheap, reads no weights (at most their
        names). A UserError for a damaged file it had to read counts only when no kind recognises the folder."""

    # ----- training -----

    @abstractmethod
    def record_layers(self, config: PretrainedConfig) -> list[int | str]:
        """What each token's hidden-state record holds for a base model of `config`, in order:
        `output_hidden_states` indices or "final" (each as wide as the base's hidden size). Known from the config
        alone: the cache's key and disk plan are computed before the base is loaded."""

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
        which has `config` and `save(folder)`. `token_items`: the training data's token items, when needed.
        `base` is the target or, when every record is cached, its stand-in (`train.target_files.FrozenTargetParts`:
        config, input and output embeddings, device, dtype; no forward pass); the module keeps it as its `base`
        attribute, which training swaps for the stand-in once it has built the cache."""

    @abstractmethod
    def checkpoint_state(self, folder: Path) -> dict[str, torch.Tensor]:
        """The draft's weights in a checkpoint folder the trainer saved (checked as far as loading checks)."""

    @abstractmethod
    def read_config(self, folder: Path) -> Any:
        """The draft's config as saved in `folder` (what the model card describes)."""

    # ----- decoding -----

    @abstractmethod
    def load(
        self,
        folder: Path,
        base_model: str | None,
        dtype: torch.dtype,
        device: str,
        draft_vocab: int | None,
        placement: TargetPlacement | None = None,
    ) -> DecodingDraft:
        """The draft in `folder` and its base model (`base_model`, else the one its config names), in `dtype` on
        `device` ("auto" allowed). `draft_vocab`: propose only ids below it (a UserError for a kind without).
        `placement`: the base is dispatched so (the --target_* flags), the draft put on its input device."""

    # ----- model card -----

    config_type: type  # the class of its config (`read_config`): what a card is rendered from

    @abstractmethod
    def render_card(
        self,
        config: Any,
        base_model_id: str,
        facts: dict[str, str],
        metrics: dict[str, float],
        evaluation: EvalReport | None,
        repo_id: str | None,
        options: dict[str, Any],
    ) -> str:
        """The draft folder's README.md (`model_card.render_model_card`); `options`: the kind's own, as given or as
        read back from model_card.json (so: checked here)."""

    # ----- export -----

    @abstractmethod
    def export(
        self,
        source: Path,
        fmt: str,
        output_dir: Path,
        base_model_id: str | None = None,
        tokenizer: str | None = None,
        layout: str | None = None,
    ) -> ExportResult:
        """Write the draft in `source` for engine `fmt` into `output_dir` (naming the base `base_model_id` when
        given), read it back and compare; a UserError for a format not in `formats`. `tokenizer`, `layout`: export's
        flags for kinds whose folders need them (else ignored)."""

    @abstractmethod
    def check_for_push(self, folder: Path) -> PushCheck:
        """Check the draft in `folder` as far as the engines would (a UserError for what they would misread)."""

    def training_passes(self, setting: Callable[[str], Any]) -> int:
        """Passes of the draft per training token (`setting(flag)`: a train flag's value in this run)."""
        return 1

    def report_rows(self, draft_config: dict[str, Any], setting: Callable[[str], Any]) -> list[tuple[str, str]]:
        """The pipeline report's rows about the draft's shape: `draft_config` its folder's config.json as read
        (keys may be missing), `setting(flag)` a train flag's value in this run."""
        return []

    def training_facts(self, config: Any) -> dict[str, str]:
        """Rows the model card adds about training (a TrainConfig's kind-specific flags)."""
        return {}

    def card_options(self, base: PreTrainedModel) -> dict[str, Any]:
        """The kind's own model card options that only the base model tells (training records them in
        model_card.json, so a later push renders the same card)."""
        return {}
