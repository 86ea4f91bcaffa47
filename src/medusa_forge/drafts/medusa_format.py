"""Our layout, which TGI and TensorRT-LLM load as it is: config.json (MedusaConfig, no `architectures`) +
medusa_lm_head.safetensors in canonical names. Also read: the original trainer's medusa_lm_head.pt, and
"version 2" heads without per-head projections, which get the base model's lm_head copied into each."""

from __future__ import annotations

from pathlib import Path

import torch

from medusa_forge.drafts.medusa_checks import HeadsShape, check_no_other_weights
from medusa_forge.drafts.medusa_full_checkpoint import FULL_PREFIX
from medusa_forge.drafts.medusa_heads import CONFIG_NAME, WEIGHTS_NAME
from medusa_forge.drafts.medusa_layouts import LoadedHeads
from medusa_forge.errors import UserError
from medusa_forge.formats.files import load_pickle, load_safetensors, save_safetensors

ORIGINAL_PT_NAME = "medusa_lm_head.pt"  # FasterDecoding/Medusa medusa/model/medusa_model.py


def read_medusa(weights: Path) -> dict[str, torch.Tensor]:
    """medusa_lm_head.safetensors or .pt; a `medusa_head.` prefix some exports keep is dropped."""
    state = load_safetensors(weights) if weights.suffix == ".safetensors" else load_pickle(weights)
    return {k.removeprefix(FULL_PREFIX): v for k, v in state.items()}


def materialise_projections(state: dict[str, torch.Tensor], shape: HeadsShape, base: str) -> dict[str, torch.Tensor]:
    """Version 2 heads reuse the base lm_head; our layout stores it per head, as TGI's V1 loader needs."""
    from medusa_forge.modeling import load_base_model

    model = load_base_model(base, dtype=shape.dtype)
    lm_head = model.get_output_embeddings()
    if lm_head is None or getattr(lm_head, "weight", None) is None:
        raise UserError(f"base model {base} has no lm_head to copy into the version 2 heads")
    weight = lm_head.weight.detach()
    if weight.shape[1] != shape.hidden_size:
        raise UserError(
            f"version 2 heads have hidden size {shape.hidden_size}, but base model {base}'s lm_head is "
            f"{tuple(weight.shape)}; pass the right base with --base-model"
        )
    out = dict(state)
    for i in range(shape.num_heads):
        out[f"{i}.{shape.num_layers}.weight"] = weight.clone().contiguous()
    return out


def write_medusa(loaded: LoadedHeads, output_dir: Path) -> list[Path]:
    """Our layout (= TGI / TensorRT-LLM): config.json without `architectures` + medusa_lm_head.safetensors."""
    check_no_other_weights(output_dir, WEIGHTS_NAME)
    output_dir.mkdir(parents=True, exist_ok=True)
    loaded.config.save(output_dir)
    save_safetensors(loaded.state, output_dir / WEIGHTS_NAME)
    return [output_dir / CONFIG_NAME, output_dir / WEIGHTS_NAME]
