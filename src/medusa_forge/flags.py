"""Command flags from config dataclasses: each field is one flag, its default in the dataclass and its help,
choices and spellings in the field's metadata, so a parser and its config cannot disagree.

Field metadata: `help`; `flag` (the spelling when it is not `--field-name`); `aliases` (more spellings);
`choices`; `metavar`.
A config class with `UNDERSCORE_ALIASES = True` also accepts `--field_name` for every `--field-name` (scripts
written for the original Medusa tools mix both styles). A bool field is a switch (`--no-progress`), a list
field is repeatable (`--url A --url B`), a field without a default is a required flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import types
import typing
from typing import Any

from medusa_forge.errors import UserError

_TRUE = {"true", "1", "yes", "y", "t", "on"}
_FALSE = {"false", "0", "no", "n", "f", "off"}


def flag_names(config_type: type, field: dataclasses.Field) -> list[str]:
    """The spellings of a field's flag, the one named in messages first."""
    main = field.metadata.get("flag") or "--" + field.name.replace("_", "-")
    names = [main, *field.metadata.get("aliases", ())]
    if getattr(config_type, "UNDERSCORE_ALIASES", False) and "-" in main[2:]:
        names.append("--" + main[2:].replace("-", "_"))
    return names


def _fields(config_type: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(config_type) if f.init]


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(the type a flag value converts to, whether None is allowed) for X, X | None and list[X]."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), len(args) < len(typing.get_args(annotation))
    return annotation, False


def build_parser(config_type: type, prog: str) -> argparse.ArgumentParser:
    """An argparse parser whose flags are `config_type`'s fields. Flags not given stay out of the namespace
    (argparse.SUPPRESS), so every default comes from the dataclass."""
    parser = argparse.ArgumentParser(prog=prog, description=(config_type.__doc__ or "").strip() or None)
    hints = typing.get_type_hints(config_type)
    for field in _fields(config_type):
        kind, _ = _base_type(hints[field.name])
        kwargs: dict[str, Any] = {"dest": field.name, "help": field.metadata.get("help"), "default": argparse.SUPPRESS}
        for key in ("choices", "metavar"):
            if key in field.metadata:
                kwargs[key] = field.metadata[key]
        if kind is bool:
            kwargs["action"] = "store_true"
        elif typing.get_origin(kind) is list:
            kwargs.update(action="append", type=typing.get_args(kind)[0])
        else:
            kwargs["type"] = kind
            required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
            if required:
                kwargs["required"] = True
        parser.add_argument(*flag_names(config_type, field), **kwargs)
    return parser


def parse_config(config_type: type, argv: list[str], prog: str):
    """argv -> a validated `config_type` (argparse exits 2 on a malformed flag; the config raises UserError)."""
    return config_type(**vars(build_parser(config_type, prog).parse_args(argv)))


def config_keys(config_type: type, owned: tuple[str, ...] = ()) -> list[str]:
    """The keys a config file may set: every field but those the caller sets itself."""
    return sorted(f.name for f in _fields(config_type) if f.name not in owned)


def convert(value: Any, annotation: Any, flag: str) -> Any:
    """A config-file value -> the field's type, as the flag would read it; errors name the flag."""
    kind, optional = _base_type(annotation)
    if value is None:
        return None
    if typing.get_origin(kind) is list:
        items = value if isinstance(value, list | tuple) else [value]
        return [convert(item, typing.get_args(kind)[0], flag) for item in items]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in _TRUE | _FALSE:
            return str(value).lower() in _TRUE
        raise UserError(f"argument {flag}: invalid bool value: {value!r} (true or false)")
    if kind in (int, float):
        if isinstance(value, bool):
            raise UserError(f"argument {flag}: invalid {kind.__name__} value: {value!r}")
        if isinstance(value, int | float) and (kind is float or float(value).is_integer()):
            return kind(value)
        try:
            return kind(str(value))
        except ValueError:
            raise UserError(f"argument {flag}: invalid {kind.__name__} value: {value!r}") from None
    if kind is str and isinstance(value, int | float):
        return str(value)
    if isinstance(kind, type) and issubclass(kind, enum.Enum) and isinstance(value, str):
        return value
    return value


def config_from_values(config_type: type, values: dict, **fixed: Any):
    """A validated `config_type` from config-file values (None = the default) plus the caller's `fixed` ones."""
    hints = typing.get_type_hints(config_type)
    by_name = {f.name: f for f in _fields(config_type)}
    converted = {}
    for key, value in values.items():
        if value is None:
            continue
        flag = flag_names(config_type, by_name[key])[0]
        converted[key] = convert(value, hints[key], flag)
        choices = by_name[key].metadata.get("choices")
        if choices is not None and converted[key] not in choices:
            raise UserError(f"argument {flag}: invalid choice: {value!r} (choose from {', '.join(map(str, choices))})")
    return config_type(**converted, **fixed)
