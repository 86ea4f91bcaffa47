"""How the hidden-state cache stores a token's record, and what that costs on disk (the plan `train` and the
pipeline print before building). A record is stored float16 as computed, or float8 (e4m3) with one float16 scale
per token and per record part (the final state and each EAGLE-3 feature layer apart, so one layer's outliers do
not coarsen the others). float8 halves the disk; measured before offered (BENCHMARKS.md, "Keep less in the
hidden-state cache"): held-out top-1/top-5 within +-0.002 of float16 for Medusa and EAGLE-3.

The one place for the quantisation: the cache writes and reads with it, `bench/cache_precision.py` imports it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch
from transformers import PretrainedConfig

from medusa_forge.drafts import get_kind

PRECISIONS = ("float16", "float8")
E4M3_MAX = 448.0  # float8_e4m3fn's largest finite value
SCALE_BYTES = 2  # a float16 scale per token and part
DATA_FILES = {"float16": "hidden.f16", "float8": "hidden.f8"}
SCALES_FILE = "scales.f16"  # float8 only: [tokens, parts] float16
STORED = {"float16": np.float16, "float8": np.uint8}  # the data file's numpy dtype (float8 as its raw bytes)


def token_bytes(precision: str, parts: int, part_width: int) -> int:
    """Bytes a token's record takes on disk."""
    if precision == "float8":
        return parts * (part_width + SCALE_BYTES)
    return parts * part_width * 2


def float8_encode(records: torch.Tensor, parts: int) -> tuple[np.ndarray, np.ndarray]:
    """[T, W] records -> ([T, W] e4m3 bytes as uint8, [T, parts] float16 scales). Each part is scaled so that its
    largest magnitude maps to e4m3's largest value; the scale is rounded to float16 before dividing, so the reader
    multiplying by the stored scale undoes exactly the division done here."""
    x = records.float().reshape(records.shape[0], parts, -1)
    scale = (x.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).clamp(min=2**-24).half().float()
    codes = (x / scale).to(torch.float8_e4m3fn).view(torch.uint8)
    return codes.reshape(records.shape).numpy(), scale.squeeze(-1).half().numpy()


def float8_decode(codes: np.ndarray, scales: np.ndarray) -> torch.Tensor:
    """The [T, W] float16 records `float8_encode` stored as (codes, scales)."""
    tokens, parts = scales.shape
    x = torch.from_numpy(np.ascontiguousarray(codes)).view(torch.float8_e4m3fn).float()
    back = x.view(tokens, parts, -1) * torch.from_numpy(np.ascontiguousarray(scales)).float().unsqueeze(-1)
    return back.view(codes.shape).half()


def float8_round_trip(records: np.ndarray, part: int) -> np.ndarray:
    """[T, W] float16 records as a float8 cache with `part`-wide parts gives them back."""
    parts = records.shape[1] // part
    return float8_decode(*float8_encode(torch.from_numpy(np.asarray(records, dtype=np.float16)), parts)).numpy()


def record_layout(config: PretrainedConfig, kind: str) -> tuple[list[int | str], int]:
    """(what each token's record holds, in order, as `output_hidden_states` indices or "final"; its width)."""
    layers = get_kind(kind).record_layers(config)
    return layers, len(layers) * config.get_text_config().hidden_size


def record_bytes(config: PretrainedConfig, kind: str, precision: str = "float16") -> int:
    """Bytes a token's record takes on disk at `precision`."""
    return token_bytes(precision, len(record_layout(config, kind)[0]), config.get_text_config().hidden_size)


def describe_record(config: PretrainedConfig, kind: str, precision: str = "float16") -> str:
    """What a token's record holds and costs, in words: "hidden states 2, 15, 27 + the final state = 4 x 576 x 2
    bytes = 4608 bytes per token" (float8: "4 x 576 x 1 byte + 4 float16 scales = 2312 bytes per token")."""
    layers = record_layout(config, kind)[0]
    named = [str(layer) for layer in layers if layer != "final"]
    parts = ([f"hidden state{'s' if len(named) > 1 else ''} {', '.join(named)}"] if named else []) + (
        ["the final state"] if "final" in layers else []
    )
    size = f"{len(layers)} x {config.get_text_config().hidden_size} x " + (
        f"1 byte (float8) + {len(layers)} float16 scale{'s' if len(layers) > 1 else ''}"
        if precision == "float8"
        else "2 bytes"
    )
    return f"{' + '.join(parts)} = {size} = {record_bytes(config, kind, precision)} bytes per token"


def cache_plan(config: PretrainedConfig, kind: str, tokens: int, folder: Path, precision: str = "float16") -> str:
    """The cache's disk plan, said before it is built (by `train`, and by the pipeline from its estimated token
    count): what a token's record holds and costs, the total for `tokens`, where, and the free space there; at
    float16, also what float8 records would take and the flag that keeps them."""
    free = free_bytes(folder)[0]
    plan = (
        f"hidden-state cache plan: a token's record holds {describe_record(config, kind, precision)}; {tokens} "
        f"tokens = {tokens * record_bytes(config, kind, precision) / 1e9:.2f} GB at {folder} "
        f"({free / 1e9:.1f} GB free there)"
    )
    if precision == "float16":
        smaller = record_bytes(config, kind, "float8")
        plan += (
            f"; float8 records would take {smaller} bytes per token = {tokens * smaller / 1e9:.2f} GB "
            f"(--medusa_hidden_cache_precision float8; held-out accuracy unchanged in BENCHMARKS.md, "
            f'"Keep less in the hidden-state cache")'
        )
    return plan


def free_bytes(path: Path) -> tuple[int, int]:
    """(free bytes, device) of the file system `path` is or will be on (its nearest existing parent)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free, os.stat(path).st_dev
