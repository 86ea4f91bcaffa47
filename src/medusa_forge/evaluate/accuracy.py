"""Teacher-forced head accuracy: at every labelled position, the rank of the true token under the base lm_head and
under each head, on the held-out reference answers or on the model's own greedy answers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from medusa_forge.data.tokenize import IGNORE_INDEX, tokenize_conversation
from medusa_forge.errors import UserError
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


@torch.no_grad()
def score_samples(
    model, samples, progress: bool = True, draft_vocab: int | None = None, desc: str = "head accuracy"
) -> list[HeadAccuracy]:
    """Rank of the true token under the base lm_head (predicts t+1) and each head i (predicts t+2+i), at every
    position whose target is labelled (not IGNORE_INDEX). `samples`: (input_ids, labels) pairs. With
    `draft_vocab` the heads rank only ids below it (a target outside is a miss), as the decoder then proposes."""
    num_heads = len(model.heads)
    names = ["base"] + [f"head {i}" for i in range(num_heads)]
    counts = [[0] * RANKS for _ in names]
    totals = [0] * len(names)
    device = next(model.base.parameters()).device
    lm_head = model.base.get_output_embeddings()
    heads_dtype = next(model.heads.parameters()).dtype
    for input_ids, label_ids in tqdm(samples, desc=desc, disable=not progress, leave=False):
        ids = torch.tensor(input_ids, device=device)
        labels = torch.tensor(label_ids, device=device)
        if len(ids) < 2 or (labels != IGNORE_INDEX).sum() == 0:
            continue
        hidden = model.hidden_states(ids[None])[0]
        for which in range(len(names)):
            shift = which + 1  # base: t+1, head i: t+2+i
            if len(ids) <= shift:
                continue
            mask = labels[shift:] != IGNORE_INDEX
            if not mask.any():
                continue
            rows, targets = hidden[: len(ids) - shift][mask], ids[shift:][mask]
            logits = lm_head(rows) if which == 0 else model.heads[which - 1](rows.to(heads_dtype))
            target_logit = logits.gather(1, targets[:, None])
            if which and draft_vocab is not None:
                logits = logits[:, :draft_vocab]
            ranks = (logits > target_logit).sum(dim=1)
            if which and draft_vocab is not None:
                ranks[targets >= draft_vocab] = RANKS  # the decoder could not propose it
            totals[which] += len(targets)
            for rank, n in zip(*torch.unique(ranks[ranks < RANKS], return_counts=True), strict=True):
                counts[which][int(rank)] += int(n)
    if totals[0] == 0:
        raise UserError("no sample had a labelled token to score; check --data")
    return [HeadAccuracy(name, total, count) for name, total, count in zip(names, totals, counts, strict=True)]


def measure_accuracy(
    model, tokenizer, conversations, max_length: int = 1024, progress: bool = True, draft_vocab: int | None = None
) -> list[HeadAccuracy]:
    """Teacher-forced accuracy on the conversations' assistant tokens (the reference answers)."""
    samples = []
    for conversation in conversations:
        try:
            sample = tokenize_conversation(tokenizer, conversation.messages, max_length)
        except ValueError:
            continue
        samples.append((sample["input_ids"], sample["labels"]))
    return score_samples(model, samples, progress, draft_vocab)


def measure_self_accuracy(
    model, prompts: list[list[int]], max_new_tokens: int, eos: set[int], draft_vocab: int | None = None
) -> list[HeadAccuracy]:
    """Teacher-forced accuracy on the model's own greedy answers to `prompts`: what greedy decoding accepts."""
    from medusa_forge.decode.generation import greedy_generate

    samples = []
    for prompt in tqdm(prompts, desc="greedy answers for calibration", leave=False):
        answer = greedy_generate(model.base, prompt, max_new_tokens, eos)
        samples.append((prompt + answer, [IGNORE_INDEX] * len(prompt) + answer))
    return score_samples(model, samples, draft_vocab=draft_vocab, desc="head accuracy (own answers)")
