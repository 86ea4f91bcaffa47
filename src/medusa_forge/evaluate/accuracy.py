"""Teacher-forced draft accuracy: at every labelled position, the rank of the true token under the base lm_head and
under each Medusa head or each EAGLE-3 draft step, on the held-out reference answers or on the model's own greedy
answers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from medusa_forge.data.tokenize import IGNORE_INDEX, tokenize_conversation
from medusa_forge.eagle3 import Eagle3Draft, UnrolledAttention, causal_bias, draft_vocab_ids, target_features
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


def _count_ranks(logits: torch.Tensor, targets: torch.Tensor, counts: list[int]) -> None:
    """Add to `counts[k]` how many rows of `logits` rank their `targets` entry k-th (k < RANKS)."""
    ranks = (logits > logits.gather(1, targets[:, None])).sum(dim=1)
    for rank, n in zip(*torch.unique(ranks[ranks < RANKS], return_counts=True), strict=True):
        counts[int(rank)] += int(n)


@torch.no_grad()
def score_eagle3_samples(
    base, draft: Eagle3Draft, samples, depth: int, progress: bool = True, desc: str = "draft accuracy"
) -> list[HeadAccuracy]:
    """Rank of the true token under the base lm_head (predicts t+1) and under each EAGLE-3 draft step j = 1..depth
    (predicts t+1+j), at every position whose target is labelled. Step j sees the true tokens up to t+j and its own
    earlier states, as a tree path whose tokens were all right does in decoding: the training-time-test unroll
    (first step: target features at t with token t+1 at position t; step j: step j-1's state with token t+j at
    position t+j-1, attending to the first step's keys up to t and its own chain's). The draft ranks its own
    vocabulary; a target outside it is a miss, as the decoder cannot propose it."""
    names = ["base"] + [f"step {j}" for j in range(1, depth + 1)]
    counts = [[0] * RANKS for _ in names]
    totals = [0] * len(names)
    device = next(base.parameters()).device
    draft_device = next(draft.parameters()).device
    dtype = draft.fc.weight.dtype
    ids_in_draft = draft_vocab_ids(draft.d2t).to(draft_device)
    to_draft = torch.full((draft.config.vocab_size,), -1, dtype=torch.long, device=draft_device)
    to_draft[ids_in_draft] = torch.arange(len(ids_in_draft), device=draft_device)
    embedding = base.get_input_embeddings()
    for input_ids, label_ids in tqdm(samples, desc=desc, disable=not progress, leave=False):
        ids = torch.tensor(input_ids, device=device)
        labels = torch.tensor(label_ids, device=draft_device)
        length = len(ids)
        if length < 2 or (labels != IGNORE_INDEX).sum() == 0:
            continue
        out = base(ids[None], output_hidden_states=True)
        mask = labels[1:] != IGNORE_INDEX
        if mask.any():
            totals[0] += int(mask.sum())
            _count_ranks(out.logits[0, :-1][mask.to(device)], ids[1:][mask.to(device)], counts[0])
        ids = ids.to(draft_device)
        embeds = embedding(ids.to(embedding.weight.device)).to(device=draft_device, dtype=dtype)[None]
        feature = draft.combine(target_features(out.hidden_states).to(device=draft_device, dtype=dtype))
        attention = UnrolledAttention(causal_bias(torch.ones(1, length, device=draft_device), dtype))
        positions = torch.arange(length, device=draft_device)[None]
        for j in range(1, depth + 1):
            # index t reads token t+j (padding past the end: those indices are never scored) and predicts t+1+j
            tokens = torch.cat([embeds[:, j:], embeds.new_zeros(1, min(j, length), embeds.shape[-1])], dim=1)
            step = draft.layer(tokens[:, :length], feature, positions + j - 1, attention)
            attention = attention.after(step.keys, step.values)
            feature = step.state
            scored = length - 1 - j  # indices t with t+1+j inside the sequence
            if scored <= 0:
                break
            mask = labels[1 + j :] != IGNORE_INDEX
            if not mask.any():
                continue
            targets = to_draft[ids[1 + j :][mask]]
            totals[j] += len(targets)
            inside = targets >= 0  # a target outside the draft vocabulary is a miss
            logits = draft.logits(feature[0, :scored][mask][inside]).float()
            _count_ranks(logits, targets[inside], counts[j])
    if totals[0] == 0:
        raise UserError("no sample had a labelled token to score; check --data")
    return [HeadAccuracy(name, total, count) for name, total, count in zip(names, totals, counts, strict=True)]


def conversation_samples(tokenizer, conversations, max_length: int = 1024) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each conversation that tokenizes (labels: the assistant tokens)."""
    samples = []
    for conversation in conversations:
        try:
            sample = tokenize_conversation(tokenizer, conversation.messages, max_length)
        except ValueError:
            continue
        samples.append((sample["input_ids"], sample["labels"]))
    return samples


def measure_accuracy(
    model, tokenizer, conversations, max_length: int = 1024, progress: bool = True, draft_vocab: int | None = None
) -> list[HeadAccuracy]:
    """Teacher-forced accuracy on the conversations' assistant tokens (the reference answers)."""
    return score_samples(model, conversation_samples(tokenizer, conversations, max_length), progress, draft_vocab)


def own_answer_samples(
    base, prompts: list[list[int]], max_new_tokens: int, eos: set[int]
) -> list[tuple[list[int], list[int]]]:
    """(prompt + greedy answer, labels on the answer) per prompt: the text greedy decoding must accept."""
    from medusa_forge.decode.generation import greedy_generate

    samples = []
    for prompt in tqdm(prompts, desc="greedy answers for calibration", leave=False):
        answer = greedy_generate(base, prompt, max_new_tokens, eos)
        samples.append((prompt + answer, [IGNORE_INDEX] * len(prompt) + answer))
    return samples


def measure_self_accuracy(
    model, prompts: list[list[int]], max_new_tokens: int, eos: set[int], draft_vocab: int | None = None
) -> list[HeadAccuracy]:
    """Teacher-forced accuracy on the model's own greedy answers to `prompts`: what greedy decoding accepts."""
    samples = own_answer_samples(model.base, prompts, max_new_tokens, eos)
    return score_samples(model, samples, draft_vocab=draft_vocab, desc="head accuracy (own answers)")
