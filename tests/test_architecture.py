"""Data flows one way: data -> distill -> drafts -> train -> decode/evaluate -> export/serve -> pipeline. No module
imports one later in that order (function-local imports included); shared foundations come before all of them."""

from __future__ import annotations

import ast
from pathlib import Path

import medusa_forge

PACKAGE = Path(medusa_forge.__file__).parent
# Module (or package) -> its place in the flow. The longest matching prefix decides.
ORDER = {
    # foundations: user errors, the embedded defaults, loading models, what a draft is and how it is stored,
    # the result files, the engine facts, which base a draft pairs with
    "errors": 0, "defaults": 0, "modeling": 0, "engine_versions": 0, "engine_commands": 0,
    "tokenizer_files": 0, "grouped_attention": 0, "file_digests": 0,
    "formats": 0, "results": 0, "flags": 0, "outputs": 0, "pairing": 0,
    "data": 1,
    "generation": 2,  # the in-process generation engines (distill, serve and decode use them)
    "distill": 3,
    "drafts": 4,  # the registry of draft kinds: everything after it asks a kind instead of branching on its name
    "train": 5, "model_card": 5,
    "decode": 6, "evaluate": 6,
    "export": 7, "hub": 7, "serve": 7,
    "pipeline": 8,
    "cli": 9,
}  # fmt: skip


def place(module: str) -> tuple[str, int]:
    parts = module.removeprefix("medusa_forge.").split(".")
    if parts[-1] == "__main__":  # an entry point (`python -m medusa_forge.train`): it runs the CLI
        return "cli", ORDER["cli"]
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in ORDER:
            return key, ORDER[key]
    raise AssertionError(f"{module} has no place in ORDER: add it")


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medusa_forge."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("medusa_forge.")}
    return found


def test_no_module_imports_one_later_in_the_flow():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
        if module in ("__init__", "__main__"):
            continue
        name, rank = place(module)
        for imported in sorted(imports_of(path)):
            other, other_rank = place(imported)
            if other_rank > rank:
                problems.append(f"{module} ({name}, {rank}) imports {imported} ({other}, {other_rank})")
    assert not problems, "\n".join(problems)


MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80


def test_no_module_or_function_outgrows_its_limit():
    """Every module of the package under 450 lines and every function under ~80 (issue 23): a kind's code that
    grows splits along its seams instead of swelling a shared module."""
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        name = path.relative_to(PACKAGE)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            problems.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    problems.append(f"{name}:{node.lineno} {node.name}: {lines} lines")
    assert not problems, "\n".join(problems)
