"""The folder of a kind whose draft is a model beside its target (EAGLE-3, DFlash): `config.json` and
`model.safetensors` in the one float dtype of its weights, exactly what the engines load, checked on the way out
and on the way in by the kind's own `check_tensors`; and its export, the same folder written for an engine."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from medusa_forge.errors import UserError
from medusa_forge.formats.files import same_tensors, save_safetensors
from medusa_forge.tokenizer_files import copy_tokenizer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TensorCheck = Callable[[dict[str, torch.Tensor], Any, str], None]  # (state, config, where): raises UserError


def check_config_values(raw: dict, where: str, fixed: dict, integers: tuple[str, ...]) -> None:
    """The checks every draft model's config.json shares (`raw` holding exactly the kind's keys): the `fixed` values
    the engines need, positive integer sizes (`integers`), a positive finite rms_norm_eps and rope_theta, the target
    named, whole groups of key/value heads, a float dtype. Errors name the file (`where`)."""
    for key, value in fixed.items():
        if raw[key] != value:
            raise UserError(f"{where}: {key} is {raw[key]!r}; vLLM and SGLang need {value!r}")
    for key in integers:
        if not isinstance(raw[key], int) or isinstance(raw[key], bool) or raw[key] < 1:
            raise UserError(f"{where}: {key} must be a positive integer, found {raw[key]!r}")
    for key in ("rms_norm_eps", "rope_theta"):
        value = raw[key]
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < float("inf"):
            raise UserError(f"{where}: {key} must be a positive number, found {value!r}")
    base = raw["base_model_name_or_path"]
    if not isinstance(base, str) or not base:
        raise UserError(f"{where}: base_model_name_or_path must name the target model, found {base!r}")
    if raw["num_attention_heads"] % raw["num_key_value_heads"]:
        raise UserError(f"{where}: num_attention_heads must be a multiple of num_key_value_heads")
    if raw["torch_dtype"] not in FLOAT_DTYPES:
        raise UserError(f"{where}: torch_dtype {raw['torch_dtype']!r} is not one of {sorted(FLOAT_DTYPES)}")


def save_model_folder(
    folder: str | Path, state: dict[str, torch.Tensor], config: Any, check: TensorCheck, maps: tuple[str, ...] = ()
) -> Any:
    """Write `state` (the weights, plus the integer `maps`) and `config` (a dataclass with `torch_dtype` and
    `to_json`) to `folder`; `check` runs first, so nothing an engine would misread is written. Returns the config
    as written (its torch_dtype the weights')."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtypes = {t.dtype for name, t in state.items() if name not in maps}
    if len(dtypes) != 1 or next(iter(dtypes)) not in FLOAT_DTYPES.values():
        raise UserError(f"cannot save a draft whose weights are {sorted(map(str, dtypes))}: one float dtype needed")
    config = dataclasses.replace(config, torch_dtype=str(next(iter(dtypes))).removeprefix("torch."))
    check(state, config, str(folder / WEIGHTS_NAME))
    (folder / CONFIG_NAME).write_text(json.dumps(config.to_json(), indent=2) + "\n")
    save_safetensors(state, folder / WEIGHTS_NAME)
    return config


def model_folder_files(folder: str | Path, what: str) -> tuple[Path, Path]:
    """The config and weights paths of the draft folder `folder`; UserError when either is missing (`what`: "an
    EAGLE-3 draft", say)."""
    folder = Path(folder)
    paths = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for path in paths:
        if not path.is_file():
            raise UserError(f"{folder} is not {what} folder: {path.name} is missing")
    return paths


def write_for_engines(draft: Any, source: Path, output_dir: Path) -> list[Path]:
    """A draft model read from `source` (its class's `save`/`load`, `config`), written to `output_dir` as the
    engines load it: refused over weights already there (an engine would read both), saved with the source's
    tokenizer files, read back and compared bit for bit. Returns the files written."""
    if output_dir.is_dir() and any(p.suffix in (".safetensors", ".pt", ".bin") for p in output_dir.iterdir()):
        raise UserError(f"--output-dir {output_dir} already holds weights that an engine would also read")
    draft.save(output_dir)
    files = [output_dir / CONFIG_NAME, output_dir / WEIGHTS_NAME] + copy_tokenizer(source, output_dir)
    written = type(draft).load(output_dir)
    if not same_tensors(written.state_dict(), draft.state_dict()) or written.config != draft.config:
        raise UserError(f"{output_dir}: the written draft differs from the source; please report this")
    return files
