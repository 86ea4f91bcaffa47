"""Where and in which precision a model runs: `--dtype` names and `--device` (with "auto")."""

from __future__ import annotations

import logging
import types
from dataclasses import field
from typing import Any

import psutil
import torch
from torch import nn

from medusa_forge.errors import UserError

logger = logging.getLogger(__name__)

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


def packable_dtypes() -> tuple[torch.dtype, ...]:
    """The weight dtypes whose products oneDNN runs faster from its own blocked layout on this CPU: float32 on
    any CPU oneDNN runs on, bfloat16 only where the CPU multiplies it natively (elsewhere oneDNN has no bfloat16
    product at all and torch emulates it one row at a time)."""
    if not torch.backends.mkldnn.is_available():
        return ()
    return (torch.float32, torch.bfloat16) if cpu_has_native_bfloat16() else (torch.float32,)


def _packed_forward(linear: nn.Linear, packed: torch.Tensor) -> Any:
    """A forward for `linear` that multiplies by `packed` (its weight in oneDNN's layout) where that is the same
    product: no gradient wanted and CPU tensors of the weight's dtype throughout; anything else takes nn.Linear's
    own path."""

    def forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        usable = (
            not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
            and x.dtype == self.weight.dtype
            and x.device.type == self.weight.device.type == "cpu"
        )
        if not usable:
            return nn.functional.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")

    return types.MethodType(forward, linear)


def is_packed(linear: nn.Module) -> bool:
    """Whether `pack_linear_weights` gave this layer its packed forward."""
    return "forward" in vars(linear)


def pack_linear_weights(module: nn.Module) -> int:
    """Give every nn.Linear of `module` on the CPU whose dtype is in `packable_dtypes()` a copy of its weight in
    oneDNN's blocked layout, and a forward that multiplies by it (what torch.compile's freezing does for CPU
    inference). Why: without it every product re-lays the weight out first (oneDNN, bfloat16) or takes a path
    whose cost jumps from one row to two (MKL, float32), so a tree of a few tokens costs far more than a one-token
    step; packed, a product of 1 to 16 rows costs about the same, and each row of it equals that row multiplied
    alone, bit for bit, so verifying a tree computes exactly what one-token steps compute (BENCHMARKS.md, "Packed
    bfloat16 weights" and "Packed float32 weights"). Inference only: the packed product has no gradient, so
    under autograd a layer falls back to its own forward; the original weight stays (tied embeddings, export), so
    the packed copies take memory beside it: nothing is packed when that would take more than half of the
    available memory. A layer whose weight is replaced later must not be packed. Returns the layers packed."""
    dtypes = packable_dtypes()
    layers = [
        linear
        for linear in module.modules()
        if isinstance(linear, nn.Linear)
        and linear.weight.dtype in dtypes
        and linear.weight.device.type == "cpu"
        and not is_packed(linear)
    ]
    extra = sum(linear.weight.numel() * linear.weight.element_size() for linear in layers)
    available = psutil.virtual_memory().available
    if extra > available // 2:  # the copies must not push the machine into swap (a 7B model: +14 GB)
        logger.warning(
            "weights not packed for faster CPU inference: the packed copies need %.1f GB and only %.1f GB of memory "
            "is available", extra / 1e9, available / 1e9,
        )  # fmt: skip
        return 0
    for linear in layers:
        linear.forward = _packed_forward(linear, torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None))
    return len(layers)


def place_for_decoding(base: nn.Module, device: torch.device, dispatched: bool) -> nn.Module:
    """`base` (a loaded target) ready to decode on `device`: moved there and its CPU weights packed; a
    dispatched one (modeling.TargetPlacement) is left where its device map put each layer and nothing is packed:
    accelerate's hooks swap an offloaded layer's weights in at every forward (a packed copy would be of the
    placeholder) and a packed copy would take the memory the map was sized to leave free."""
    if dispatched:
        return base
    base = base.to(device)
    pack_linear_weights(base)  # on a CPU: faster products (see there)
    return base


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
