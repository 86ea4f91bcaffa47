"""Drafters: what proposes the candidate tokens of a tree, behind the one interface the decoder calls.

Verification (`verification.py`) never sees a drafter: it checks the tokens a drafter proposed. A drafter keeps
its own state between steps (returned by `start`/`advance`, handed back to `propose`), so one decoder serves any
number of generations. Medusa heads are one drafter; a draft model that conditions on the accepted tokens and on
several layers of the base model (EAGLE-3, `eagle3_drafter.py`) is another: it asks for those layers through
`feature_layers` and keeps its own KV cache in its state.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

import torch

from medusa_forge.decode.tree import TreeBuffers
from medusa_forge.errors import UserError
from medusa_forge.heads import MedusaModel

DraftState = TypeVar("DraftState")


class Drafter(Protocol[DraftState]):
    """Proposes a tree's tokens from the base model's hidden states and the accepted tokens.

    In `start` and `advance`, row i of `hidden` is the base model's state at a token it accepted and `tokens[i]`
    is the token that follows it; a row holds the final hidden state or, with `feature_layers`, those layers'
    hidden states concatenated.
    """

    max_depth: int | None  # the deepest tree it can fill; None: any
    feature_layers: tuple[int, ...]  # the base model's hidden states it reads (0: embeddings); (): the final one

    def start(self, tokens: torch.Tensor, hidden: torch.Tensor) -> DraftState:
        """The state after the prompt: `hidden` [P, F] over the prompt, `tokens` [P] the prompt shifted by one
        and the first generated token."""
        ...

    def propose(self, state: DraftState, root: int, tree: TreeBuffers) -> torch.Tensor:
        """The tree's tokens [N] in node order, node 0 being `root` (the base model's next token)."""
        ...

    def advance(self, state: DraftState, nodes: torch.Tensor, tokens: torch.Tensor, hidden: torch.Tensor) -> DraftState:
        """The state after verification accepted `nodes` [A] (root first) of the last proposed tree: `hidden`
        [A, F] at those nodes, `tokens` [A] the accepted candidates then the base model's next token."""
        ...


def trained_draft_vocab(model: MedusaModel) -> int | None:
    """The draft vocabulary the heads were trained on (config draft_vocab_size), None for the whole vocabulary."""
    return getattr(getattr(model.heads, "config", None), "draft_vocab_size", None)


class MedusaDrafter:
    """Medusa heads: head i's top-k at the last accepted hidden state fill the tree's depth i + 1 (a tree choice
    is a path of head ranks). The state is the heads' logits [K, V'] at that hidden state."""

    feature_layers: tuple[int, ...] = ()

    def __init__(self, model: MedusaModel, draft_vocab: int | None = None) -> None:
        """`draft_vocab=N`: the heads propose only token ids < N (vLLM's `truncated_vocab_size`). Their vocabulary
        projections, as large as the base lm_head each, then cost N/V as much; verification stays exact.
        Default: the heads' own `draft_vocab_size` (training with a draft vocabulary), else the whole vocabulary."""
        self.heads = model.heads
        self.max_depth = len(model.heads)
        self.dtype = next(model.heads.parameters()).dtype
        self.draft_projections = None
        if draft_vocab is None:  # heads trained on a draft vocabulary propose from it unless told otherwise
            draft_vocab = trained_draft_vocab(model)
        if draft_vocab is not None:
            vocab = model.base.get_output_embeddings().weight.shape[0]
            if not 0 < draft_vocab <= vocab:
                raise UserError(f"--draft-vocab {draft_vocab}: expected 1..{vocab} (the vocabulary size)")
            self.draft_projections = [head[-1].weight[:draft_vocab] for head in model.heads]

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[K, V'] every head's logits at one hidden state [H], over the draft vocabulary if one is set."""
        hidden = hidden.to(self.dtype)
        if self.draft_projections is None:
            return self.heads(hidden)
        return torch.stack(
            [head[:-1](hidden) @ weight.T for head, weight in zip(self.heads, self.draft_projections, strict=True)]
        )

    def start(self, tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.head_logits(hidden[-1])

    def propose(self, head_logits: torch.Tensor, root: int, tree: TreeBuffers) -> torch.Tensor:
        top = torch.topk(head_logits[: tree.depth], tree.topk, dim=-1).indices  # [D, topk]
        flat = torch.cat([top.new_tensor([root]), top.flatten()])
        return flat[tree.candidate_index]

    def advance(
        self, head_logits: torch.Tensor, nodes: torch.Tensor, tokens: torch.Tensor, hidden: torch.Tensor
    ) -> torch.Tensor:
        return self.head_logits(hidden[-1])
