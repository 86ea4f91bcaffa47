"""The EAGLE-3 training module: frozen target + trainable draft, and the training-time-test loss
(docs/eagle3-reference.md §4) with its per-step statistics.

Index t at step j (j = 0 .. steps-1) drafts token t+2+j from (feature, target embedding of token t+1+j) at
rotary position t+j. Step 0's feature is combine(target features at t); step j's is step j-1's output state.
Attention follows `UnrolledAttention`: step 0's keys 0..t plus the keys of steps 1..j at index t.
Every index runs every step (as the reference, so the step-0 keys are the same for every step); indices
whose token t+1+j lies beyond the sequence are padding-embedded and never reach the loss.

The loss of step j is the soft cross-entropy against the target's own distribution for token t+2+j
(softmax of the target lm_head's draft-vocabulary rows applied to the target's final hidden state at t+1+j),
averaged over the positions where token t+2+j is an assistant token (labelled) and the target's argmax over
its whole vocabulary is in the draft vocabulary; the total is sum_j decay**j * loss_j.
Two choices differ from the reference: the mask follows the predicted token's label (as the Medusa heads' loss
does; the reference masks by the label at t+j), and each step's mean is over its loss positions rather than
over all B x T indices (so padding and user turns do not scale the loss).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, set_seed

from medusa_forge.data.tokenize import IGNORE_INDEX
from medusa_forge.drafts.eagle3_config import (
    ENGINE_MIN_TARGET_LAYERS,
    draft_vocab_ids,
    draft_vocabulary,
    target_features,
)
from medusa_forge.drafts.eagle3_model import Eagle3Draft, UnrolledAttention, causal_bias
from medusa_forge.drafts.fused_ce import TOPK, linear_cross_entropy
from medusa_forge.drafts.shapes import pad_rows
from medusa_forge.errors import UserError
from medusa_forge.modeling import backbone, input_device

logger = logging.getLogger("medusa_forge")


def feature_records(base: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T, 4H] what the draft's loss reads of the frozen target: its features [3H] (`target_features`) then its
    final hidden state [H] (the target's distribution over the draft vocabulary is recomputed from it)."""
    out = backbone(base)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=True)
    return torch.cat([target_features(out.hidden_states), out.last_hidden_state.to(input_ids.device)], dim=-1)


def assistant_token_counts(items: list[dict[str, list[int]]], vocab_size: int) -> torch.Tensor:
    """[V] how often each token id is a labelled (assistant) token: what the draft vocabulary is chosen from."""
    labels = torch.tensor([t for item in items for t in item["labels"] if t != IGNORE_INDEX], dtype=torch.long)
    if len(labels) and int(labels.max()) >= vocab_size:
        raise UserError(f"the data holds token id {int(labels.max())}, beyond the model's vocabulary {vocab_size}")
    return torch.bincount(labels, minlength=vocab_size)


def new_training_module(
    base: PreTrainedModel, config: Any, base_path: str, token_items: Callable[[], list[dict[str, list[int]]]]
) -> Eagle3ForTraining:
    """A fresh EAGLE-3 draft for `base` with its loss, as train's flags (`config`, a TrainConfig) say; its draft
    vocabulary is chosen from the training data's assistant tokens (`token_items`)."""
    layers = base.config.get_text_config().num_hidden_layers
    if layers < ENGINE_MIN_TARGET_LAYERS:
        logger.warning(
            "the target has %d layers (< %d): the draft reads layers vLLM and SGLang cannot give it, so it can be "
            "trained and used by medusa-forge's decoder but not exported to an engine",
            layers,
            ENGINE_MIN_TARGET_LAYERS,
        )
    vocab = base.config.get_text_config().vocab_size
    size = min(config.eagle3_draft_vocab_size or vocab, vocab)
    ids = None
    if size < vocab:
        d2t, _ = draft_vocabulary(assistant_token_counts(token_items(), vocab), size)
        ids = draft_vocab_ids(d2t)
    set_seed(config.seed)  # the draft's random initial weights are the same on every rank and every run
    draft = Eagle3Draft.for_target(
        base, ids, base_path, config.eagle3_intermediate_size, config.eagle3_fc_norm, config.eagle3_norm_output
    ).to(input_device(base))
    weights = step_weights(config.eagle3_ttt_steps, config.eagle3_step_decay)
    return Eagle3ForTraining(base, draft, weights, chunk_size=config.medusa_loss_chunk_size)


def step_weights(steps: int, decay: float) -> list[float]:
    return [decay**j for j in range(steps)]


def shift_left(x: torch.Tensor, n: int, fill: float | int = 0) -> torch.Tensor:
    """x[:, n:] padded back to x's length with `fill` at the end (the reference's `padding(..., left=False)`)."""
    if n == 0:
        return x
    pad = x.new_full((x.shape[0], min(n, x.shape[1]), *x.shape[2:]), fill)
    return torch.cat([x[:, n:], pad], dim=1)


@torch.no_grad()
def target_argmax(final_hidden: torch.Tensor, lm_head_weight: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[N] argmax over the target's whole vocabulary of final_hidden [N, H] @ lm_head_weight.T, in row chunks
    so memory stays at [chunk, V]."""
    # The rows come to the weight's dtype, never the [V, H] weight to theirs: no copy of it per batch. Zero rows
    # pad them to a multiple of 64 (few product shapes, drafts/shapes.py); their results are dropped.
    rows = pad_rows(final_hidden.to(lm_head_weight.dtype))
    out = torch.empty(rows.shape[0], dtype=torch.long, device=final_hidden.device)
    # max().indices, not argmax(): the same ids (ties go to the first), and on a bfloat16 [chunk, V] on the
    # CPU argmax took longer than the product itself (BENCHMARKS.md, "Three costs a decoding step ...").
    for start in range(0, rows.shape[0], chunk_size):
        out[start : start + chunk_size] = (rows[start : start + chunk_size] @ lm_head_weight.T).max(-1).indices
    return out[: final_hidden.shape[0]]


class Eagle3ForTraining(nn.Module):
    """forward(labels, input_ids, attention_mask[, hidden_states]) -> {"loss", "head_stats"}.

    hidden_states (from the hidden-state cache) are the [B, T, 4H] records of `feature_records`:
    target features [3H] then the final hidden state [H]; without them the target runs on the batch.
    head_stats is a [steps, 3 + len(TOPK)] tensor of sums per step (soft cross-entropy, positions in the loss,
    labelled positions, top-k hits of the draft against the target's argmax), as MedusaForTraining's per head.
    """

    draft_attribute = "draft"  # what the trainer saves

    def __init__(
        self,
        base: PreTrainedModel,
        draft: Eagle3Draft,
        loss_weights: list[float],
        chunk_size: int = 1024,
    ) -> None:
        super().__init__()
        base.eval()
        base.requires_grad_(False)
        # Held, not registered as a submodule: the frozen target is never trained, saved, moved by the Trainer or
        # wrapped by DDP, and a dispatched one (modeling.TargetPlacement) keeps its own devices.
        object.__setattr__(self, "base", base)
        self.draft = draft
        self.loss_weights = loss_weights
        self.chunk_size = chunk_size
        ids = draft_vocab_ids(draft.d2t).to(base.get_output_embeddings().weight.device)
        # The target's lm_head rows of the draft vocabulary give its distribution over it (soft targets).
        # Buffers, not parameters: frozen, moved with the module, never saved (the trainer saves the draft only).
        self.register_buffer("target_rows", base.get_output_embeddings().weight.detach()[ids].clone(), persistent=False)
        to_draft = torch.full((draft.config.vocab_size,), -1, dtype=torch.long, device=ids.device)
        to_draft[ids] = torch.arange(len(ids), device=ids.device)
        self.register_buffer("target_to_draft", to_draft, persistent=False)

    def train(self, mode: bool = True) -> Eagle3ForTraining:
        super().train(mode)
        self.base.eval()  # the frozen target never uses dropout
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
                hidden_states = feature_records(self.base, input_ids, attention_mask)
        with torch.no_grad():
            embeds = self.base.get_input_embeddings()(input_ids)
        return self.loss(hidden_states, embeds, labels, attention_mask)

    def loss(
        self, records: torch.Tensor, embeds: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """records [B, T, 4H] (features, final hidden); embeds [B, T, H] the target's embedding of input_ids."""
        draft = self.draft
        dtype = draft.fc.weight.dtype
        hidden = draft.config.hidden_size
        records = records.to(dtype)
        features, final = records[..., : 3 * hidden], records[..., 3 * hidden :]
        embeds = embeds.to(dtype)
        batch, length = labels.shape
        steps = len(self.loss_weights)
        stats = torch.zeros(steps, 3 + len(TOPK), dtype=torch.float32, device=labels.device)

        # Per target position s (0 .. T-2): is token s+1 labelled, and the draft id of the target's argmax
        # for it (-1 outside the draft vocabulary). The same for every step, so computed once.
        labelled = labels[:, 1:] != IGNORE_INDEX  # [B, T-1]
        goal = torch.full(labelled.shape, -1, dtype=torch.long, device=labels.device)
        if labelled.any():
            argmax = target_argmax(final[:, :-1][labelled], self.base.get_output_embeddings().weight, self.chunk_size)
            goal[labelled] = self.target_to_draft[argmax]
        target_rows = self.target_rows.to(dtype)

        positions = torch.arange(length, device=labels.device).expand(batch, length)
        attention = UnrolledAttention(causal_bias(attention_mask, dtype))
        feature = draft.combine(features)
        # Every trainable parameter in every step's graph, even with nothing to learn in a batch, as DDP expects.
        total = 0.0 * sum(p.sum() for p in draft.parameters() if p.requires_grad)
        for j in range(steps):
            shift = 1 + j  # index t reads token t+shift and the target's state there; it predicts t+shift+1
            out = draft.layer(shift_left(embeds, shift), feature, positions + j, attention)
            attention = attention.after(out.keys, out.values)
            feature = draft.next_feature(out.state)
            n = length - 1 - shift  # indices t whose target position t+shift is <= T-2
            if n <= 0:
                continue
            step_labelled, step_goal = labelled[:, shift:], goal[:, shift:]
            valid = step_labelled & (step_goal >= 0)
            count = int(valid.sum())
            ce_sum, hits = linear_cross_entropy(
                draft.norm(out.state[:, :n][valid]),
                draft.lm_head.weight,
                step_goal[valid],
                final[:, shift : length - 1][valid],
                target_rows,
                self.chunk_size,
            )
            if count:
                total = total + self.loss_weights[j] * ce_sum / count
            stats[j, 0] = ce_sum.detach()
            stats[j, 1] = count
            stats[j, 2] = step_labelled.sum()
            stats[j, 3:] = hits
        return {"loss": total, "head_stats": stats}
