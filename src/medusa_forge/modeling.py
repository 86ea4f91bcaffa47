"""Load a base causal LM and its tokenizer by path, Hub id or alias, with errors a user can act on."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from medusa_forge.defaults import MODEL_ALIAS, resolve_model
from medusa_forge.errors import UserError
from medusa_forge.grouped_attention import use_grouped_attention


def _load_error(name: str, err: Exception) -> UserError:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserError(
        f"could not load model {name!r}: {first_line}\n"
        f"If this is a Hub id, this machine may have no network or the repo may be private/gated "
        f"(log in with `hf auth login` or set HF_TOKEN). Otherwise pass a local folder holding a saved "
        f"Hugging Face model, or the offline alias {MODEL_ALIAS!r}."
    )


def _damaged(path: Path, what: str, err: Exception) -> UserError:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserError(
        f"{path}: not a readable {what} ({first_line}); the file is damaged or cut short (an interrupted download "
        "or copy): download or copy it again"
    )


def _damaged_weights(path: str, err: Exception) -> UserError:
    """A weights file of the base that does not read: named when the model is a folder here (its first unreadable
    *.safetensors), else the model."""
    from medusa_forge.formats.files import safetensors_keys

    for file in sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []:
        try:
            safetensors_keys(file)
        except UserError:
            return _damaged(file, "safetensors file", err)
    return _damaged(Path(path), "model (its weights)", err)


def _unreadable_tokenizer_file(path: str) -> Path | None:
    """The folder's tokenizer.json when the tokenizers library cannot read it (None: absent, or it reads)."""
    from tokenizers import Tokenizer

    file = Path(path, "tokenizer.json")
    if not file.is_file():
        return None
    try:
        Tokenizer.from_file(str(file))
    except Exception:  # noqa: BLE001 - the Rust library raises plain Exception
        return file
    return None


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    path = resolve_model(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as err:  # a damaged tokenizer.json fails deep inside (KeyError, ...): name the file
        damaged = _unreadable_tokenizer_file(path)
        if damaged is not None:
            raise _damaged(damaged, "tokenizer file", err) from None
        if isinstance(err, OSError | ValueError):
            raise _load_error(name_or_path, err) from err
        raise


def load_base_model(name_or_path: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load the frozen base model in eval mode with gradients off, its SDPA attention grouped on a CPU
    (`grouped_attention`: the same outputs, no key/value copies in tree verification)."""
    path = resolve_model(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as err:
        raise _load_error(name_or_path, err) from err
    except SafetensorError as err:  # a cut weights file: one error naming it, in every command that loads a base
        raise _damaged_weights(path, err) from None
    model.eval()
    model.requires_grad_(False)
    use_grouped_attention(model)
    return model


# transformers renamed the KV cache a model's forward takes and returns from `past_key_values` to `cache` after 5.17
# (5.24 has the new name); code that passes or reads a cache goes through these two, so every transformers 5.x works.
CACHE_NAMES = ("cache", "past_key_values")


def cache_kwarg(module: torch.nn.Module) -> str:
    """The name under which `module.forward` takes its KV cache."""
    params = inspect.signature(module.forward).parameters
    for name in CACHE_NAMES:
        if name in params:
            return name
    raise UserError(
        f"{type(module).__name__}.forward takes no KV cache argument: speculative decoding and continuous batching "
        "need one"
    )


def returned_cache(output: Any) -> Any:
    """The KV cache a forward pass returned (None when it returned none)."""
    return next((cache for cache in (getattr(output, name, None) for name in CACHE_NAMES) if cache is not None), None)
