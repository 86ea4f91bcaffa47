"""Load a draft folder (Medusa heads or an EAGLE-3 draft) with its base model and tokenizer, the way `generate`,
`eval` and `serve` all need it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from medusa_forge.data.tokenize import ensure_chat_template
from medusa_forge.decode.generation import Eagle3Decoder, MedusaDecoder, SpeculativeDecoder
from medusa_forge.decode.tree import EAGLE3_TREE_DEPTH
from medusa_forge.drafts import kind_of
from medusa_forge.eagle3 import Eagle3Draft
from medusa_forge.errors import UserError
from medusa_forge.formats.read import read_heads
from medusa_forge.formats.tree_file import TREE_FILE, load_tree_dtype
from medusa_forge.formats.vllm import write_vllm
from medusa_forge.generation.device import pack_linear_weights, resolve_device, resolve_dtype
from medusa_forge.generation.text import encode_chat
from medusa_forge.heads import MedusaModel
from medusa_forge.modeling import load_base_model, load_tokenizer

logger = logging.getLogger("medusa_forge.decode")


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
    # The heads are read (and checked) before the base model, which takes far longer to load.
    model = MedusaModel.from_pretrained(heads_dir, base_model=base_model, dtype=torch_dtype)
    model = model.to(resolve_device(device))
    pack_linear_weights(model)  # bfloat16 on a CPU: a step reads each weight once (see there)
    return model, _tokenizer(heads_dir, base_model or model.heads.config.base_model_name_or_path)


def load_eagle3(
    draft_dir: str | Path, base_model: str | None = None, dtype: str = "float32", device: str = "auto"
) -> tuple[PreTrainedModel, Eagle3Draft, PreTrainedTokenizerBase]:
    """Base model (config.json's base unless `base_model` is given) + EAGLE-3 draft (in the base's dtype and
    device) + tokenizer (the draft folder's when it ships one, else the base's)."""
    torch_dtype = resolve_dtype(dtype)
    draft = Eagle3Draft.load(draft_dir)
    base_name = base_model or draft.config.base_model_name_or_path
    base = load_base_model(base_name, dtype=torch_dtype).to(resolve_device(device))
    draft = draft.to(device=next(base.parameters()).device, dtype=torch_dtype)
    pack_linear_weights(base)  # bfloat16 on a CPU: a step reads each weight once (see there)
    pack_linear_weights(draft)
    return base, draft, _tokenizer(draft_dir, base_name)


def _tokenizer(folder: str | Path, base_name: str) -> PreTrainedTokenizerBase:
    has_tokenizer = any(Path(folder, name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    return ensure_chat_template(load_tokenizer(str(folder) if has_tokenizer else base_name))


def draft_folder_field() -> Any:
    """The draft-folder flag of generate and eval (`--heads`, or `--draft`)."""
    return field(
        metadata={
            "help": "Draft folder written by `medusa-forge train`: Medusa heads or an EAGLE-3 draft (detected).",
            "aliases": ["--draft"],
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
    """A draft folder of either kind with its base model and tokenizer: what generate, serve and eval decode with."""

    kind: str  # "medusa" or "eagle3"
    base: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    medusa: MedusaModel | None = None
    eagle3: Eagle3Draft | None = None
    draft_vocab: int | None = None  # Medusa heads only: propose ids < N (None: the heads' own)
    dtype: str = "float32"  # what the models were loaded in
    folder: Path | None = None  # where the draft was read from

    @property
    def max_depth(self) -> int:
        """The deepest tree the draft can fill (a Medusa head per depth; an EAGLE-3 draft is bounded by choice)."""
        return len(self.medusa.heads) if self.medusa is not None else EAGLE3_TREE_DEPTH

    def decoder(self, choices: list[list[int]], check: bool = True) -> SpeculativeDecoder:
        if self.medusa is not None:
            return MedusaDecoder(self.medusa, choices, check=check, draft_vocab=self.draft_vocab)
        return Eagle3Decoder(self.base, self.eagle3, choices, check=check)

    def engine_decoder(self, choices: list[list[int]]) -> SpeculativeDecoder:
        """Our decoder drafting as the engines do: Medusa heads from the whole vocabulary (no engine that serves
        them keeps a draft vocabulary: README "Export"), an EAGLE-3 draft through its d2t as vLLM and SGLang."""
        if self.medusa is not None:
            return MedusaDecoder(self.medusa, choices, check=False, draft_vocab=self.base.config.vocab_size)
        return self.decoder(choices, check=False)

    def vllm_speculative_config(self, scratch: Path, num_speculative_tokens: int) -> dict:
        """vLLM's --speculative-config for this draft: an EAGLE-3 folder is vLLM's layout as it is; Medusa heads
        are written in vLLM's layout into `scratch` (as `export --format vllm` writes them)."""
        if self.medusa is None:
            folder, method = self.folder, "eagle3"
        else:
            folder, method = scratch, "medusa"
            write_vllm(read_heads(self.folder, check_base=False), scratch)
        return {"method": method, "model": str(folder), "num_speculative_tokens": num_speculative_tokens}


def load_draft(
    folder: str | Path,
    base_model: str | None = None,
    dtype: str = "float32",
    device: str = "auto",
    draft_vocab: int | None = None,
) -> LoadedDraft:
    """Medusa heads or an EAGLE-3 draft (detected from the folder), its base model and tokenizer. dtype "auto":
    the one `eval` measured fastest and stored with the tree, else float32."""
    kind = kind_of(folder).name
    if dtype == "auto":
        dtype = load_tree_dtype(folder) or "float32"
        if dtype != "float32":
            logger.warning(
                "decoding in %s, measured faster than float32 by `medusa-forge eval` (%s): output can differ from "
                "float32 greedy where two tokens nearly tie; --dtype float32 for token-identical output",
                dtype,
                Path(folder, TREE_FILE),
            )
    if kind == "eagle3":
        if draft_vocab is not None:
            raise UserError("--draft-vocab applies to Medusa heads; an EAGLE-3 draft has its own draft vocabulary")
        base, draft, tokenizer = load_eagle3(folder, base_model, dtype, device)
        return LoadedDraft("eagle3", base, tokenizer, eagle3=draft, dtype=dtype, folder=Path(folder))
    model, tokenizer = load_medusa(folder, base_model, dtype, device)
    return LoadedDraft(
        "medusa", model.base, tokenizer, medusa=model, draft_vocab=draft_vocab, dtype=dtype, folder=Path(folder)
    )


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
