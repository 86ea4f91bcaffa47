"""The training module: frozen base + trainable heads, and the Medusa loss with its per-head statistics."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from medusa_forge.data.tokenize import IGNORE_INDEX
from medusa_forge.heads import MedusaHeads, backbone

TOPK = (1, 3, 5)


def head_weights(num_heads: int, decay_coefficient: float) -> list[float]:
    return [decay_coefficient**i for i in range(num_heads)]


class MedusaForTraining(nn.Module):
    """forward(input_ids, attention_mask, labels) -> {"loss", "head_stats"}.

    head_stats is a [K, 2 + len(TOPK)] tensor of sums: (cross-entropy, token count, top-k hits...), which
    the trainer accumulates between logging steps and reduces across processes.
    Only positions whose target (t+2+i) is an assistant token go through head i's vocabulary projection.
    """

    def __init__(self, base: PreTrainedModel, heads: MedusaHeads, loss_weights: list[float]) -> None:
        super().__init__()
        base.eval()
        base.requires_grad_(False)
        self.base = base
        self.heads = heads
        self.loss_weights = loss_weights

    def train(self, mode: bool = True) -> MedusaForTraining:
        super().train(mode)
        self.base.eval()  # the frozen base never uses dropout
        return self

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            hidden = backbone(self.base)(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state
        return medusa_loss(self.heads, hidden, labels, self.loss_weights)


def medusa_loss(
    heads: MedusaHeads, hidden: torch.Tensor, labels: torch.Tensor, loss_weights: list[float]
) -> dict[str, torch.Tensor]:
    """Weighted sum over heads of the mean cross-entropy of head i at t against labels[t + 2 + i]."""
    hidden = hidden.to(heads[0][-1].weight.dtype)
    seq_len = labels.shape[1]
    total = hidden.new_zeros(())
    stats = hidden.new_zeros(len(heads), 2 + len(TOPK), dtype=torch.float32)
    for i, head in enumerate(heads):
        shift = 2 + i
        if seq_len <= shift:
            continue
        targets = labels[:, shift:]
        valid = targets != IGNORE_INDEX
        count = int(valid.sum())
        if count == 0:
            # keep every head in the graph so DDP sees a gradient for each parameter
            total = total + 0.0 * sum(p.sum() for p in head.parameters())
            continue
        logits = head(hidden[:, : seq_len - shift][valid]).float()
        target = targets[valid]
        ce_sum = F.cross_entropy(logits, target, reduction="sum")
        total = total + loss_weights[i] * ce_sum / count
        with torch.no_grad():
            top = logits.topk(max(TOPK), dim=-1).indices
            hits = top == target[:, None]
            stats[i, 0] = ce_sum.detach()
            stats[i, 1] = count
            for k_index, k in enumerate(TOPK):
                stats[i, 2 + k_index] = hits[:, :k].any(dim=-1).sum()
    return {"loss": total, "head_stats": stats}


def summarise_head_stats(stats: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """Summed head_stats -> {medusa{i}_loss, medusa{i}_top{k}} means."""
    out = {}
    for i in range(stats.shape[0]):
        count = max(float(stats[i, 1]), 1.0)
        out[f"{prefix}medusa{i}_loss"] = float(stats[i, 0]) / count
        for k_index, k in enumerate(TOPK):
            out[f"{prefix}medusa{i}_top{k}"] = float(stats[i, 2 + k_index]) / count
    return out
