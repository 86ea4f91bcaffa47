"""Which candidate path a verification pass accepts: greedy (exact) and typical (sampling).

Inputs are per tree: `tree_tokens` [N] (node 0 is the root, the base model's own token), the base model's
argmax (greedy) or logits (typical) at every node, and `paths` [L, D+1] the node indices of every root-to-leaf
path padded with -1. Both return (accepted node indices starting with the root, number of accepted candidates).
"""

from __future__ import annotations

import torch


def _path_tokens(tree_tokens: torch.Tensor, paths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    valid = paths >= 0
    return tree_tokens[paths.clamp(min=0)], valid


def _best(paths: torch.Tensor, match: torch.Tensor, score: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    accept_lengths = torch.cumprod(match.to(torch.int64), dim=1).sum(dim=1)  # [L]
    longest = int(accept_lengths.max())
    if score is None or longest == 0:
        best = int(torch.argmax(accept_lengths))  # first of the longest: deterministic
    else:
        tied = torch.nonzero(accept_lengths == longest).flatten()
        best = int(tied[torch.argmax(score[tied, :longest].sum(dim=1))])
    return paths[best, : longest + 1], longest


def greedy_accept(
    tree_tokens: torch.Tensor, predictions: torch.Tensor, paths: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Longest path whose every candidate equals the base model's argmax at its parent (`predictions` [N]: the
    argmax at each node; leaves' entries are never read): the output is exactly plain greedy decoding's."""
    candidates, valid = _path_tokens(tree_tokens, paths)
    parent_predictions = predictions[paths[:, :-1].clamp(min=0)]  # [L, D]
    match = (candidates[:, 1:] == parent_predictions) & valid[:, 1:]
    return _best(paths, match)


def typical_accept(
    tree_tokens: torch.Tensor,
    logits: torch.Tensor,
    paths: torch.Tensor,
    temperature: float,
    posterior_threshold: float = 0.09,
    posterior_alpha: float = 0.3,
) -> tuple[torch.Tensor, int]:
    """Medusa's typical acceptance: accept candidate x after a node when p(x) > min(epsilon, delta * exp(-H(p))),
    p the base model's distribution at that node at `temperature`. Among the longest accepted paths the most
    likely one wins. As temperature -> 0, p becomes one-hot and this is greedy acceptance."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [N, V]
    entropy = torch.special.entr(probs).sum(dim=-1)  # [N]
    threshold = torch.clamp(posterior_alpha * torch.exp(-entropy), max=posterior_threshold)
    candidates, valid = _path_tokens(tree_tokens, paths)
    parents = paths[:, :-1].clamp(min=0)
    candidate_probs = probs[parents, candidates[:, 1:]]  # [L, D] p(candidate | its parent's prefix)
    match = (candidate_probs > threshold[parents]) & valid[:, 1:]
    return _best(paths, match, score=torch.log(candidate_probs.clamp(min=1e-30)))
