"""Teacher-forced accuracy counts, what every kind's scorer (`DecodingDraft.accuracy`) returns: per predictor (the
base lm_head, then each of the draft's), how often the true token was its rank-k guess."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medusa_forge.results import PredictorAccuracy

RANKS = 10  # rank accuracies kept per head: enough for trees up to top-10 per head


@dataclass
class HeadAccuracy:
    """Teacher-forced accuracy of one predictor (the base lm_head or a head) on assistant tokens."""

    name: str
    tokens: int
    rank_counts: list[int]  # how often the target was the rank-k guess, k < RANKS

    @property
    def rank_accuracy(self) -> list[float]:
        return [c / self.tokens if self.tokens else 0.0 for c in self.rank_counts]

    def top(self, k: int) -> float:
        return sum(self.rank_counts[:k]) / self.tokens if self.tokens else 0.0

    def to_result(self) -> PredictorAccuracy:
        return PredictorAccuracy(self.name, self.tokens, self.top(1), self.top(5), self.rank_accuracy)


def count_ranks(logits: torch.Tensor, targets: torch.Tensor, counts: list[int]) -> None:
    """Add to `counts[k]` how many rows of `logits` rank their `targets` entry k-th (k < RANKS)."""
    ranks = (logits > logits.gather(1, targets[:, None])).sum(dim=1)
    for rank, n in zip(*torch.unique(ranks[ranks < RANKS], return_counts=True), strict=True):
        counts[int(rank)] += int(n)
