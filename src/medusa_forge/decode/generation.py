"""Speculative generation with a tree: per step a drafter proposes a tree of candidate tokens, the base model
verifies it in one forward pass, and the longest acceptable path is kept (greedy: token-identical to plain greedy
decoding). `SpeculativeDecoder.step` is that step, the one function `stream`, the latency measurement and the
benchmark all run. Batch size 1 only: each sequence accepts a different number of tokens per step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from medusa_forge.decode.tree_support import check_tree_support
from medusa_forge.decode.verification import Sampling, TreeVerifier, keep_cache_entries
from medusa_forge.drafts.drafter import Drafter, TreeBuffers
from medusa_forge.errors import UserError
from medusa_forge.formats.tree_file import Choices
from medusa_forge.modeling import cache_kwarg


@dataclass
class DecodeResult:
    """Generated tokens (prompt excluded) and how they were produced."""

    tokens: list[int]
    accept_lengths: list[int] = field(default_factory=list)  # tokens added by each verification pass
    # Draft tokens each verification pass accepted, before the cut at max_new_tokens or an end-of-sequence token:
    # what vLLM's acceptance counters count.
    accepted_drafts: list[int] = field(default_factory=list)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.accept_lengths)

    @property
    def mean_accept_length(self) -> float:
        """Tokens per verification pass, the base token included (plain decoding = 1.0)."""
        return sum(self.accept_lengths) / len(self.accept_lengths) if self.accept_lengths else 0.0


@dataclass
class DecodeState:
    """Where a generation stands between steps."""

    cache: DynamicCache  # the base model's KV entries of the prompt and the accepted tokens before `root`
    prefix_length: int  # entries in `cache`
    root: int  # the base model's next token, not in the cache yet: the root of the next tree
    draft: Any  # the drafter's own state


STEP_PARTS = ("propose", "verify", "accept", "prune", "draft")  # what `step` reports to its `mark` hook, in order


def _no_mark(part: str) -> None:
    pass


class SpeculativeDecoder:
    """Generates with a base model, a drafter and one tree; reusable across prompts (the tree buffers are built
    once)."""

    def __init__(self, base: PreTrainedModel, drafter: Drafter, choices: Choices, check: bool = True) -> None:
        self.base = base
        self.drafter = drafter
        self.verifier = TreeVerifier(base, TreeBuffers.from_choices(choices, drafter.max_depth), drafter.feature_layers)
        self.tree = self.verifier.tree
        self.device = self.verifier.device
        drafter.check_tree(self.tree)
        if check:
            check_tree_support(base)

    def _check_length(self, prompt_length: int, max_new_tokens: int) -> None:
        config = self.base.config.get_text_config(decoder=True)
        total = prompt_length + max_new_tokens + self.tree.depth
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None) or []
        if window and (not layer_types or any(t != "full_attention" for t in layer_types)) and total > window:
            raise UserError(
                f"{type(self.base).__name__} uses sliding-window attention ({window} tokens); Medusa decoding here "
                f"attends to the full prefix, so prompt + max new tokens must stay within {window - self.tree.depth}"
            )
        limit = getattr(config, "max_position_embeddings", None)
        if limit and total > limit:
            raise UserError(f"prompt ({prompt_length}) + max new tokens exceeds the model's {limit} positions")

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, sampling: Sampling | None = None) -> DecodeState:
        """Run the prompt `ids` [P] through the base model: its next token becomes the first tree's root."""
        cache = DynamicCache()
        hidden, features = self.verifier.prefill(ids, cache)
        root = (sampling or Sampling()).pick(self.verifier.lm_head(hidden[-1]))
        draft = self.drafter.start(torch.cat([ids[1:], ids.new_tensor([root])]), features)
        return DecodeState(cache, len(ids), root, draft)

    @torch.no_grad()
    def step(
        self, state: DecodeState, sampling: Sampling | None = None, mark: Callable[[str], None] = _no_mark
    ) -> list[int]:
        """One speculative step (gpt-fast's `speculative_decode`): the drafter proposes a tree after `state.root`,
        the base model verifies it in one forward pass, and `state` moves past the accepted path. Returns the new
        tokens: the accepted candidates, then the base model's next token (the new root, not yet in the cache).
        `mark(part)` is called as each of STEP_PARTS ends, for a profiler."""
        sampling = sampling or Sampling()
        tree_tokens = self.drafter.propose(state.draft, state.root, self.tree)
        mark("propose")
        hidden, features = self.verifier.verify(tree_tokens, state.cache, state.prefix_length)
        mark("verify")
        nodes, root = self.verifier.accept(tree_tokens, hidden, sampling)
        mark("accept")
        keep_cache_entries(state.cache, state.prefix_length, nodes)
        mark("prune")
        new = tree_tokens[nodes[1:]].tolist() + [root]
        state.draft = self.drafter.advance(state.draft, nodes, tree_tokens.new_tensor(new), features[nodes])
        mark("draft")
        state.prefix_length += len(nodes)
        state.root = root
        return new

    # -- generation ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def stream(
        self,
        input_ids: list[int] | torch.Tensor,
        max_new_tokens: int,
        eos_token_ids: set[int] | list[int] | int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        result: DecodeResult | None = None,
    ) -> Iterator[list[int]]:
        """Yield the new tokens of each step (the first yield is the prefill's token). Stops after an EOS token
        (which is yielded) or max_new_tokens. Greedy at temperature 0, else sampling (see `Sampling`). Pass
        `result` to collect accept lengths and timings."""
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device).flatten()
        if ids.numel() == 0:
            raise UserError("the prompt is empty: Medusa decoding needs at least one prompt token")
        if max_new_tokens < 1:
            return
        eos = {eos_token_ids} if isinstance(eos_token_ids, int) else set(eos_token_ids or ())
        self._check_length(ids.numel(), max_new_tokens)
        result = result if result is not None else DecodeResult([])
        sampling = Sampling(temperature, top_p)
        if temperature > 0:
            sampling.generator = torch.Generator(device=self.device)
            sampling.generator.manual_seed(seed if seed is not None else torch.seed())

        start = time.perf_counter()
        state = self.prefill(ids, sampling)
        result.prefill_seconds += time.perf_counter() - start
        result.tokens.append(state.root)
        yield [state.root]
        produced = 1
        if state.root in eos or produced >= max_new_tokens:
            return

        while True:
            start = time.perf_counter()
            new = self.step(state, sampling)
            result.accepted_drafts.append(len(new) - 1)
            new = new[: max_new_tokens - produced]
            stop = produced + len(new) >= max_new_tokens
            for i, token in enumerate(new):
                if token in eos:
                    new, stop = new[: i + 1], True
                    break
            produced += len(new)
            result.tokens.extend(new)
            result.accept_lengths.append(len(new))
            result.decode_seconds += time.perf_counter() - start
            yield new
            if stop:
                return

    def generate(self, input_ids: list[int] | torch.Tensor, max_new_tokens: int, **kwargs) -> DecodeResult:
        """Run `stream` to the end; see it for the arguments."""
        result = DecodeResult([])
        for _ in self.stream(input_ids, max_new_tokens, result=result, **kwargs):
            pass
        return result


@torch.no_grad()
def greedy_generate(
    base: PreTrainedModel,
    input_ids: list[int] | torch.Tensor,
    max_new_tokens: int,
    eos_token_ids: set[int] | list[int] | int | None = None,
) -> list[int]:
    """Plain greedy decoding with a KV cache, one token per forward pass: the reference Medusa must equal."""
    device = next(base.parameters()).device
    eos = {eos_token_ids} if isinstance(eos_token_ids, int) else set(eos_token_ids or ())
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device).flatten()[None]
    cache = DynamicCache()
    tokens: list[int] = []
    kwarg = cache_kwarg(base)
    while len(tokens) < max_new_tokens:
        out = base(input_ids=ids, use_cache=True, **{kwarg: cache})  # extends `cache` in place
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
        if token in eos:
            break
        ids = torch.tensor([[token]], device=device)
    return tokens
