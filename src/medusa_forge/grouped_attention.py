"""Grouped-query attention without key/value copies on a CPU, for several query rows under a mask.

transformers' SDPA attention copies every key/value head once per query head of its group (`repeat_kv`) whenever
more than one query row comes with a mask: CUDA's fused kernels need that. A tree verification is exactly that case
(a few query rows, a 4D tree mask), and so is a padded batch in the frozen pass; on a CPU those copies of the whole
KV cache, per layer and per step, are a visible share of a verification step (BENCHMARKS.md, "Three costs a decoding
step and a training step paid for nothing"). PyTorch's CPU kernel takes the groups as they are (`enable_gqa=True`),
with the same result bit for bit (tests/test_grouped_attention.py). Everything else, every device but the CPU
included, goes to transformers' own SDPA function unchanged: a one-token greedy step takes exactly transformers'
path.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

logger = logging.getLogger(__name__)

GROUPED_SDPA = "medusa_forge_grouped_sdpa"


def grouped_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' `sdpa_attention_forward`, except for query rows > 1 with a mask on a CPU (see the module)."""
    grouped = getattr(module, "num_key_value_groups", 1) > 1
    if (
        not grouped
        or query.shape[2] == 1
        or attention_mask is None
        or query.device.type != "cpu"
        or kwargs.get("position_bias") is not None
        or kwargs.get("softcap") is not None
    ):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED_SDPA, grouped_sdpa_attention)
AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)  # the masks SDPA takes, built the same way


def use_grouped_attention(model: PreTrainedModel) -> bool:
    """Switch a model that runs transformers' SDPA attention to `grouped_sdpa_attention`; other attention
    implementations (eager, flash, ...) stay. Returns whether it switched."""
    if model.config._attn_implementation != "sdpa":
        return False
    try:
        model.set_attn_implementation(GROUPED_SDPA)
    except (ValueError, ImportError) as err:  # an architecture that refuses a registered function keeps its SDPA
        logger.info("%s keeps transformers' SDPA attention: %s", type(model).__name__, err)
        return False
    return True
