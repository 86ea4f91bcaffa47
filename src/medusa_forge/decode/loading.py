"""Load a heads folder with its base model and tokenizer, the way `generate`, `eval` and `serve` all need it."""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from medusa_forge.data.tokenize import ensure_chat_template
from medusa_forge.errors import UserError
from medusa_forge.generation.device import resolve_device, resolve_dtype
from medusa_forge.generation.text import encode_chat
from medusa_forge.heads import MedusaConfig, MedusaModel
from medusa_forge.modeling import load_base_model, load_tokenizer


def load_medusa(
    heads_dir: str | Path, base_model: str | None = None, dtype: str = "float32", device: str = "auto"
) -> tuple[MedusaModel, PreTrainedTokenizerBase]:
    """Heads + base model (config.json's base unless `base_model` is given) + tokenizer.

    The tokenizer comes from the heads folder when it ships one (training writes it there, TGI reads it),
    else from the base model.
    """
    torch_dtype = resolve_dtype(dtype)
    if not Path(heads_dir).is_dir():
        raise UserError(
            f"--heads {heads_dir}: no such folder (expected a heads folder written by `medusa-forge train`)"
        )
    config = MedusaConfig.load(heads_dir)
    base_name = base_model or config.base_model_name_or_path
    base = load_base_model(base_name, dtype=torch_dtype).to(resolve_device(device))
    model = MedusaModel.from_pretrained(heads_dir, base_model=base, dtype=torch_dtype)
    has_tokenizer = any(Path(heads_dir, name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = load_tokenizer(str(heads_dir) if has_tokenizer else base_name)
    return model, ensure_chat_template(tokenizer)


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, text: str, raw: bool = False, system: str | None = None
) -> list[int]:
    """Prompt ids: the chat template with a generation prompt, or (raw) the plain text."""
    if raw:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        ids = encode_chat(tokenizer, messages)
    if not ids:
        raise UserError("the prompt encodes to no tokens")
    return ids
