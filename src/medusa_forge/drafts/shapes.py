"""Few tensor shapes in training: sequence lengths and gathered row counts rounded up to a multiple.

Why (issue 27): every distinct matrix-product shape costs memory and time in the kernel libraries. On a CPU, oneDNN
(which runs bfloat16 products) keeps one primitive per shape in a cache of up to 1024 entries (1.4-1.7 MB each for a
float32 [rows, 576] x [576, 8192] product on an AVX2 CPU: BENCHMARKS.md, "Training memory"). Padding each batch to
its own longest row and gathering a different number of labelled tokens per batch made nearly every step add new
shapes: the issue measured ~35 MB more resident memory per step. On a GPU the same churn costs kernel selection and
allocator fragmentation. Rounding up to multiples of 64 leaves a handful of shapes (6 lengths at
--model_max_length 384), at the cost of at most 63 padded positions or rows, which are masked and never reach a loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LENGTH_MULTIPLE = 64  # padded sequence lengths (batches, the hidden-state cache's frozen pass)
ROW_MULTIPLE = 64  # rows gathered for the vocabulary projections (labelled tokens)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def padded_length(longest: int, limit: int | None = None) -> int:
    """The length a batch whose longest row is `longest` is padded to: the next multiple of LENGTH_MULTIPLE, but
    never past `limit` (the run's max length: a model with learned positions has none beyond it)."""
    length = round_up(longest, LENGTH_MULTIPLE)
    return max(longest, min(length, limit)) if limit is not None else length


def pad_rows(x: torch.Tensor, multiple: int = ROW_MULTIPLE) -> torch.Tensor:
    """x [N, ...] with zero rows appended up to a multiple of `multiple` rows (x itself when none are needed)."""
    missing = round_up(x.shape[0], multiple) - x.shape[0]
    if missing == 0:
        return x
    return F.pad(x, (0, 0) * (x.dim() - 1) + (0, missing))
