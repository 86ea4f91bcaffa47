"""Sparse candidate trees: from a list of choices to the buffers one verification pass needs, the expected
accepted length of a tree, and the tree a command-line value names.

Node 0 is the root: the token the base model itself chose. Nodes are ordered by depth, then path, so a parent
always comes before its children; that ordering lets the accepted path's KV entries be kept with one
`index_select`. What a choice is, and the tree file: `medusa_forge.formats.tree_file`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from medusa_forge.errors import UserError
from medusa_forge.formats.tree_file import (
    PRIOR_ACCURACIES,
    TREE_FILE,
    Choices,
    default_choices,
    load_tree,
    validate_choices,
)


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


def expected_accept_length(choices: Choices, accuracies: list[list[float]]) -> float:
    """Expected tokens per step under independent heads: 1 (the base token) + sum over nodes of the
    probability that every guess on its path is right. Siblings are exclusive events, so the sum is exact
    for the longest accepted path given those per-rank probabilities."""
    total = 1.0
    for path in choices:
        p = 1.0
        for depth, rank in enumerate(path):
            row = accuracies[depth] if depth < len(accuracies) else []
            p *= row[rank] if rank < len(row) else 0.0
        total += p
    return total


# An EAGLE-3 draft can fill a tree of any depth; without a stored tree, trees are built this deep at most.
EAGLE3_TREE_DEPTH = len(PRIOR_ACCURACIES)


def resolve_tree(spec: str | None, heads_folder: str | Path | None, num_heads: int) -> Choices:
    """Tree from a command-line value: a JSON file, `default-N`, or (None) the folder's stored tree, else default."""
    if spec is None:
        stored = load_tree(heads_folder) if heads_folder is not None else None
        return stored if stored is not None else default_choices(16, num_heads)
    if spec.startswith("default-"):
        try:
            size = int(spec.removeprefix("default-"))
        except ValueError:
            raise UserError(f"--tree {spec}: expected default-N with N a number of nodes, e.g. default-16") from None
        return default_choices(size, num_heads)
    path = Path(spec)
    if path.is_dir():
        stored = load_tree(path)
        if stored is None:
            raise UserError(f"--tree {spec}: no {TREE_FILE} in that folder")
        return stored
    if not path.is_file():
        raise UserError(f"--tree {spec}: not a file, a folder with {TREE_FILE}, or default-N")
    try:
        raw = json.loads(path.read_text())
    except ValueError as err:
        raise UserError(f"--tree {spec}: not valid JSON ({err})") from None
    return validate_choices(raw["medusa_choices"] if isinstance(raw, dict) else raw, num_heads)
