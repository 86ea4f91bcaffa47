"""Medusa heads' training: the records they read (the final hidden state), the training module (frozen base +
trainable heads) built from train's flags, and the Medusa loss with its per-head statistics."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, set_seed

from medusa_forge.data.tokenize import IGNORE_INDEX
from medusa_forge.drafts.fused_ce import TOPK, linear_cross_entropy
from medusa_forge.drafts.medusa_heads import MedusaHeads
from medusa_forge.drafts.shapes import pad_rows
from medusa_forge.modeling import backbone


def final_hidden_records(base: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T, H] the base model's final hidden state (after its final norm): what every head reads, on the inputs'
    device (a dispatched base leaves it on its last layer's)."""
    out = backbone(base)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state.to(input_ids.device)


def new_training_module(base: PreTrainedModel, config: Any, base_path: str) -> MedusaForTraining:
    """Fresh heads for `base` with their loss, as train's flags (`config`, a TrainConfig) say."""
    # The blocks' random biases are the same whether the target was loaded (which may draw random numbers) or only
    # its stand-in was read (which draws none): a run from a complete cache trains as the run that built it.
    set_seed(config.seed)
    heads = MedusaHeads.for_base_model(base, config.medusa_num_heads, config.medusa_num_layers, base_path)
    draft_vocab = config.medusa_draft_vocab_size or None
    if draft_vocab is not None and draft_vocab >= base.get_output_embeddings().weight.shape[0]:
        draft_vocab = None  # the whole vocabulary anyway
    heads.config.draft_vocab_size = draft_vocab
    if config.medusa_freeze_projection:
        for head in heads:
            head[-1].weight.requires_grad_(False)
    return MedusaForTraining(
        base,
        heads,
        head_weights(config.medusa_num_heads, config.medusa_decay_coefficient),
        soft_labels=config.medusa_soft_labels,
        chunk_size=config.medusa_loss_chunk_size,
        draft_vocab_size=draft_vocab,
    )


def head_weights(num_heads: int, decay_coefficient: float) -> list[float]:
    return [decay_coefficient**i for i in range(num_heads)]


class MedusaForTraining(nn.Module):
    """forward(labels, input_ids + attention_mask | hidden_states) -> {"loss", "head_stats"}.

    With `hidden_states` (from the hidden-state cache) the base model is not run at all.
    head_stats is a [K, 3 + len(TOPK)] tensor of sums (cross-entropy, tokens in the loss, tokens, top-k hits...),
    which the trainer accumulates between logging steps and reduces across processes.
    """

    draft_attribute = "heads"  # what the trainer saves

    def __init__(
        self,
        base: PreTrainedModel,
        heads: MedusaHeads,
        loss_weights: list[float],
        soft_labels: bool = False,
        chunk_size: int = 1024,
        draft_vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        base.eval()
        base.requires_grad_(False)
        # Held, not registered as a submodule: the frozen target is never trained, saved, moved by the Trainer or
        # wrapped by DDP, and a dispatched one (modeling.TargetPlacement) keeps its own devices.
        object.__setattr__(self, "base", base)
        self.heads = heads
        self.loss_weights = loss_weights
        self.soft_labels = soft_labels
        self.chunk_size = chunk_size
        self.draft_vocab_size = draft_vocab_size

    def train(self, mode: bool = True) -> MedusaForTraining:
        super().train(mode)
        self.base.eval()  # the frozen base never uses dropout
        return self

    def forward(
        self,
        labels: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        hidden_states: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        if hidden_states is None:
            with torch.no_grad():
                hidden_states = final_hidden_records(self.base, input_ids, attention_mask)
        soft_weight = self.base.get_output_embeddings().weight if self.soft_labels else None
        return medusa_loss(
            self.heads, hidden_states, labels, self.loss_weights, soft_weight, self.chunk_size, self.draft_vocab_size
        )


def medusa_loss(
    heads: MedusaHeads,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    loss_weights: list[float],
    soft_target_weight: torch.Tensor | None = None,
    chunk_size: int = 1024,
    draft_vocab_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Weighted sum over heads of head i's mean cross-entropy at position t against token t+2+i.

    Only positions whose target is labelled (an assistant token) go through the vocabulary projection.
    Hard targets are labels[t+2+i]; soft targets (soft_target_weight = the base lm_head weight) are the base
    model's own distribution for that token, softmax(lm_head(hidden[t+1+i])).
    With draft_vocab_size N the heads learn (and later propose) only token ids < N: targets >= N leave the
    loss but still count as misses in the top-k accuracies.
    """
    hidden = hidden.to(heads[0][-1].weight.dtype)
    seq_len = labels.shape[1]
    total = hidden.new_zeros((), dtype=torch.float32)
    stats = torch.zeros(len(heads), 3 + len(TOPK), dtype=torch.float32, device=hidden.device)
    vocab = slice(None, draft_vocab_size)
    for i, head in enumerate(heads):
        shift = 2 + i
        graph_anchor = 0.0 * sum(p.sum() for p in head.parameters() if p.requires_grad)
        if seq_len <= shift:
            total = total + graph_anchor  # every head in every step's graph, as DDP expects
            continue
        targets = labels[:, shift:]
        valid = targets != IGNORE_INDEX
        stats[i, 2] = valid.sum()
        if draft_vocab_size is not None:
            valid &= targets < draft_vocab_size
        count = int(valid.sum())
        soft_hidden = hidden[:, shift - 1 : seq_len - 1][valid] if soft_target_weight is not None else None
        ce_sum, hits = linear_cross_entropy(
            head[:-1](pad_rows(hidden[:, : seq_len - shift][valid])),  # padded before the blocks: few shapes
            head[-1].weight[vocab],
            targets[valid],
            soft_hidden,
            soft_target_weight[vocab] if soft_target_weight is not None else None,
            chunk_size,
        )
        total = total + graph_anchor
        if count:
            total = total + loss_weights[i] * ce_sum / count
        stats[i, 0] = ce_sum.detach()
        stats[i, 1] = count
        stats[i, 3:] = hits
    return {"loss": total, "head_stats": stats}
