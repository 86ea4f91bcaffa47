"""Medusa heads: the module, its on-disk format (the TGI / TensorRT-LLM / original Medusa layout), and a
base model + heads wrapper that gives every head's logits for a batch in one call.

Head i (0-based) reads the base model's final hidden state at position t and predicts token t+2+i:
L residual blocks `x + SiLU(W x + b)` (W zero-initialised, each block its own weights), then a vocabulary
projection initialised from the base model's lm_head.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from medusa_forge.drafts.medusa_checks import check_canonical, check_config_counts, check_has_projections
from medusa_forge.errors import UserError
from medusa_forge.formats.files import load_safetensors, read_json, save_safetensors
from medusa_forge.modeling import backbone

if TYPE_CHECKING:
    from medusa_forge.modeling import TargetPlacement

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "medusa_lm_head.safetensors"


@dataclass
class MedusaConfig:
    """What `config.json` of a heads folder holds. TGI reads medusa_num_heads, medusa_num_layers and
    base_model_name_or_path; the file must not contain `architectures` (TGI would take another code path)."""

    medusa_num_heads: int
    medusa_num_layers: int
    hidden_size: int
    vocab_size: int
    base_model_name_or_path: str
    # Heads trained to propose only ids < N (vLLM truncated_vocab_size); absent from the file when None.
    draft_vocab_size: int | None = None

    def save(self, folder: str | Path) -> None:
        fields = {k: v for k, v in asdict(self).items() if v is not None or k != "draft_vocab_size"}
        Path(folder, CONFIG_NAME).write_text(json.dumps(fields, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> MedusaConfig:
        path = Path(folder, CONFIG_NAME)
        if not path.is_file():
            raise UserError(f"{folder} is not a Medusa heads folder: {CONFIG_NAME} is missing")
        raw = read_json(path)
        missing = [k for k in ("medusa_num_heads", "medusa_num_layers", "base_model_name_or_path") if k not in raw]
        if missing:
            raise UserError(f"{path} lacks {missing}; is this a Medusa heads folder in the TGI layout?")
        return cls(**{k: raw.get(k) for k in cls.__dataclass_fields__})


class ResBlock(nn.Module):
    """x + SiLU(W x + b), W zero-initialised so a fresh block starts near the identity."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class MedusaHeads(nn.ModuleList):
    """K heads; the state dict names are exactly the TGI layout: `{i}.{j}.linear.weight|bias`, `{i}.{L}.weight`."""

    def __init__(self, config: MedusaConfig) -> None:
        num_layers, hidden, vocab = config.medusa_num_layers, config.hidden_size, config.vocab_size
        super().__init__(
            nn.Sequential(*[ResBlock(hidden) for _ in range(num_layers)], nn.Linear(hidden, vocab, bias=False))
            for _ in range(config.medusa_num_heads)
        )
        self.config = config

    @classmethod
    def for_base_model(
        cls, base: PreTrainedModel, num_heads: int, num_layers: int, base_model_name_or_path: str
    ) -> MedusaHeads:
        """Fresh heads for `base`, each vocabulary projection a copy of the base lm_head."""
        lm_head = base.get_output_embeddings()
        if lm_head is None or not hasattr(lm_head, "weight"):
            raise UserError(f"{type(base).__name__} has no output embedding (lm_head) to start the heads from")
        vocab, hidden = lm_head.weight.shape
        config = MedusaConfig(num_heads, num_layers, hidden, vocab, base_model_name_or_path)
        heads = cls(config)
        with torch.no_grad():
            for head in heads:
                head[-1].weight.copy_(lm_head.weight.float())
        return heads

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits of every head, stacked: [K, *hidden_states.shape[:-1], V]."""
        return torch.stack([head(hidden_states) for head in self])

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save(folder)
        save_safetensors(self.state_dict(), folder / WEIGHTS_NAME)

    @classmethod
    def load(cls, folder: str | Path) -> MedusaHeads:
        config = MedusaConfig.load(folder)
        weights_path = Path(folder, WEIGHTS_NAME)
        if not weights_path.is_file():
            raise UserError(f"{folder}: {WEIGHTS_NAME} is missing")
        state = load_safetensors(weights_path)
        # The checks every layout reader uses: names, numbering and shapes, then the config's counts and sizes.
        shape = check_canonical(state, str(weights_path))
        config_path = str(Path(folder, CONFIG_NAME))
        check_config_counts(asdict(config), shape, config_path, ("medusa_num_heads", "medusa_num_layers"))
        check_has_projections(shape, str(weights_path))
        heads = cls(config)
        heads.load_state_dict(state)
        return heads




class MedusaModel(nn.Module):
    """A frozen base model plus Medusa heads; what decoding, evaluation and serving use."""

    def __init__(self, base: PreTrainedModel, heads: MedusaHeads) -> None:
        super().__init__()
        base.eval()
        base.requires_grad_(False)
        self.base = base
        self.heads = heads

    @classmethod
    def from_pretrained(
        cls,
        heads_dir: str | Path,
        base_model: str | PreTrainedModel | None = None,
        dtype: torch.dtype = torch.float32,
        placement: TargetPlacement | None = None,
    ) -> MedusaModel:
        """Load heads and put them on their base model (the one in config.json unless given; dispatched by
        `placement` when given) where its inputs go."""
        from medusa_forge.modeling import input_device, load_base_model
        from medusa_forge.pairing import check_fits, draft_base, model_shape

        heads = MedusaHeads.load(heads_dir)
        if isinstance(base_model, PreTrainedModel):
            name = base_model.config.name_or_path
        else:
            name = draft_base(heads.config.base_model_name_or_path, base_model, Path(heads_dir, CONFIG_NAME))
            base_model = load_base_model(name, dtype=dtype, placement=placement)
        config = heads.config
        check_fits("Medusa heads", config.hidden_size, config.vocab_size, model_shape(base_model), name, str(heads_dir))
        return cls(base_model, heads.to(device=input_device(base_model), dtype=dtype))

    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return backbone(self.base)(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state

    @torch.no_grad()
    def head_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[K, B, T, V]: head i's logits at position t are its prediction for token t+2+i."""
        hidden = self.hidden_states(input_ids, attention_mask)
        return self.heads(hidden.to(self.heads[0][-1].weight.dtype))
