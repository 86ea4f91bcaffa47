"""Reading and writing the files heads are stored in, safely: JSON objects, safetensors, and torch pickles
loaded as tensors only; every failure becomes a UserError that names the file."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from medusa_forge.errors import UserError


def read_json(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except ValueError as err:
        raise UserError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} should hold a JSON object")
    return raw


def load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A torch pickle of tensors only: weights_only=True refuses anything that could run code."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types here; all mean "cannot read safely"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: cannot be loaded safely as a dict of tensors ({first})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: expected a dict of tensors (a state dict), found {type(obj).__name__}")
    return obj


def _unreadable(path: Path, err: Exception) -> UserError:
    return UserError(
        f"{path}: not a readable safetensors file ({err}); the file is damaged or cut short: "
        f"re-create or re-download it"
    )


def safetensors_keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise _unreadable(path, err) from None


def load_safetensors(path: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensors whose name starts with prefix (prefix removed); reads only those from disk. Every draft weights file
    is read here, so a damaged one is one clear error naming it, whichever command reads it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    out = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key.startswith(prefix):
                    out[key[len(prefix) :]] = f.get_tensor(key)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise _unreadable(path, err) from None
    return out


def tensor_names(path: Path) -> list[str]:
    """The tensor names in a safetensors file or a torch pickle."""
    return safetensors_keys(path) if path.suffix == ".safetensors" else list(load_pickle(path))


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors safetensors accepts: contiguous, each owning its storage. The original trainer's shared blocks
    (and version 2's copied lm_head) share storage, so only those are copied; the rest is written as it is."""
    out, seen = {}, set()
    for key, tensor in state.items():
        tensor = tensor.detach().to("cpu")
        storage = tensor.untyped_storage()
        if (
            storage.data_ptr() in seen
            or not tensor.is_contiguous()
            or tensor.storage_offset() != 0
            or storage.nbytes() != tensor.nbytes
        ):
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def save_safetensors(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write any state dict, shared or strided tensors included, as safetensors that engines read. Every draft
    weights file is written here. safetensors creates files with mode 0600; they get the mode the umask gives any
    new file, so a server running as another user (a container) can read them."""
    save_file(_contiguous(state), str(path), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bit-exact equality of two state dicts (names, dtypes, shapes, values)."""
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def copy_sidecars(source: Path, output_dir: Path, names: tuple[str, ...]) -> list[Path]:
    """Copy the named files that exist next to the source heads (tokenizer, tree, card inputs)."""
    folder = source if source.is_dir() else source.parent
    copied = []
    for name in names:
        if (folder / name).is_file() and (folder / name).resolve() != (output_dir / name).resolve():
            shutil.copyfile(folder / name, output_dir / name)
            copied.append(output_dir / name)
    return copied
