"""A draft and the base model it drafts for: which base (the one the user gives, else the one the draft records)
and whether the two fit. Every command that pairs a draft with a base (generate, serve, eval, export, import,
push, train's resume) asks here, so a mismatch reads the same everywhere and is found before any work."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import PretrainedConfig, PreTrainedModel

from medusa_forge.defaults import MODEL_ALIAS, looks_like_path, resolve_model
from medusa_forge.errors import UserError


@dataclass(frozen=True)
class BaseShape:
    """What a draft must agree with: the base's final hidden state width and its vocabulary (lm_head rows)."""

    hidden_size: int
    vocab_size: int
    num_layers: int | None  # where known: an EAGLE-3 draft reads hidden states at layers chosen from it


def model_shape(model: PreTrainedModel) -> BaseShape:
    """The loaded base's shape, from its config as for a base not loaded (`local_shape`): one source for both."""
    shape = config_shape(model.config)
    if shape is None:
        raise UserError(f"{model.config.name_or_path}: its config names no hidden_size and vocab_size")
    return shape


def config_shape(config: PretrainedConfig) -> BaseShape | None:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    hidden, vocab = getattr(text, "hidden_size", None), getattr(text, "vocab_size", None)
    if not (isinstance(hidden, int) and isinstance(vocab, int)):
        return None
    layers = getattr(text, "num_hidden_layers", None)
    return BaseShape(hidden, vocab, layers if isinstance(layers, int) else None)


def local_shape(name: str) -> BaseShape | None:
    """The shape of base `name` (a folder, the alias, or a Hub id already in the local cache) from its config.json;
    None when that is not on this machine (nothing is downloaded)."""
    from transformers import AutoConfig

    try:
        return config_shape(AutoConfig.from_pretrained(resolve_model(name), local_files_only=True))
    except (OSError, ValueError, UserError):  # UserError: a path that is no folder here
        return None


def not_checked(base_name: str) -> str:
    """The note for a base whose config is not here (`local_shape` None): say so, never pass in silence."""
    return (
        f"not checked against base model {base_name!r}: its config.json is not on this machine (a Hub id not in the "
        "local cache, or a folder elsewhere); an engine refuses or misreads a draft of another size"
    )


def check_fits(what: str, hidden_size: int, vocab_size: int, base: BaseShape, base_name: str, where: str,
               flag: str = "--model") -> None:  # fmt: skip
    """Refuse a draft (`what`: "Medusa heads", "EAGLE-3 draft") of `hidden_size` x `vocab_size` on a base of another
    shape: its features or its proposed ids would mean nothing there. `flag` names where the user passes the base."""
    if (hidden_size, vocab_size) != (base.hidden_size, base.vocab_size):
        raise UserError(
            f"{where}: {what} trained for hidden size {hidden_size} and vocabulary {vocab_size}, but base model "
            f"{base_name} has hidden size {base.hidden_size} and vocabulary {base.vocab_size}; pass the base model "
            f"it was trained for with {flag}"
        )


def draft_base(recorded: str, given: str | None, config_file: Path) -> str:
    """The base to load for a draft: `given` (--model), else the one its `config_file` records. A recorded local
    folder that is gone (the draft was copied to another machine, the base moved) is said so, naming --model."""
    if given:
        return given
    if looks_like_path(recorded) and not Path(recorded).expanduser().is_dir():
        raise UserError(
            f"{config_file} records the base model as the local folder {recorded!r}, which is not on this machine "
            "(moved, deleted, or the draft was copied from elsewhere): pass the base with --model (a folder, a Hub "
            f"id, or the alias {MODEL_ALIAS!r})"
        )
    return recorded
