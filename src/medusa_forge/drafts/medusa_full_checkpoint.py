"""Full model checkpoints of the original trainer (Medusa-2, its "new" model class): the base model's weights
and the heads' in one set of files, the heads' names under a `medusa_head.` prefix."""

from __future__ import annotations

from pathlib import Path

import torch

from medusa_forge.errors import UserError
from medusa_forge.formats.files import load_pickle, load_safetensors

FULL_PREFIX = "medusa_head."


def read_full(folder: Path, files: list[Path]) -> dict[str, torch.Tensor]:
    """The heads' tensors, prefix removed, from every weight file of the checkpoint."""
    state: dict[str, torch.Tensor] = {}
    for path in files:
        if path.suffix == ".safetensors":
            state.update(load_safetensors(path, FULL_PREFIX))
        else:
            state.update({k[len(FULL_PREFIX) :]: v for k, v in load_pickle(path).items() if k.startswith(FULL_PREFIX)})
    if not state:
        raise UserError(f"{folder}: no tensor names start with {FULL_PREFIX!r}")
    return state


def has_head_names(names: list[str]) -> bool:
    """Whether a weight file holds Medusa head tensors under the full-checkpoint prefix."""
    return any(name.startswith(FULL_PREFIX) for name in names)
