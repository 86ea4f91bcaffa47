"""Tree buffers against brute-force definitions, and the tree builder against exhaustive search."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from medusa_forge.decode.tree import expected_accept_length, resolve_tree
from medusa_forge.drafts.drafter import TreeBuffers
from medusa_forge.errors import UserError
from medusa_forge.formats.tree_file import (
    DEFAULT_TREE_SIZES,
    build_tree,
    default_choices,
    load_tree,
    save_tree,
    validate_choices,
)

TREES = {
    "chain": [[0], [0, 0], [0, 0, 0]],
    "wide": [[0], [1], [2], [3]],
    "mixed": [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 2], [2]],
    "unsorted": [[1, 0], [0, 0, 0], [1], [0], [0, 0]],
}


@pytest.mark.parametrize("name", TREES)
def test_buffers_match_brute_force(name):
    choices = TREES[name]
    tree = TreeBuffers.from_choices(choices)
    nodes = [()] + [tuple(c) for c in validate_choices(choices)]
    assert tree.size == len(nodes) == len({tuple(c) for c in choices}) + 1
    for i, path in enumerate(nodes):
        assert int(tree.depths[i]) == len(path)
        for j, other in enumerate(nodes):
            assert bool(tree.attention[i, j]) == (path[: len(other)] == other), (path, other)
    # Ancestors come first: the accepted path's KV entries can be kept in increasing order.
    for i, path in enumerate(nodes):
        for d in range(len(path)):
            assert nodes.index(path[:d]) < i
    # Candidate gathering: flat = [root, head0 rank0..k-1, head1 ...]; node -> head depth-1's rank path[-1].
    k = tree.topk
    assert k == max(max(c) for c in choices) + 1
    flat = torch.tensor([-1] + [100 * head + rank for head in range(tree.depth) for rank in range(k)])
    tokens = flat[tree.candidate_index]
    for i, path in enumerate(nodes):
        assert int(tokens[i]) == (-1 if not path else 100 * (len(path) - 1) + path[-1])
    # Internal nodes (the only ones whose logits decide acceptance): the root and every node with a child.
    internal = [i for i, p in enumerate(nodes) if not p or any(o[: len(p)] == p and o != p for o in nodes)]
    assert tree.internal.tolist() == internal
    # Paths: one per leaf, each the root followed by that leaf's ancestors in depth order.
    leaves = [p for p in nodes if not any(o[: len(p)] == p and o != p for o in nodes)]
    got = {tuple(nodes[int(n)] for n in row if n >= 0) for row in tree.paths}
    assert got == {tuple(leaf[:d] for d in range(len(leaf) + 1)) for leaf in leaves}


def test_attention_bias_is_additive_float():
    tree = TreeBuffers.from_choices(TREES["mixed"])
    bias = tree.attention_bias(7, torch.float32)
    assert bias.shape == (1, 1, tree.size, 7 + tree.size) and bias.dtype == torch.float32
    assert (bias[0, 0, :, :7] == 0).all()
    allowed = bias[0, 0, :, 7:] == 0
    assert torch.equal(allowed, tree.attention)
    assert (bias[0, 0, :, 7:][~tree.attention] == torch.finfo(torch.float32).min).all()


@pytest.mark.parametrize(
    "choices, message",
    [([], "at least one"), ([[0, 1]], "no parent"), ([[0], [-1]], "ranks"), ([[0], [0, 0]], "deeper")],
)
def test_bad_choices_are_user_errors(choices, message):
    with pytest.raises(UserError, match=message):
        TreeBuffers.from_choices(choices, num_heads=1)


def _all_nodes(num_heads: int, topk: int) -> list[tuple[int, ...]]:
    return [p for depth in range(1, num_heads + 1) for p in itertools.product(range(topk), repeat=depth)]


@pytest.mark.parametrize("seed", range(6))
def test_build_tree_is_optimal_by_enumeration(seed):
    rng = random.Random(seed)
    num_heads, topk = 3, 2
    # Rank accuracies need not decrease with rank; rows sum to <= 1 (exclusive events).
    accuracies = []
    for _ in range(num_heads):
        row = [rng.random() for _ in range(topk)]
        total = sum(row) / rng.uniform(0.3, 1.0)
        accuracies.append([p / total for p in row])
    nodes = _all_nodes(num_heads, topk)
    for size in range(1, 7):
        best = 0.0
        for subset in itertools.combinations(nodes, size):
            chosen = set(subset)
            if all(p[:-1] in chosen for p in chosen if len(p) > 1):
                best = max(best, expected_accept_length([list(p) for p in subset], accuracies))
        tree = build_tree(accuracies, size)
        assert len(tree) == size
        assert expected_accept_length(tree, accuracies) == pytest.approx(best, abs=1e-12)


def test_build_tree_prefers_depth_when_heads_are_accurate_and_width_when_not():
    accurate = [[0.9, 0.05], [0.9, 0.05], [0.9, 0.05]]
    assert build_tree(accurate, 3) == [[0], [0, 0], [0, 0, 0]]
    unsure = [[0.3, 0.25, 0.2], [0.3, 0.25, 0.2], [0.3, 0.25, 0.2]]
    assert build_tree(unsure, 3) == [[0], [1], [2]]
    assert len(build_tree([[0.5]], 10)) == 1  # runs out of heads and ranks


def test_expected_accept_length_by_hand():
    accuracies = [[0.5, 0.2], [0.4]]
    # 1 + p([0]) + p([1]) + p([0,0]) = 1 + 0.5 + 0.2 + 0.5*0.4
    assert expected_accept_length([[0], [1], [0, 0]], accuracies) == pytest.approx(1.9)


def test_default_trees_have_the_requested_sizes():
    for size in DEFAULT_TREE_SIZES:
        choices = default_choices(size, 3)
        assert len(choices) == size and max(len(c) for c in choices) <= 3
        TreeBuffers.from_choices(choices, num_heads=3)


def test_tree_file_round_trip_and_resolution(tmp_path):
    assert load_tree(tmp_path) is None
    assert resolve_tree(None, tmp_path, 3) == default_choices(16, 3)
    save_tree(tmp_path, TREES["unsorted"], expected_accept_length=1.7)
    assert load_tree(tmp_path) == validate_choices(TREES["unsorted"])
    assert resolve_tree(None, tmp_path, 3) == validate_choices(TREES["unsorted"])
    assert resolve_tree("default-8", tmp_path, 3) == default_choices(8, 3)
    plain = tmp_path / "tree.json"
    plain.write_text(json.dumps([[0], [0, 0]]))
    assert resolve_tree(str(plain), None, 3) == [[0], [0, 0]]
    with pytest.raises(UserError, match="default-N"):
        resolve_tree(str(tmp_path / "missing.json"), None, 3)
    with pytest.raises(UserError, match="default-N"):
        resolve_tree("default-x", None, 3)
    (tmp_path / "medusa_choices.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid tree file"):
        load_tree(tmp_path)
