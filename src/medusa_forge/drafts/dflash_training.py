"""The DFlash training module: frozen target + trainable draft, and the reference's block objective
(docs/dflash-reference.md §4, SpecForge's `OnlineDFlashModel`).

Per sequence, up to `num_anchors` anchors a are drawn uniformly without replacement among the positions where the
token and the next are both supervised (assistant tokens). Each anchor's block [x_a, m, ..., m] (B tokens at positions
a .. a+B-1) is embedded with the target's frozen embedding and attends to the context keys strictly before a (the
anchor's own hidden state does not exist at serve time, §6.6) and to its whole block; no block sees another. Slot k
(1 .. B-1) predicts the data token x[a+k] through the target's frozen lm_head, weighted exp(-(k-1)/gamma) when gamma
is set; loss = sum w * CE / sum w over the supervised slots inside the sequence.

Where we differ from SpecForge: anchors are drawn per batch from torch's generator (seeded by the trainer), and the
per-slot sums are returned as head_stats so that training logs an accuracy per block position.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, set_seed

from medusa_forge.data.tokenize import IGNORE_INDEX
from medusa_forge.drafts.dflash_config import hidden_state_indices, resolve_mask_token_id
from medusa_forge.drafts.dflash_model import DFlashDraft
from medusa_forge.drafts.fused_ce import TOPK, linear_cross_entropy
from medusa_forge.modeling import backbone, input_device, load_tokenizer


def feature_records(
    base: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: tuple[int, ...]
) -> torch.Tensor:
    """[B, T, k*H] the target's hidden states at HF indices `layers` (target layer id t + 1), concatenated in order:
    all the draft's loss reads of the target besides the token ids (its labels are the data tokens)."""
    out = backbone(base)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=True)
    first = out.hidden_states[0].device  # a target dispatched over devices: the features go where the inputs are
    return torch.cat([out.hidden_states[i].to(first) for i in layers], dim=-1)


def slot_weights(block_size: int, gamma: float) -> list[float]:
    """Slot k's (1 .. B-1) loss weight: exp(-(k-1)/gamma), slot 1 weighted 1 (SpecForge
    `_dflash_objective_chunk_terms`); gamma 0: no decay (SpecForge's schema default None)."""
    return [math.exp(-(k - 1) / gamma) if gamma > 0 else 1.0 for k in range(1, block_size)]


def new_training_module(
    base: PreTrainedModel, config: Any, base_path: str, token_items: Callable[[], list[dict[str, list[int]]]]
) -> DFlashForTraining:
    """A fresh DFlash draft for `base` with its loss, as train's flags (`config`, a TrainConfig) say."""
    vocab = base.config.get_text_config().vocab_size
    mask = resolve_mask_token_id(load_tokenizer(base_path), vocab, config.dflash_mask_token_id)
    set_seed(config.seed)  # the draft's random initial weights are the same on every rank and every run
    draft = DFlashDraft.for_target(base, base_path, mask, config.dflash_block_size, config.dflash_num_layers)
    draft = draft.to(input_device(base))
    weights = slot_weights(config.dflash_block_size, config.dflash_loss_gamma)
    return DFlashForTraining(base, draft, weights, config.dflash_num_anchors, config.medusa_loss_chunk_size)


def sample_anchors(loss_mask: torch.Tensor, num_anchors: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(anchors [B, N], keep [B, N]): up to `num_anchors` positions a per row with loss_mask[a] and loss_mask[a+1],
    uniformly without replacement (random keys, as SpecForge's `_sample_anchor_positions`); rows with fewer
    candidates are padded with keep False (anchor 0, never scored)."""
    candidates = loss_mask[:, :-1] & loss_mask[:, 1:]  # [B, T-1]
    count = min(num_anchors, candidates.shape[1])
    keys = torch.rand(candidates.shape, device=loss_mask.device).masked_fill(~candidates, 2.0)
    order = keys.argsort(dim=1)[:, :count]
    keep = candidates.gather(1, order)
    anchors = order.masked_fill(~keep, 0)
    return anchors, keep


class DFlashForTraining(nn.Module):
    """forward(labels, input_ids, attention_mask[, hidden_states]) -> {"loss", "head_stats"}.

    hidden_states (from the hidden-state cache) are the [B, T, k*H] records of `feature_records`; without them the
    target runs on the batch. head_stats is a [B-1, 3 + len(TOPK)] tensor of sums per block slot 1 .. B-1
    (cross-entropy, positions in the loss, labelled positions, top-k hits), as the other kinds' per head or step."""

    draft_attribute = "draft"  # what the trainer saves

    def __init__(
        self, base: PreTrainedModel, draft: DFlashDraft, weights: list[float], num_anchors: int, chunk_size: int = 1024
    ) -> None:
        super().__init__()
        base.eval()
        base.requires_grad_(False)
        # Held, not registered as a submodule: the frozen target is never trained, saved, moved by the Trainer or
        # wrapped by DDP (as Eagle3ForTraining's).
        object.__setattr__(self, "base", base)
        self.draft = draft
        self.weights = weights
        self.num_anchors = num_anchors
        self.chunk_size = chunk_size
        self.layers = hidden_state_indices(draft.config.target_layer_ids)

    def train(self, mode: bool = True) -> DFlashForTraining:
        super().train(mode)
        self.base.eval()
        return self

    def forward(
        self,
        labels: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        hidden_states: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if hidden_states is None:
            with torch.no_grad():
                hidden_states = feature_records(self.base, input_ids, attention_mask, self.layers)
        loss_mask = (labels != IGNORE_INDEX) & attention_mask.bool()
        anchors, keep = sample_anchors(loss_mask, self.num_anchors)
        return self.loss(hidden_states, input_ids, loss_mask, attention_mask.bool(), anchors, keep)

    def loss(
        self,
        records: torch.Tensor,
        input_ids: torch.Tensor,
        loss_mask: torch.Tensor,
        attention_mask: torch.Tensor,
        anchors: torch.Tensor,
        keep: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """records [B, T, k*H]; anchors/keep [B, N] (`sample_anchors`)."""
        draft = self.draft
        dtype = draft.fc.weight.dtype
        batch, length = input_ids.shape
        size = draft.config.block_size
        device = input_ids.device
        slots = torch.arange(size, device=device)
        positions = anchors[..., None] + slots  # [B, N, B]: slot k of anchor a sits at a + k
        block_ids = input_ids.gather(1, anchors).unsqueeze(-1).repeat(1, 1, size)
        block_ids[..., 1:] = draft.config.mask_token_id
        with torch.no_grad():
            embedding = self.base.get_input_embeddings()
            embeds = embedding(block_ids.to(embedding.weight.device)).to(device=device, dtype=dtype)
        keys = torch.arange(length, device=device)
        visible = (keys[None, None, :] < anchors[..., None]) & attention_mask[:, None, :]  # strictly before a (§6.6)
        context = draft.context(records.to(device=device, dtype=dtype))
        kv = draft.context_kv(context, keys.expand(batch, length))
        out = draft.block(embeds, positions, kv, visible)  # [B, N, B, H]

        inside = positions < length
        at = positions.clamp(max=length - 1).flatten(1)
        targets = input_ids.gather(1, at).view(positions.shape)
        supervised = keep[..., None] & inside & loss_mask.gather(1, at).view(positions.shape)
        head = self.base.get_output_embeddings().weight  # frozen: linear_cross_entropy skips its gradient
        stats = torch.zeros(size - 1, 3 + len(TOPK), dtype=torch.float32, device=device)
        # Every trainable parameter in every step's graph, even with nothing to learn in a batch, as DDP expects.
        total = 0.0 * sum(p.sum() for p in draft.parameters() if p.requires_grad)
        weight_sum = 0.0
        for k in range(1, size):
            valid = supervised[:, :, k]
            count = int(valid.sum())
            rows = out[:, :, k][valid].to(head.device, head.dtype)
            ce_sum, hits = linear_cross_entropy(rows, head, targets[:, :, k][valid].to(head.device),
                                                chunk_size=self.chunk_size)  # fmt: skip
            total = total + self.weights[k - 1] * ce_sum.to(device)
            weight_sum += self.weights[k - 1] * count
            stats[k - 1, 0] = ce_sum.detach()
            stats[k - 1, 1] = count
            stats[k - 1, 2] = count
            stats[k - 1, 3:] = hits.to(device)
        return {"loss": total / max(weight_sum, 1.0), "head_stats": stats}
