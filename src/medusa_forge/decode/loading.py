"""Load a draft folder of any kind with its base model and tokenizer, the way `generate`,
`eval` and `serve` all need it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from medusa_forge.data.tokenize import ensure_chat_template
from medusa_forge.decode.generation import SpeculativeDecoder
from medusa_forge.drafts import DraftKind, kind_of
from medusa_forge.drafts.kind import DecodingDraft
from medusa_forge.errors import UserError
from medusa_forge.formats.tree_file import TREE_FILE, load_tree_dtype
from medusa_forge.generation.device import resolve_dtype
from medusa_forge.generation.text import encode_chat
from medusa_forge.modeling import TargetPlacement, load_tokenizer

logger = logging.getLogger("medusa_forge.decode")


def _tokenizer(folder: str | Path, base_name: str, base_given: bool) -> PreTrainedTokenizerBase:
    """The tokenizer prompts are encoded with: the draft folder's (saved by training, with the chat template it
    used) unless the user named another base (`base_given`, --model): then that base's, and the folder's must have
    the same vocabulary, or the draft's token ids would mean other tokens there."""
    has_tokenizer = any(Path(folder, name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    if not base_given:
        return ensure_chat_template(load_tokenizer(str(folder) if has_tokenizer else base_name))
    tokenizer = ensure_chat_template(load_tokenizer(base_name))
    if has_tokenizer:
        draft_vocab, base_vocab = load_tokenizer(str(folder)).get_vocab(), tokenizer.get_vocab()
        if draft_vocab != base_vocab:
            differ = sum(base_vocab.get(token) != token_id for token, token_id in draft_vocab.items())
            raise UserError(
                f"--model {base_name}: its tokenizer differs from the one the draft in {folder} was trained with "
                f"({differ} of {len(draft_vocab)} tokens have another id or are missing, base vocabulary "
                f"{len(base_vocab)}): the draft would propose other tokens than it means; pass the base model it "
                "was trained for (or one with the same tokenizer)"
            )
    return tokenizer


def draft_folder_field() -> Any:
    """The draft-folder flag of generate and eval (`--draft`; `--heads`, its first spelling, still accepted)."""
    return field(
        metadata={
            "help": "Draft folder written by `medusa-forge train`: Medusa heads or an EAGLE-3 draft (detected).",
            "aliases": ["--heads"],
        }
    )


def base_model_field() -> Any:
    return field(
        default=None, metadata={"help": "Base model (default: base_model_name_or_path in the draft's config.json)."}
    )


def draft_vocab_field() -> Any:
    return field(
        default=None,
        metadata={
            "help": "Medusa heads propose only token ids below N (cheaper heads on CPU; output unchanged). Default: "
            "the heads' draft_vocab_size from training, else the whole vocabulary."
        },
    )


@dataclass
class LoadedDraft:
    """A draft folder of any kind with its base model and tokenizer: what generate, serve and eval decode with."""

    draft: DecodingDraft  # the kind's draft and base model
    tokenizer: PreTrainedTokenizerBase
    dtype: str = "float32"  # what the models were loaded in

    @property
    def kind(self) -> DraftKind:
        return self.draft.kind

    @property
    def base(self) -> PreTrainedModel:
        return self.draft.base

    @property
    def folder(self) -> Path:
        return self.draft.folder

    @property
    def max_depth(self) -> int:
        """The deepest tree the draft can fill."""
        return self.draft.max_depth

    def decoder(self, choices: list[list[int]], check: bool = True) -> SpeculativeDecoder:
        return SpeculativeDecoder(self.base, self.draft.drafter(), choices, check)

    def engine_decoder(self, choices: list[list[int]]) -> SpeculativeDecoder:
        """Our decoder drafting as the engines that serve the kind do."""
        return SpeculativeDecoder(self.base, self.draft.engine_drafter(), choices, check=False)

    def vllm_speculative_config(self, scratch: Path, num_speculative_tokens: int) -> dict:
        """vLLM's --speculative-config for this draft (the kind may write it into `scratch` in vLLM's layout)."""
        return self.draft.vllm_speculative_config(scratch, num_speculative_tokens)


def load_draft(
    folder: str | Path,
    base_model: str | None = None,
    dtype: str = "float32",
    device: str = "auto",
    draft_vocab: int | None = None,
    placement: TargetPlacement | None = None,
) -> LoadedDraft:
    """The draft in `folder` (its kind detected), its base model and tokenizer (the folder's when it ships one,
    else the base's). dtype "auto": the one `eval` measured fastest and stored with the tree, else float32.
    `placement`: the base is dispatched so (the --target_* flags)."""
    kind = kind_of(folder)
    if dtype == "auto":
        dtype = load_tree_dtype(folder) or "float32"
        if dtype != "float32":
            logger.warning(
                "decoding in %s, measured faster than float32 by `medusa-forge eval` (%s): output can differ from "
                "float32 greedy where two tokens nearly tie; --dtype float32 for token-identical output",
                dtype,
                Path(folder, TREE_FILE),
            )
    draft = kind.load(Path(folder), base_model, resolve_dtype(dtype), device, draft_vocab, placement)
    return LoadedDraft(draft, _tokenizer(folder, draft.base_name, base_model is not None), dtype)


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
