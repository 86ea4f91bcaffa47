"""What every kind's drafter is to the decoder: the `Drafter` interface it implements and the `TreeBuffers` of the
tree it fills (the buffers one verification step needs too).

Verification (`decode/verification.py`) never sees a drafter: it checks the tokens a drafter proposed. A drafter
keeps its own state between steps (returned by `start`/`advance`, handed back to `propose`), so one decoder serves
any number of generations. Medusa heads are one drafter (`medusa_drafter.py`); a draft model that conditions on the
accepted tokens and on several layers of the base model (EAGLE-3, `eagle3_drafter.py`) is another: it asks for those
layers through `feature_layers` and keeps its own KV cache in its state.

Trees: node 0 is the root, the token the base model itself chose. Nodes are ordered by depth, then path, so a
parent always comes before its children; that ordering lets the accepted path's KV entries be kept with one
`index_select`. What a choice is, and the tree file: `medusa_forge.formats.tree_file`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch

from medusa_forge.formats.tree_file import Choices, validate_choices


@dataclass
class TreeBuffers:
    """Everything one verification step needs, precomputed once per tree.

    attention: [N, N] bool, node i sees node j iff j is i's ancestor or i itself (node 0 = root).
    depths: [N] position offset of each node past the prefix (root 0).
    candidate_index: [N] index into the flat candidate vector [root token, head 0 top-k, head 1 top-k, ...].
    paths: [L, D+1] node indices of every root-to-leaf path, padded with -1.
    internal: node indices that have children (the root always): only these need the base model's logits to
        decide acceptance; a leaf's logits matter only when the path ends there.
    children: per node, its children's node indices in rank order (what sampling walks).
    """

    choices: Choices
    topk: int
    attention: torch.Tensor
    depths: torch.Tensor
    candidate_index: torch.Tensor
    paths: torch.Tensor
    internal: torch.Tensor
    children: tuple[tuple[int, ...], ...]

    @property
    def size(self) -> int:
        return self.attention.shape[0]

    @property
    def depth(self) -> int:
        return self.paths.shape[1] - 1

    @classmethod
    def from_choices(cls, choices: Choices, num_heads: int | None = None) -> TreeBuffers:
        choices = validate_choices(choices, num_heads)
        index_of = {(): 0}
        for i, path in enumerate(choices, start=1):
            index_of[tuple(path)] = i
        n = len(choices) + 1
        topk = max(max(path) for path in choices) + 1
        attention = torch.zeros(n, n, dtype=torch.bool)
        depths = torch.zeros(n, dtype=torch.long)
        candidate_index = torch.zeros(n, dtype=torch.long)
        for path, i in index_of.items():
            depths[i] = len(path)
            if path:
                candidate_index[i] = 1 + (len(path) - 1) * topk + path[-1]
            for d in range(len(path) + 1):
                attention[i, index_of[path[:d]]] = True
        parents = {path[:-1] for path in index_of if path}
        leaves = [path for path in index_of if path not in parents]
        max_depth = max(len(path) for path in index_of)
        paths = torch.full((len(leaves), max_depth + 1), -1, dtype=torch.long)
        for row, leaf in enumerate(sorted(leaves, key=lambda p: (len(p), p))):
            for d in range(len(leaf) + 1):
                paths[row, d] = index_of[leaf[:d]]
        internal = torch.tensor(sorted({0} | {index_of[path[:-1]] for path in index_of if path}), dtype=torch.long)
        children = tuple(
            tuple(index_of[child] for child in index_of if child[:-1] == path and child) for path in index_of
        )  # index_of is in node order, so children come in rank order
        return cls(choices, topk, attention, depths, candidate_index, paths, internal, children)

    def attention_bias(
        self, prefix_length: int, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """[1, 1, N, prefix_length + N] additive float mask: 0 where attention is allowed, dtype-min elsewhere.

        A float mask, not a bool one: with eager attention transformers 5.x would add a bool mask as 0/1.
        """
        n = self.size
        bias = torch.zeros(1, 1, n, prefix_length + n, dtype=dtype, device=device)
        bias[0, 0, :, prefix_length:].masked_fill_(~self.attention.to(device), torch.finfo(dtype).min)
        return bias

    def to(self, device: torch.device | str) -> TreeBuffers:
        return TreeBuffers(
            self.choices,
            self.topk,
            self.attention.to(device),
            self.depths.to(device),
            self.candidate_index.to(device),
            self.paths.to(device),
            self.internal.to(device),
            self.children,
        )


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

    def check_tree(self, tree: TreeBuffers) -> None:
        """Raise a UserError for a tree it cannot fill: called when a decoder is built, not mid-generation."""
        ...

    def propose(self, state: DraftState, root: int, tree: TreeBuffers) -> torch.Tensor:
        """The tree's tokens [N] in node order, node 0 being `root` (the base model's next token)."""
        ...

    def advance(self, state: DraftState, nodes: torch.Tensor, tokens: torch.Tensor, hidden: torch.Tensor) -> DraftState:
        """The state after verification accepted `nodes` [A] (root first) of the last proposed tree: `hidden`
        [A, F] at those nodes, `tokens` [A] the accepted candidates then the base model's next token."""
        ...
