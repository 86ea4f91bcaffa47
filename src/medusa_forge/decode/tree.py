"""Sparse candidate trees: the expected accepted length of a tree, and the tree a command-line value names. The
buffers one verification pass needs: `medusa_forge.drafts.drafter.TreeBuffers`; what a choice is, and the tree
file: `medusa_forge.formats.tree_file`.
"""

from __future__ import annotations

import json
from pathlib import Path

from medusa_forge.errors import UserError
from medusa_forge.formats.tree_file import (
    TREE_FILE,
    Choices,
    default_choices,
    load_tree,
    validate_choices,
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


def resolve_tree(spec: str | None, draft_folder: str | Path | None, max_depth: int) -> Choices:
    """Tree from a command-line value: a JSON file, `default-N`, or (None) the folder's stored tree, else default."""
    if spec is None:
        stored = load_tree(draft_folder) if draft_folder is not None else None
        return stored if stored is not None else default_choices(16, max_depth)
    if spec.startswith("default-"):
        try:
            size = int(spec.removeprefix("default-"))
        except ValueError:
            raise UserError(f"--tree {spec}: expected default-N with N a number of nodes, e.g. default-16") from None
        return default_choices(size, max_depth)
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
    return validate_choices(raw["medusa_choices"] if isinstance(raw, dict) else raw, max_depth)
