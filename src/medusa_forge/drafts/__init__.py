"""The registry of draft kinds: the one list of kinds, looked up by name or recognised from a folder.

A kind lives in one module of this package (`medusa.py`, `eagle3.py`, `dflash.py`); registering it here is all the
rest of the code needs: training, the hidden-state cache, decoding, eval, export, push, the model card and the
pipeline ask the kind they are given (`get_kind`) or find (`kind_of`) instead of branching on its name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from medusa_forge.drafts.dflash import DFLASH
from medusa_forge.drafts.eagle3 import EAGLE3
from medusa_forge.drafts.kind import DraftKind
from medusa_forge.drafts.medusa import MEDUSA
from medusa_forge.errors import UserError

__all__ = [
    "DraftKind",
    "default_kind",
    "format_choices",
    "get_kind",
    "kind_choices",
    "kind_for_config",
    "kind_names",
    "kind_of",
    "layout_choices",
    "kinds",
    "register",
    "unregister",
]

# Registration order is the order kinds are listed in (choices, messages); the first is the default kind: the
# tutorial's Medusa heads, and what files written before other kinds existed hold.
_KINDS: dict[str, DraftKind] = {}


def register(kind: DraftKind) -> DraftKind:
    """Add `kind` to the registry (a new kind's module calls this; tests register toy kinds)."""
    if kind.name in _KINDS:
        raise ValueError(f"a draft kind named {kind.name!r} is already registered")
    _KINDS[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    """Remove a kind registered by `register` (tests that registered a toy kind clean up with it)."""
    del _KINDS[name]


def kinds() -> tuple[DraftKind, ...]:
    return tuple(_KINDS.values())


def kind_names() -> tuple[str, ...]:
    return tuple(_KINDS)


class _Live(Sequence[str]):
    """Names read from the registry when asked, not when a parser was built: argparse choices that a kind
    registered later (a test's toy kind) belongs to."""

    def __init__(self, names: Callable[[], tuple[str, ...]]) -> None:
        self._names = names

    def __getitem__(self, index):  # noqa: ANN001 - Sequence's int | slice
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())


def kind_choices() -> Sequence[str]:
    """`choices` for a flag that names a kind (a live view of the registry)."""
    return _Live(kind_names)


def format_choices() -> Sequence[str]:
    """Every engine some registered kind is exported for, in the kinds' order (export's --format; live)."""
    return _Live(lambda: tuple(dict.fromkeys(fmt for kind in _KINDS.values() for fmt in kind.formats)))


def layout_choices() -> Sequence[str]:
    """Every on-disk layout some registered kind reads (export's --layout; live)."""
    return _Live(lambda: tuple(dict.fromkeys(layout for kind in _KINDS.values() for layout in kind.layouts)))


def default_kind() -> DraftKind:
    return next(iter(_KINDS.values()))


def get_kind(name: str) -> DraftKind:
    """The kind named `name`; a UserError that lists the kinds for any other name."""
    if name not in _KINDS:
        raise UserError(f"draft kind {name!r}: expected one of {', '.join(_KINDS)}")
    return _KINDS[name]


def kind_for_config(config: object) -> DraftKind:
    """The kind whose config `config` is (what a model card is rendered from)."""
    for kind in _KINDS.values():
        if isinstance(config, kind.config_type):
            return kind
    raise TypeError(f"{type(config).__name__} is no registered draft kind's config")


def kind_of(folder: str | Path) -> DraftKind:
    """The kind of the draft in `folder`. A folder that no kind recognises is an error that names the folder and
    what each kind's folder holds: it is never taken for one kind by default."""
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"{folder}: no such folder (expected a draft folder written by `medusa-forge train`)")
    found, damaged = [], []
    for kind in _KINDS.values():
        try:
            if kind.recognises(path):
                found.append(kind)
        except UserError as err:  # a file one kind had to read is damaged: it may be a stray file of another kind
            damaged.append(err)
    if len(found) == 1:
        return found[0]
    if found:
        raise UserError(f"{folder}: ambiguous, it holds {' and '.join(kind.label for kind in found)}")
    if damaged:
        raise damaged[0]
    expected = "; ".join(f"{kind.label}: {kind.expected_files}" for kind in _KINDS.values())
    held = sorted(p.name for p in path.iterdir())[:10]
    # Every kind's folder has its config file: a missing one is the usual mistake (the wrong folder), said first.
    missing = sorted({kind.config_name for kind in _KINDS.values() if not (path / kind.config_name).is_file()})
    why = f" ({' and '.join(missing)} is missing)" if missing else ""
    raise UserError(
        f"{folder}: no draft of a known kind found{why}. Expected one of: {expected}. The folder holds: {held}"
    )


register(MEDUSA)
register(EAGLE3)
register(DFLASH)
