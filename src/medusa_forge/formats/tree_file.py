"""The decoding tree as a list of choices, and the file that stores it next to the heads
(medusa_choices.json; TGI and vLLM ignore it, TensorRT-LLM takes it on its command line).

A choice is a path of head top-k ranks: `[0]` is head 0's best guess, `[0, 1]` is head 1's second guess
placed after head 0's best guess, and so on. Trees are built from per-rank head accuracies: measured ones
(`medusa-forge eval`), or typical ones for the default tree used before anything is measured.
"""

from __future__ import annotations

import heapq
import json
from pathlib import Path

from medusa_forge.errors import UserError

Choices = list[list[int]]
TREE_FILE = "medusa_choices.json"  # next to config.json in a heads folder

# Per-rank accuracies used only to shape the shipped default trees (roughly what trained heads measure:
# head i's rank-k guess is right with probability PRIOR[i][k]). Data-driven trees come from `build_tree`.
PRIOR_ACCURACIES = [
    [0.60, 0.10, 0.05, 0.03, 0.02, 0.015, 0.01, 0.01, 0.008, 0.007],
    [0.45, 0.10, 0.05, 0.03, 0.02, 0.015, 0.01, 0.01, 0.008, 0.007],
    [0.35, 0.09, 0.05, 0.03, 0.02, 0.015, 0.01, 0.01, 0.008, 0.007],
    [0.28, 0.08, 0.04, 0.03, 0.02, 0.015, 0.01, 0.01, 0.008, 0.007],
    [0.22, 0.07, 0.04, 0.03, 0.02, 0.015, 0.01, 0.01, 0.008, 0.007],
]
DEFAULT_TREE_SIZES = (4, 8, 16, 32, 64)


def validate_choices(choices: Choices, num_heads: int | None = None) -> Choices:
    """Sorted, deduplicated choices; every prefix of a choice must itself be a choice."""
    if not isinstance(choices, list) or not choices:
        raise UserError("a tree needs at least one choice, e.g. [[0], [0, 0]]")
    paths = set()
    for choice in choices:
        if (
            not isinstance(choice, (list, tuple))
            or not choice
            or not all(isinstance(k, int) and k >= 0 for k in choice)
        ):
            raise UserError(f"tree choice {choice!r} is not a non-empty list of ranks >= 0")
        paths.add(tuple(choice))
    for path in paths:
        if len(path) > 1 and path[:-1] not in paths:
            raise UserError(f"tree choice {list(path)} has no parent {list(path[:-1])} in the tree")
        if num_heads is not None and len(path) > num_heads:
            raise UserError(f"tree choice {list(path)} is deeper than the {num_heads} heads")
    return [list(p) for p in sorted(paths, key=lambda p: (len(p), p))]


def build_tree(accuracies: list[list[float]], num_nodes: int) -> Choices:
    """The tree of `num_nodes` choices with the largest expected accepted length.

    accuracies[i][k] = probability that head i's rank-k guess is the right token. A node's value is the
    product along its path; a child never beats its parent (probabilities <= 1), so adding, one at a time,
    the frontier node with the largest value yields the best tree of every size (ties go to shallower,
    then lexicographically smaller paths, so the result is deterministic). Fewer nodes come back only when
    the heads and ranks run out.
    """
    if num_nodes < 1:
        raise UserError(f"a tree needs at least 1 node, got {num_nodes}")
    if not accuracies or not all(accuracies):
        raise UserError("build_tree needs at least one head with at least one measured rank accuracy")
    for row in accuracies:
        if any(not (0.0 <= p <= 1.0) for p in row):
            raise UserError(f"accuracies must be probabilities in [0, 1], got {row}")
    chosen: Choices = []
    # (-value, depth, path): every child of a chosen node is on the frontier, so measured accuracies need
    # not decrease with rank.
    frontier: list[tuple[float, int, tuple[int, ...]]] = []

    def add_children(path: tuple[int, ...], value: float) -> None:
        depth = len(path)
        if depth < len(accuracies):
            for rank, p in enumerate(accuracies[depth]):
                heapq.heappush(frontier, (-value * p, depth + 1, path + (rank,)))

    add_children((), 1.0)
    while frontier and len(chosen) < num_nodes:
        neg_value, _, path = heapq.heappop(frontier)
        chosen.append(list(path))
        add_children(path, -neg_value)
    return validate_choices(chosen)


def default_choices(num_nodes: int = 16, num_heads: int = 3) -> Choices:
    """A sensible tree before anything is measured: built from typical per-rank head accuracies."""
    return build_tree(PRIOR_ACCURACIES[:num_heads], num_nodes)


def save_tree(folder: str | Path, choices: Choices, **details) -> Path:
    """Store the chosen tree in a heads folder as a separate file, so the TGI layout stays untouched."""
    path = Path(folder, TREE_FILE)
    path.write_text(json.dumps({"medusa_choices": validate_choices(choices), **details}, indent=2) + "\n")
    return path


def load_tree(folder: str | Path) -> Choices | None:
    """The tree stored in a heads folder, or None when none was chosen yet."""
    data = _tree_file(folder)
    return None if data is None else data["medusa_choices"]


def load_tree_dtype(folder: str | Path) -> str | None:
    """The decoding dtype `eval --dtype auto` chose with the stored tree, or None (no tree, or chosen without)."""
    data = _tree_file(folder)
    return None if data is None else data.get("dtype")


def load_served_chain(folder: str | Path, longest: int) -> int | None:
    """The chain `eval` chose for the engines (vLLM's num_speculative_tokens) and stored with the tree, or None (no
    tree, or a kind whose chain is fixed); `longest`: the most the draft can draft."""
    data = _tree_file(folder)
    chain = None if data is None else data.get("speculative_tokens")
    if chain is not None and not (isinstance(chain, int) and 1 <= chain <= longest):
        raise UserError(
            f"{Path(folder, TREE_FILE)}: speculative_tokens {chain!r} is not a chain this draft drafts (1 to "
            f"{longest}); delete the file or rerun `medusa-forge eval`"
        )
    return chain


def _tree_file(folder: str | Path) -> dict | None:
    path = Path(folder, TREE_FILE)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        data["medusa_choices"] = validate_choices(data["medusa_choices"])
        if data.get("dtype") not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype {data['dtype']!r}")
        return data
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path} is not a valid tree file ({err}); delete it or rerun `medusa-forge eval`") from None
