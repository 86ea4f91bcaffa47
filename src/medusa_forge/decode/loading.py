"""Load a heads folder with its base model and tokenizer, the way `generate`, `eval` and `serve` all need it."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from medusa_forge.data.tokenize import ensure_chat_template
from medusa_forge.errors import UserError
from medusa_forge.heads import MedusaConfig, MedusaModel
from medusa_forge.modeling import load_base_model, load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise UserError(f"--device {device!r}: {err}") from None


def load_medusa(
    heads_dir: str | Path, base_model: str | None = None, dtype: str = "float32", device: str = "auto"
) -> tuple[MedusaModel, PreTrainedTokenizerBase]:
    """Heads + base model (config.json's base unless `base_model` is given) + tokenizer.

    The tokenizer comes from the heads folder when it ships one (training writes it there, TGI reads it),
    else from the base model.
    """
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if not Path(heads_dir).is_dir():
        raise UserError(
            f"--heads {heads_dir}: no such folder (expected a heads folder written by `medusa-forge train`)"
        )
    config = MedusaConfig.load(heads_dir)
    base_name = base_model or config.base_model_name_or_path
    base = load_base_model(base_name, dtype=DTYPES[dtype]).to(pick_device(device))
    model = MedusaModel.from_pretrained(heads_dir, base_model=base, dtype=DTYPES[dtype])
    has_tokenizer = any(Path(heads_dir, name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = load_tokenizer(str(heads_dir) if has_tokenizer else base_name)
    return model, ensure_chat_template(tokenizer)


def eos_token_ids(model: MedusaModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Every token that ends a reply: the generation config's and the tokenizer's."""
    eos = getattr(model.base.generation_config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, text: str, raw: bool = False, system: str | None = None
) -> list[int]:
    """Prompt ids: the chat template with a generation prompt, or (raw) the plain text."""
    if raw:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UserError("the prompt encodes to no tokens")
    return ids
