"""Where and in which precision a model runs: `--dtype` names and `--device` (with "auto")."""

from __future__ import annotations

from dataclasses import field
from typing import Any

import torch

from medusa_forge.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_field() -> Any:
    """The `--dtype` flag of a command config (generate, eval, serve)."""
    return field(
        default="auto",
        metadata={
            "help": "auto, float32, bfloat16 or float16. auto: `eval` times decoding in float32 and bfloat16 and "
            "stores the faster with the tree in the draft folder; `generate` and `serve` use what it stored "
            "(float32 before any eval, and without a draft). float32 output is token-identical to plain greedy; "
            "in bfloat16 near-ties can flip (eval reports how often)."
        },
    )


def device_field() -> Any:
    """The `--device` flag of a command config (generate, eval, serve)."""
    return field(default="auto", metadata={"help": "auto (cuda if present), cpu, cuda, ..."})


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX). There, bfloat16 matrix products
    are several times faster than float32 ones (BENCHMARKS.md); elsewhere they are emulated and slower."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def resolve_dtype(name: str) -> torch.dtype:
    """The torch dtype of a `--dtype` name; "auto" with no measured choice to go by is float32 (exact)."""
    if name == "auto":
        return torch.float32
    if name not in DTYPES:
        raise UserError(f"--dtype {name!r}: choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str = "auto") -> torch.device:
    """The device named `name`; "auto" is the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise UserError(f"--device {name!r}: {err}") from None
