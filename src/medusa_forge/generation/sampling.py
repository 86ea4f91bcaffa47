"""One token from a row of logits: the argmax at temperature 0, else a draw at the temperature among the most
likely tokens that cover `top_p` of the distribution. Every sampler of ours draws through here (continuous
batching, the speculative decoder's walk down a tree), so a seeded generator gives the same tokens in each."""

from __future__ import annotations

import torch

from medusa_forge.generation.generator import GREEDY_BELOW

# The seeds torch's generators take (manual_seed): serve's request field and generate's --seed check against these.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


def pick_token(
    logits: torch.Tensor, temperature: float, top_p: float = 1.0, generator: torch.Generator | None = None
) -> int:
    if temperature < GREEDY_BELOW:  # dividing by a tinier temperature overflows: greedy, as vLLM does
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        ranked, order = probs.sort(descending=True)
        ranked[ranked.cumsum(-1) - ranked > top_p] = 0.0  # the most likely token always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, ranked)
    return int(torch.multinomial(probs, 1, generator=generator))
