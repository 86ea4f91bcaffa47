"""Which candidate path a greedy verification pass accepts (sampling walks the tree instead:
`TreeVerifier.accept`).

Inputs are per tree: `tree_tokens` [N] (node 0 is the root, the base model's own token), the base model's
argmax at every node, and `paths` [L, D+1] the node indices of every root-to-leaf path padded with -1.
"""

from __future__ import annotations

import torch


def greedy_accept(
    tree_tokens: torch.Tensor, predictions: torch.Tensor, paths: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Longest path whose every candidate equals the base model's argmax at its parent (`predictions` [N]: the
    argmax at each node; leaves' entries are never read): the output is exactly plain greedy decoding's.
    Returns (accepted node indices starting with the root, number of accepted candidates)."""
    valid = paths[:, 1:] >= 0
    candidates = tree_tokens[paths[:, 1:].clamp(min=0)]  # [L, D]
    parent_predictions = predictions[paths[:, :-1].clamp(min=0)]  # [L, D]
    match = (candidates == parent_predictions) & valid
    accept_lengths = torch.cumprod(match.to(torch.int64), dim=1).sum(dim=1)  # [L]
    longest = int(accept_lengths.max())
    best = int(torch.argmax(accept_lengths))  # first of the longest: deterministic
    return paths[best, : longest + 1], longest
