"""Are these tensors valid Medusa heads? Names, numbering and shapes of the canonical state dict, the
config's counts against the tensors, and the sizes against a base model. Every reader and `MedusaHeads.load`
use these, because an engine that meets wrong names silently skips them (vLLM) and the heads then accept nothing.

The canonical names are ours, which are also TGI's, TensorRT-LLM's and the original Medusa's:
`{i}.{j}.linear.weight` [H, H], `{i}.{j}.linear.bias` [H] for blocks j < L, `{i}.{L}.weight` [V, H].
This module does not import `medusa_heads.py`, which imports it.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from medusa_forge.errors import UserError

CANONICAL_NAME = re.compile(r"^(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)$")


@dataclass
class HeadsShape:
    """What the tensors themselves say; `has_projections` is False for the "version 2" variant."""

    num_heads: int
    num_layers: int
    hidden_size: int
    vocab_size: int | None
    dtype: torch.dtype
    has_projections: bool


def check_canonical(state: dict[str, torch.Tensor], where: str) -> HeadsShape:
    """Validate canonical names, contiguous head/layer numbering and shapes; name the first bad tensor."""
    if not state:
        raise UserError(f"{where}: holds no tensors")
    unexpected = [k for k in state if not CANONICAL_NAME.match(k)]
    if unexpected:
        raise UserError(
            f"{where}: unexpected tensor names {unexpected[:5]}; Medusa heads use "
            "`{i}.{j}.linear.weight`, `{i}.{j}.linear.bias` and `{i}.{L}.weight`"
        )
    blocks: dict[int, set[int]] = {}
    projections: dict[int, int] = {}
    for key in state:
        i, j, kind = CANONICAL_NAME.match(key).groups()
        if kind == "weight":
            projections[int(i)] = int(j)
        else:
            blocks.setdefault(int(i), set()).add(int(j))
    heads = sorted(set(blocks) | set(projections))
    if heads != list(range(len(heads))):
        missing = sorted(set(range(max(heads) + 1)) - set(heads))
        raise UserError(f"{where}: heads are numbered {heads}; head(s) {missing} are missing")
    layer_counts = {i: len(blocks.get(i, ())) for i in heads}
    if len(set(layer_counts.values())) != 1:
        raise UserError(f"{where}: heads have different numbers of residual blocks: {layer_counts}")
    num_layers = layer_counts[0]
    for i in heads:
        if blocks.get(i, set()) != set(range(num_layers)):
            raise UserError(f"{where}: head {i} has blocks {sorted(blocks.get(i, ()))}, expected 0..{num_layers - 1}")
        for j in range(num_layers):
            for part in ("weight", "bias"):
                if f"{i}.{j}.linear.{part}" not in state:
                    raise UserError(f"{where}: tensor {i}.{j}.linear.{part} is missing")
        if i in projections and projections[i] != num_layers:
            raise UserError(
                f"{where}: head {i}'s projection is named {i}.{projections[i]}.weight, but with {num_layers} "
                f"block(s) it must be {i}.{num_layers}.weight"
            )
    if projections and set(projections) != set(heads):
        missing = ", ".join(f"{i}.{num_layers}.weight" for i in heads if i not in projections)
        raise UserError(
            f"{where}: only heads {sorted(projections)} have a vocabulary projection ({{i}}.{num_layers}.weight), "
            f"missing {missing}; all {len(heads)} heads need one, or none (version 2, which reuses the base lm_head)"
        )
    if num_layers == 0 and not projections:
        raise UserError(f"{where}: no residual blocks and no projections")
    first = state["0.0.linear.weight"] if num_layers else state[f"0.{num_layers}.weight"]
    # The hidden size most tensors agree on, so the odd one out is the one named in the error.
    hidden = Counter(t.shape[-1] for t in state.values() if t.dim() > 0).most_common(1)[0][0]
    vocab = state[f"0.{num_layers}.weight"].shape[0] if projections else None
    for key, tensor in state.items():
        kind = CANONICAL_NAME.match(key).group(3)
        expected = {"linear.weight": (hidden, hidden), "linear.bias": (hidden,), "weight": (vocab, hidden)}[kind]
        if tuple(tensor.shape) != expected:
            raise UserError(f"{where}: {key} has shape {tuple(tensor.shape)}, expected {expected} (hidden {hidden})")
    return HeadsShape(len(heads), num_layers, hidden, vocab, first.dtype, bool(projections))


def check_config_counts(raw: dict, shape: HeadsShape, where: str, keys: tuple[str, str]) -> None:
    """The config's head/layer counts (and sizes, when present) must match the tensors."""
    heads_key, layers_key = keys
    problems = []
    if raw.get(heads_key) is not None and raw[heads_key] != shape.num_heads:
        problems.append(
            f"{heads_key} is {raw[heads_key]} but the weights hold {shape.num_heads} heads "
            f"(if the weights are right, pass --num-heads {shape.num_heads})"
        )
    if raw.get(layers_key) is not None and raw[layers_key] != shape.num_layers:
        problems.append(f"{layers_key} is {raw[layers_key]} but the weights hold {shape.num_layers} block(s) per head")
    if raw.get("hidden_size") is not None and raw["hidden_size"] != shape.hidden_size:
        problems.append(f"hidden_size is {raw['hidden_size']} but the weights have {shape.hidden_size}")
    if raw.get("vocab_size") is not None and shape.vocab_size is not None and raw["vocab_size"] != shape.vocab_size:
        problems.append(f"vocab_size is {raw['vocab_size']} but the projections have {shape.vocab_size} rows")
    if problems:
        raise UserError(
            f"{where} does not match its weights: " + "; ".join(problems) + ". Fix the config or the weights."
        )


def check_has_projections(shape: HeadsShape, where: str) -> None:
    """Heads used as they are need their own projections; version 2 heads get them from `medusa-forge import`."""
    if not shape.has_projections:
        missing = ", ".join(f"{i}.{shape.num_layers}.weight" for i in range(shape.num_heads))
        raise UserError(
            f"{where}: missing {missing}: version 2 heads (no vocabulary projections) must be converted with "
            "`medusa-forge import`, which copies the base model's lm_head into each head"
        )


def check_against_base(
    hidden_size: int, vocab_size: int | None, base: str, where: str, required: bool, flag: str = "--base-model"
) -> str:
    """Refuse heads whose sizes differ from the base model's (`pairing.check_fits`); returns a note for the user.
    `vocab_size` None: heads without projections (checked on hidden size only)."""
    from medusa_forge.pairing import check_fits, local_shape, not_checked

    base_shape = local_shape(base)
    if base_shape is None:
        if required:
            raise UserError(f"{flag} {base}: no config.json found locally; pass a local folder or a cached Hub id")
        return not_checked(base)
    vocab = base_shape.vocab_size if vocab_size is None else vocab_size
    check_fits("Medusa heads", hidden_size, vocab, base_shape, base, where, flag)
    return f"sizes match base model {base} (hidden {base_shape.hidden_size}, vocabulary {base_shape.vocab_size})"


def check_no_other_weights(output_dir: Path, writing: str) -> None:
    """Refuse a folder that already holds other weights: an engine would read those (TensorRT-LLM prefers
    medusa_lm_head.pt; vLLM reads every *.safetensors) and a later import would find two sets of heads."""
    if not output_dir.is_dir():
        return
    stale = [p.name for p in output_dir.iterdir() if p.suffix in (".safetensors", ".pt", ".bin") and p.name != writing]
    if stale:
        raise UserError(
            f"--output-dir {output_dir} already holds other weights ({', '.join(sorted(stale))}) that an engine "
            "would also read; choose an empty or new folder"
        )
