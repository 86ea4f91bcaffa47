"""Load a base causal LM and its tokenizer by path, Hub id or alias, with errors a user can act on."""

from __future__ import annotations

import inspect
from typing import Any

import torch
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


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    path = resolve_model(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise _load_error(name_or_path, err) from err


def load_base_model(name_or_path: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load the frozen base model in eval mode with gradients off, its SDPA attention grouped on a CPU
    (`grouped_attention`: the same outputs, no key/value copies in tree verification)."""
    path = resolve_model(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as err:
        raise _load_error(name_or_path, err) from err
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
