"""Tokenizer folders that transformers 5 (ours) and transformers 4.x (TGI's router) both read, with the same
chat text and the same token ids.

TGI's router loads the tokenizer of `--model-id` with Python `AutoTokenizer` under the transformers its last
release pins (4.51.x), and reads the chat template and the bos/eos tokens from `tokenizer_config.json` only
(router/src/server.rs, HubTokenizerConfig in router/src/lib.rs). transformers 5 writes three things 4.x cannot
use: `tokenizer_class: "TokenizersBackend"` (unknown to 4.x: loading stops), the chat template only in
`chat_template.jinja`, and additional special tokens as an `extra_special_tokens` list (4.x expects a dict there
and fails). So every tokenizer we write gets, in `tokenizer_config.json`:
- `tokenizer_class: "PreTrainedTokenizerFast"`: both versions then take `tokenizer.json` as it is. A
  model-specific class is replaced too: 4.x's LlamaTokenizerFast, for one, rebuilds the post-processor from its
  own defaults and adds a BOS token that transformers 5 did not (other ids for the same text);
- `chat_template`: the text of `chat_template.jinja` (the .jinja file stays: transformers 5 prefers it);
- `additional_special_tokens` in place of a list-valued `extra_special_tokens` (both versions read that key).
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from medusa_forge.errors import UserError
from medusa_forge.formats.files import copy_sidecars

TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_FILES = (
    "tokenizer.json",
    TOKENIZER_CONFIG,
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    CHAT_TEMPLATE_FILE,
    "chat_template.json",
)
PORTABLE_CLASS = "PreTrainedTokenizerFast"


def portable_config(folder: Path) -> bytes | None:
    """`folder`'s tokenizer_config.json as both transformers versions read it; None when it needs no change
    (or there is no tokenizer to change)."""
    path = folder / TOKENIZER_CONFIG
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); copy the base model's tokenizer files again") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} should hold a JSON object")
    fixed = dict(config)
    if (folder / "tokenizer.json").is_file():  # a slow-only tokenizer keeps its own class
        fixed["tokenizer_class"] = PORTABLE_CLASS
    template = folder / CHAT_TEMPLATE_FILE
    if "chat_template" not in fixed and template.is_file():
        fixed["chat_template"] = template.read_text(encoding="utf-8")
    extra = fixed.get("extra_special_tokens")
    if isinstance(extra, list):
        del fixed["extra_special_tokens"]
        known = list(fixed.get("additional_special_tokens") or [])
        fixed["additional_special_tokens"] = known + [t for t in extra if t not in known]
    if fixed == config:
        return None
    return (json.dumps(fixed, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def make_portable(folder: Path) -> None:
    """Rewrite `folder`'s tokenizer_config.json in place so that transformers 4.x reads it too."""
    fixed = portable_config(folder)
    if fixed is not None:
        (folder / TOKENIZER_CONFIG).write_bytes(fixed)


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, folder: str | Path) -> list[Path]:
    """`tokenizer.save_pretrained(folder)`, readable by transformers 4.x too; returns the files written."""
    folder = Path(folder)
    written = [Path(p) for p in tokenizer.save_pretrained(str(folder))]
    make_portable(folder)
    return sorted({p for p in written if p.is_file()})


def copy_tokenizer(source: Path, output_dir: Path) -> list[Path]:
    """Copy the tokenizer files found next to `source` into `output_dir`, made portable; returns the copied
    files (none when `source` has no tokenizer)."""
    copied = copy_sidecars(source, output_dir, TOKENIZER_FILES)
    if copied:
        make_portable(output_dir)
    return copied
