"""Cross-entropy of `x @ weight.T` computed in row chunks, with the gradients computed during the forward pass.

Why: a head's vocabulary projection over every labelled token is the largest tensor in training
([tokens, vocab]: 49152 columns for SmolLM2). Chunking keeps peak memory at [chunk, vocab] whatever the
batch, and computing the gradients in the same pass avoids keeping the logits for backward. When the
weight is frozen its gradient (one of the three matrix products) is skipped.
Targets are hard token ids, or soft: the softmax of `target_hidden @ target_weight.T` (the base model's own
next-token distribution), which costs one more forward product per chunk and nothing in memory.
The rows are padded with zero rows to a multiple of 64 (`shapes.pad_rows`): the number of labelled tokens differs
in every batch, and each new product shape costs the kernel libraries memory (issue 27); padding rows are computed
with the others but never counted, and their gradient is zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medusa_forge.drafts.shapes import pad_rows

TOPK = (1, 3, 5)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, target, target_hidden, target_weight, chunk_size):
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        real = target.shape[0]  # rows of x beyond these are padding
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        hits = torch.zeros(len(TOPK), dtype=torch.float32, device=x.device)
        rows = torch.arange(min(chunk_size, x.shape[0]), device=x.device)
        for start in range(0, x.shape[0], chunk_size):
            x_chunk = x[start : start + chunk_size]
            n = x_chunk.shape[0]
            m = max(0, min(n, real - start))  # the chunk's real rows
            logits = (x_chunk @ weight.T).float()
            log_probs = F.log_softmax(logits, dim=-1)
            target_chunk = target[start : start + m]
            if target_hidden is None:
                loss -= log_probs[rows[:m], target_chunk].sum()
                grad_logits = log_probs.exp()
                grad_logits[rows[:m], target_chunk] -= 1.0
            else:
                probs = F.softmax((target_hidden[start : start + n] @ target_weight.T).float(), dim=-1)
                loss -= (probs[:m] * log_probs[:m]).sum()
                grad_logits = log_probs.exp() - probs
            grad_logits[m:] = 0.0
            top = logits[:m].topk(max(TOPK), dim=-1).indices == target_chunk[:, None]
            for k_index, k in enumerate(TOPK):
                hits[k_index] += top[:, :k].any(dim=-1).sum()
            grad_logits = grad_logits.to(x.dtype)
            if need_x:
                grad_x[start : start + n] = grad_logits @ weight
            if need_w:
                grad_w += (grad_logits.T @ x_chunk).float()
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(hits)
        return loss, hits

    @staticmethod
    def backward(ctx, grad_loss, _grad_hits):
        grad_x, grad_w = ctx.saved_tensors
        grad_x = grad_x * grad_loss.to(grad_x.dtype) if grad_x is not None else None
        grad_w = (grad_w * grad_loss).to(ctx.weight_dtype) if grad_w is not None else None
        return grad_x, grad_w, None, None, None, None


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    target_hidden: torch.Tensor | None = None,
    target_weight: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, top-k hit counts against `target` for k in TOPK) of logits x @ weight.T.

    x: [N, H] (or already `pad_rows(x)`: zero rows after the N real ones); weight: [V, H]; target: [N] token ids.
    With target_hidden [N, H'] and target_weight [V, H'] the loss is against softmax(target_hidden @ target_weight.T)
    instead (soft labels); hits still use `target`.
    """
    if target.shape[0] == 0:
        zero = (x.sum() + weight.sum()) * 0.0
        return zero.float(), torch.zeros(len(TOPK), device=x.device)
    target_hidden = pad_rows(target_hidden) if target_hidden is not None else None
    return _LinearCrossEntropy.apply(pad_rows(x), weight, target, target_hidden, target_weight, chunk_size)


def summarise_head_stats(stats: torch.Tensor, name: str, prefix: str = "") -> dict[str, float]:
    """Summed head_stats [K, 3 + len(TOPK)] (the sums every kind's loss returns per head or step) ->
    {`name`{i}_loss, `name`{i}_top{k}} means (`name`: the kind's metric_name)."""
    out = {}
    for i in range(stats.shape[0]):
        out[f"{prefix}{name}{i}_loss"] = float(stats[i, 0]) / max(float(stats[i, 1]), 1.0)
        for k_index, k in enumerate(TOPK):
            out[f"{prefix}{name}{i}_top{k}"] = float(stats[i, 3 + k_index]) / max(float(stats[i, 2]), 1.0)
    return out
