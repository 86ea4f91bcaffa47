"""vLLM's Medusa layout: config.json with `model_type: "medusa"` and vLLM's keys (num_heads, num_hidden_layers,
truncated_vocab_size, medusa_fc_bias), weights in any *.safetensors as `blocks.{i}.layers.{j}.weight/bias` and
`lm_heads.{i}.weight` (vllm/model_executor/models/medusa.py). vLLM silently skips names it does not know, so
wrong names mean heads that accept nothing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from medusa_forge.drafts.medusa_checks import check_no_other_weights
from medusa_forge.drafts.medusa_heads import CONFIG_NAME, MedusaConfig
from medusa_forge.drafts.medusa_layouts import LoadedHeads
from medusa_forge.errors import UserError
from medusa_forge.formats.files import load_pickle, load_safetensors, save_safetensors

VLLM_WEIGHTS_NAME = "model.safetensors"  # vLLM reads any *.safetensors in the draft folder
VLLM_PREFIX = "medusa_heads."  # vLLM's load_weights strips it

_BLOCK = re.compile(r"^blocks\.(\d+)\.layers\.(\d+)\.(weight|bias)$")
_HEAD = re.compile(r"^lm_heads\.(\d+)\.weight$")


def is_vllm_name(name: str) -> bool:
    """A tensor name of vLLM's layout, with or without the prefix vLLM strips."""
    name = name.removeprefix(VLLM_PREFIX)
    return bool(_BLOCK.match(name) or _HEAD.match(name))


def read_vllm(
    folder: Path, raw: dict | None, files: list[Path], notes: list[str]
) -> tuple[dict[str, torch.Tensor], int | None]:
    """vLLM names -> canonical, plus the draft vocabulary (our `draft_vocab_size` key, or a token_map of the
    first N ids as older exports and other tools write it). Reads config keys the way vLLM's MedusaConfig does
    (num_heads, ...)."""
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        part = load_safetensors(path) if path.suffix == ".safetensors" else load_pickle(path)
        for key, value in part.items():
            tensors[key.removeprefix(VLLM_PREFIX)] = value
    raw = raw or {}
    blocks, lm_heads, other = {}, {}, []
    for key, value in tensors.items():
        if m := _BLOCK.match(key):
            blocks[(int(m[1]), int(m[2]), m[3])] = value
        elif m := _HEAD.match(key):
            lm_heads[int(m[1])] = value
        elif key != "token_map":
            other.append(key)
    if other:
        raise UserError(
            f"{folder}: unexpected tensor names {other[:5]} for the vLLM layout "
            "(expected blocks.{i}.layers.{j}.weight/bias, lm_heads.{i}.weight, token_map)"
        )
    if not blocks and not lm_heads:
        raise UserError(f"{folder}: no vLLM Medusa tensors (blocks.*, lm_heads.*) found")
    num_heads = raw.get("num_heads", raw.get("medusa_num_heads"))
    heads = sorted({i for i, _, _ in blocks} | set(lm_heads))
    if raw.get("original_lm_head"):
        if set(lm_heads) != {0}:
            raise UserError(f"{folder}: original_lm_head is set, so exactly one lm_heads.0.weight is expected")
        count = num_heads if num_heads is not None else len(heads)
        lm_heads = {i: lm_heads[0] for i in range(count)}
        notes.append("original_lm_head: the one shared projection was copied into every head")
    vocab, truncated = raw.get("vocab_size"), raw.get("truncated_vocab_size")
    draft_vocab = raw.get("draft_vocab_size")  # ours, kept next to vLLM's keys by our export (vLLM ignores it)
    if truncated is not None and vocab is not None and truncated < vocab:
        rows = {t.shape[0] for t in lm_heads.values()}
        if rows != {vocab}:
            raise UserError(
                f"{folder}: the heads project to a truncated vocabulary ({truncated} of {vocab} tokens, token_map); "
                "vLLM gives every other token -inf, which a full-vocabulary Medusa head cannot represent. "
                "Import the untruncated checkpoint instead."
            )
        token_map = tensors.get("token_map")
        if token_map is not None and torch.equal(token_map.long().flatten(), torch.arange(truncated)):
            draft_vocab = truncated  # heads propose ids < N only: our draft_vocab_size, exactly
            notes.append(f"token_map = the first {truncated} ids: kept as draft_vocab_size {truncated}")
        else:
            notes.append(
                f"truncated_vocab_size {truncated} dropped (token_map is not the first {truncated} ids): "
                f"the heads propose from the full {vocab}-token vocabulary"
            )
    with_bias = bool(raw.get("medusa_fc_bias", False))
    has_bias = any(part == "bias" for _, _, part in blocks)
    if has_bias and not with_bias:
        notes.append("biases kept although medusa_fc_bias is not true (vLLM would have dropped them)")
    state = {}
    for (i, j, part), value in blocks.items():
        state[f"{i}.{j}.linear.{part}"] = value
    for (i, j, part), value in blocks.items():
        if part == "weight" and (i, j, "bias") not in blocks:
            state[f"{i}.{j}.linear.bias"] = torch.zeros(value.shape[0], dtype=value.dtype)
    if not has_bias and blocks:
        notes.append("no biases in the checkpoint (medusa_fc_bias false): zero biases written, same outputs")
    num_layers = 1 + max((j for _, j, _ in blocks), default=-1)
    for i, value in lm_heads.items():
        state[f"{i}.{num_layers}.weight"] = value
    return state, draft_vocab


def to_vllm(state: dict[str, torch.Tensor], config: MedusaConfig) -> dict[str, torch.Tensor]:
    """Canonical -> vLLM names, every lm_heads.{i} with all vocabulary rows and no token_map: vLLM 0.11-0.32
    size each lm_head from `vocab_size` and assert the row count after cutting rows by a token_map, so a draft
    vocabulary cannot be expressed there (vllm/model_executor/models/medusa.py). The heads then propose from the
    whole vocabulary; rows >= draft_vocab_size are the base lm_head's, as training initialised them."""
    out = {}
    num_layers = config.medusa_num_layers
    for i in range(config.medusa_num_heads):
        for j in range(num_layers):
            out[f"blocks.{i}.layers.{j}.weight"] = state[f"{i}.{j}.linear.weight"]
            out[f"blocks.{i}.layers.{j}.bias"] = state[f"{i}.{j}.linear.bias"]
        out[f"lm_heads.{i}.weight"] = state[f"{i}.{num_layers}.weight"]
    return out


def vllm_config(config: MedusaConfig, dtype: torch.dtype) -> dict:
    """The keys vLLM's MedusaConfig and Medusa model read. medusa_fc_bias must be true, or vLLM builds the
    blocks without bias and silently drops ours. truncated_vocab_size = vocab_size (see `to_vllm`); our
    draft_vocab_size rides along (vLLM keeps unknown keys as attributes and never reads it) so that an import
    of this folder gives the heads back as they were trained."""
    raw = {
        "model_type": "medusa",
        "architectures": ["MedusaModel"],
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "truncated_vocab_size": config.vocab_size,
        "num_heads": config.medusa_num_heads,
        "num_hidden_layers": config.medusa_num_layers,
        "medusa_fc_bias": True,
        "max_paths": 64,
        "topk": 10,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "base_model_name_or_path": config.base_model_name_or_path,
    }
    if config.draft_vocab_size:
        raw["draft_vocab_size"] = config.draft_vocab_size
    return raw


def write_vllm(loaded: LoadedHeads, output_dir: Path) -> list[Path]:
    """config.json with vLLM's keys + model.safetensors in vLLM's names."""
    check_no_other_weights(output_dir, VLLM_WEIGHTS_NAME)
    output_dir.mkdir(parents=True, exist_ok=True)
    dtype = next(iter(loaded.state.values())).dtype
    (output_dir / CONFIG_NAME).write_text(json.dumps(vllm_config(loaded.config, dtype), indent=2) + "\n")
    save_safetensors(to_vllm(loaded.state, loaded.config), output_dir / VLLM_WEIGHTS_NAME)
    return [output_dir / CONFIG_NAME, output_dir / VLLM_WEIGHTS_NAME]

