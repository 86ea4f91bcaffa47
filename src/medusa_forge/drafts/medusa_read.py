"""Which layout a folder or file holds, and `read_heads`: any known layout into canonical tensors plus a
MedusaConfig, checked against the config and the base model before anything is written."""

from __future__ import annotations

from pathlib import Path

import torch

from medusa_forge.defaults import absolute_if_folder
from medusa_forge.drafts.medusa_checks import CANONICAL_NAME, check_against_base, check_canonical, check_config_counts
from medusa_forge.drafts.medusa_format import ORIGINAL_PT_NAME, materialise_projections, read_medusa
from medusa_forge.drafts.medusa_full_checkpoint import has_head_names, read_full
from medusa_forge.drafts.medusa_heads import CONFIG_NAME, WEIGHTS_NAME, MedusaConfig
from medusa_forge.drafts.medusa_layouts import LAYOUTS, LoadedHeads
from medusa_forge.drafts.medusa_vllm import is_vllm_name, read_vllm
from medusa_forge.errors import UserError
from medusa_forge.formats.files import load_pickle, load_safetensors, read_json, tensor_names


def _folder_config(folder: Path) -> dict | None:
    path = folder / CONFIG_NAME
    return read_json(path) if path.is_file() else None


def _weight_files(folder: Path) -> list[Path]:
    """Model weight files other than medusa_lm_head.*: *.safetensors, then pytorch_model*.bin."""
    files = sorted(p for p in folder.glob("*.safetensors") if p.name != WEIGHTS_NAME)
    return files + sorted(folder.glob("pytorch_model*.bin"))


def _base_reference(raw: dict | None, base_model: str | None, where: Path) -> str:
    if base_model:
        return absolute_if_folder(base_model)  # recorded in the written config: the same folder from anywhere
    if raw and raw.get("base_model_name_or_path"):
        return str(raw["base_model_name_or_path"])
    raise UserError(
        f"{where}: the base model is not named (no base_model_name_or_path in {CONFIG_NAME}); pass --base-model"
    )


def detect_layout(path: Path) -> tuple[str, Path]:
    """(layout, weights file or folder) for a folder or file; refuses ambiguous or unknown input."""
    if not path.exists():
        raise UserError(f"--from {path}: no such file or folder")
    if path.is_file():
        if path.suffix in (".pt", ".pth"):
            return "medusa-pt", path
        keys = tensor_names(path)
        if any(CANONICAL_NAME.match(k) for k in keys):
            return ("medusa" if path.suffix == ".safetensors" else "medusa-pt"), path
        if has_head_names(keys):
            return "full-checkpoint", path
        if any(is_vllm_name(k) for k in keys):
            return "vllm", path
        raise UserError(
            f"{path}: no Medusa head tensors found (names like 0.0.linear.weight, blocks.0.layers.0.weight)"
        )
    found = folder_layouts(path)
    if len(found) == 2 and {name for name, _ in found} == {"medusa", "medusa-pt"}:
        a, b = load_safetensors(found[0][1]), load_pickle(found[1][1])
        if a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a):
            return found[0]  # the same heads saved twice: take the safetensors copy
    if len(found) > 1:
        names = ", ".join(f"{name} ({where.name})" for name, where in found)
        raise UserError(
            f"{path}: ambiguous, it holds more than one set of heads: {names}. "
            f"Pass --layout {{{','.join(name for name, _ in found)}}} to say which to read."
        )
    if not found:
        raise UserError(
            f"{path}: no Medusa heads found. Expected one of: "
            + "; ".join(LAYOUTS.values())
            + f". The folder holds: {sorted(p.name for p in path.iterdir())[:10]}"
        )
    return found[0]


def folder_layouts(path: Path) -> list[tuple[str, Path]]:
    """(layout, weights file or folder) of every set of heads the folder `path` holds, from file names and
    configs (weights are read only to tell a full checkpoint or vLLM names apart)."""
    found: list[tuple[str, Path]] = []
    if (path / WEIGHTS_NAME).is_file():
        found.append(("medusa", path / WEIGHTS_NAME))
    if (path / ORIGINAL_PT_NAME).is_file():
        found.append(("medusa-pt", path / ORIGINAL_PT_NAME))
    raw = _folder_config(path) or {}
    weights = _weight_files(path)
    if raw.get("model_type") == "medusa" or (weights and "num_heads" in raw and "medusa_num_heads" not in raw):
        found.append(("vllm", path))
    elif weights and raw.get("medusa_num_heads") is not None:
        if any(has_head_names(tensor_names(f)) for f in weights):
            found.append(("full-checkpoint", path))
    elif weights:
        keys = [k for f in weights if f.suffix == ".safetensors" for k in tensor_names(f)]
        if any(is_vllm_name(k) for k in keys):
            found.append(("vllm", path))
    return found


def read_heads(
    path: str | Path,
    base_model: str | None = None,
    layout: str | None = None,
    check_base: bool = True,
    num_heads: int | None = None,
) -> LoadedHeads:
    """Read heads in any known layout (detected unless `layout` is given) into canonical names, checked.

    `num_heads` overrides the config's head count (some published configs are wrong, e.g. 2 for 4 heads) and
    keeps the first `num_heads` heads, as TGI does with --speculate."""
    path = Path(path)
    if layout is None:
        layout, weights = detect_layout(path)
    else:
        if layout not in LAYOUTS:
            raise UserError(f"--layout {layout}: choose one of {', '.join(LAYOUTS)}")
        weights = path
        if path.is_dir():
            weights = {"medusa": path / WEIGHTS_NAME, "medusa-pt": path / ORIGINAL_PT_NAME}.get(layout, path)
        if not weights.exists():
            raise UserError(f"--layout {layout}: {weights} does not exist")
    folder = path if path.is_dir() else path.parent
    raw = _folder_config(folder)
    notes: list[str] = []
    draft_vocab = (raw or {}).get("draft_vocab_size")  # ours: heads trained to propose ids < N only
    where = str(weights)
    if layout in ("medusa", "medusa-pt"):
        state = read_medusa(weights)
        keys = ("medusa_num_heads", "medusa_num_layers")
    elif layout == "vllm":
        files = [weights] if weights.is_file() else _weight_files(weights)
        state, draft_vocab = read_vllm(folder, raw, files, notes)
        keys = ("num_heads", "num_hidden_layers")
        if raw is not None and "num_heads" not in raw and "medusa_num_heads" in raw:
            keys = ("medusa_num_heads", "medusa_num_layers")
    else:
        files = [weights] if weights.is_file() else _weight_files(weights)
        state = read_full(folder, files)
        keys = ("medusa_num_heads", "medusa_num_layers")
        if base_model is None and raw is not None:
            # Medusa-2 trains the base too: the checkpoint itself is the base model the heads belong to.
            base_model = str(folder.resolve())
            notes.append(f"base model = the checkpoint itself ({base_model}); pass --base-model to name another")
    shape = check_canonical(state, where)
    if num_heads is not None:
        if not 1 <= num_heads <= shape.num_heads:
            raise UserError(f"--num-heads {num_heads}: {where} holds {shape.num_heads} heads")
        if raw is not None and raw.get(keys[0]) not in (None, num_heads):
            notes.append(f"{keys[0]} {raw[keys[0]]} in {CONFIG_NAME} overridden by --num-heads {num_heads}")
        raw = {k: v for k, v in (raw or {}).items() if k != keys[0]} if raw is not None else None
        state = {k: v for k, v in state.items() if int(k.split(".", 1)[0]) < num_heads}
        shape = check_canonical(state, where)
    if raw is not None:
        check_config_counts(raw, shape, str(folder / CONFIG_NAME), keys)
    elif layout != "vllm":
        notes.append(f"no {CONFIG_NAME} next to the weights: counts taken from the tensors")
    if raw is None and layout in ("medusa", "medusa-pt") and base_model is None:
        raise UserError(f"{folder}: {CONFIG_NAME} is missing, so the base model is unknown; pass --base-model")
    base = _base_reference(raw, base_model, folder)
    if not shape.has_projections:
        state = materialise_projections(state, shape, base)
        notes.append(f"version 2 (no per-head projections): each head's projection copied from {base}'s lm_head")
        shape = check_canonical(state, where)
    elif check_base:
        notes.append(check_against_base(shape.hidden_size, shape.vocab_size, base, where, base_model is not None))
    if draft_vocab is not None and not (isinstance(draft_vocab, int) and 0 < draft_vocab <= shape.vocab_size):
        raise UserError(f"{folder / CONFIG_NAME}: draft_vocab_size {draft_vocab!r} must be 1..{shape.vocab_size}")
    config = MedusaConfig(
        shape.num_heads, shape.num_layers, shape.hidden_size, shape.vocab_size, base, draft_vocab_size=draft_vocab
    )
    return LoadedHeads(state, config, layout, path, notes)
