"""The frozen target as files: what training from a complete hidden-state cache needs of it, read without loading it.

Training from the cache never runs the target: the drafts' losses read only its config, its input embedding (an
EAGLE-3 draft embeds the next tokens) and its lm_head (head and draft initialisation, soft targets, the target's
argmax). The final norm is not needed: the cached final state is taken after it. `TargetFiles` reads those tensors
from the model's safetensors files (`safe_open`, one tensor at a time; a sharded checkpoint's
`model.safetensors.index.json` says which file holds which) and fingerprints the files, so that the cache key is
known before anything is loaded. `FrozenTargetParts` is the small stand-in the kinds' training modules accept in
place of the target: an 8B target costs its two [V, H] matrices instead of 16 GB per rank.
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from medusa_forge.errors import UserError
from medusa_forge.file_digests import file_digests

INDEX_FILE = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin")  # what from_pretrained reads weights from


class TargetFiles:
    """A target model's folder, read as files: its config, a fingerprint of its weights, and single tensors."""

    def __init__(self, folder: str | Path, dtype: torch.dtype) -> None:
        self.folder = Path(folder)
        self.dtype = dtype  # what the frozen pass runs in: records computed in another dtype differ
        if not (self.folder / "config.json").is_file():
            raise UserError(f"{self.folder}: no config.json (expected a saved Hugging Face model folder)")
        self.config: PretrainedConfig = AutoConfig.from_pretrained(self.folder)

    @cached_property
    def weight_files(self) -> list[Path]:
        files = sorted(p for p in self.folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
        if not files:
            raise UserError(f"{self.folder}: no weight files (*.safetensors or *.bin)")
        return files

    @cached_property
    def fingerprint(self) -> str:
        """Hash of config.json, the compute dtype and every weight file's bytes (safetensors headers included); not
        of the folder's path (the same model elsewhere keeps its key). A weight file unchanged since a run hashed it
        is not read again (`file_digests`: its recorded sha256)."""
        digest = hashlib.sha256((self.folder / "config.json").read_bytes())
        digest.update(f"dtype={self.dtype}".encode())
        for path, file_digest in zip(self.weight_files, file_digests(self.weight_files), strict=True):
            digest.update(f"{path.name}:{file_digest}".encode())
        return digest.hexdigest()

    def _tensor_files(self) -> dict[str, Path]:
        """Tensor name -> the safetensors file holding it."""
        index = self.folder / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise UserError(f"{index}: no weight_map (a damaged sharded checkpoint index)")
            return {name: self.folder / file for name, file in weight_map.items()}
        names = {}
        for path in (p for p in self.weight_files if p.suffix == ".safetensors"):
            with safe_open(str(path), framework="pt") as handle:
                names.update(dict.fromkeys(handle.keys(), path))
        if not names:
            raise UserError(
                f"{self.folder}: no *.safetensors weights; training from the hidden-state cache reads the embedding "
                f"and lm_head from them. Save the model with save_pretrained (safetensors is its default)"
            )
        return names

    def stand_in(self, embeddings: bool) -> FrozenTargetParts:
        """The stand-in for the target: its lm_head, and its input embedding when `embeddings`, in `dtype`."""
        # The module names, and whether the lm_head is the embedding, as the architecture says: a skeleton on the
        # meta device costs no memory.
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(self.config)
        names = {id(module): name for name, module in skeleton.named_modules()}
        embedding, lm_head = skeleton.get_input_embeddings(), skeleton.get_output_embeddings()
        if lm_head is None:
            raise UserError(f"{type(skeleton).__name__} has no output embedding (lm_head) to train a draft for")
        tied = lm_head.weight is embedding.weight
        files = self._tensor_files()
        prefix = skeleton.base_model_prefix + "."

        def read(module: nn.Module) -> torch.Tensor:
            name = names[id(module)] + ".weight"
            # Checkpoints of a bare backbone name their tensors without the backbone's prefix.
            for candidate in (name, name.removeprefix(prefix)):
                if candidate in files:
                    with safe_open(str(files[candidate]), framework="pt") as handle:
                        return handle.get_tensor(candidate).to(self.dtype)
            raise UserError(f"{self.folder}: no tensor {name} in its safetensors files")

        embedding_weight = read(embedding) if embeddings or tied else None
        lm_head_weight = embedding_weight if tied else read(lm_head)
        parts = FrozenTargetParts(self.config, lm_head_weight, embedding_weight if embeddings else None)
        norm = getattr(skeleton.base_model, "norm", None)
        if isinstance(getattr(norm, "weight", None), torch.Tensor) and id(norm) in names:
            parts.final_norm = type(norm).__name__, read(norm)
        return parts


NO_FORWARD = (
    "the target's decoder layers were not loaded (every hidden-state record is cached, so training reads only its "
    "embedding and lm_head): something asked for a forward pass of the target"
)


class FrozenTargetParts(nn.Module):
    """What the drafts' training modules read of a frozen target when every record is cached: `config`,
    `get_input_embeddings()`, `get_output_embeddings()`, `device`, `dtype`. Anything that would run the target (a
    forward pass, its backbone) is an error that says so."""

    def __init__(self, config: PretrainedConfig, lm_head: torch.Tensor, embedding: torch.Tensor | None) -> None:
        super().__init__()
        self.config = config
        # (class name, weight) of the backbone's final norm where it has one: a DFlash draft starts its own from it
        # (`dflash_model.target_final_norm`), so a run from a complete cache starts where one with the target does.
        self.final_norm: tuple[str, torch.Tensor] | None = None
        vocab, hidden = lm_head.shape
        self.lm_head = nn.Linear(hidden, vocab, bias=False, device="meta")  # no [V, H] initialised for nothing
        self.lm_head.weight = nn.Parameter(lm_head, requires_grad=False)
        self.embed_tokens = None
        if embedding is not None:
            # Tied weights stay one tensor, as in the target.
            self.embed_tokens = nn.Embedding.from_pretrained(embedding, freeze=True)
            if embedding is lm_head:
                self.embed_tokens.weight = self.lm_head.weight

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def get_input_embeddings(self) -> nn.Embedding:
        if self.embed_tokens is None:
            raise RuntimeError("this stand-in for the target was built without its input embedding")
        return self.embed_tokens

    @property
    def base_model(self) -> nn.Module:
        raise RuntimeError(NO_FORWARD)  # the backbone is what runs the target

    def forward(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError(NO_FORWARD)
