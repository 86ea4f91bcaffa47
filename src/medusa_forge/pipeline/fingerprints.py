"""What a stage's result depends on, as a fingerprint: file digests, what a model or data reference stands for,
and the per-stage record of settings + inputs that decides skip, resume or start over."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

# Keys whose growth extends the work already done instead of invalidating it (the stage resumes).
EXTENDABLE = {
    "distill": ("max_samples",),
    "train": ("max_steps", "num_train_epochs", "max_samples"),
}
# Settings that do not change a stage's result (progress display, logging, retries), left out of its fingerprint.
RESULT_NEUTRAL_SETTINGS = {
    "distill": ("no_progress", "concurrency", "timeout", "max_retries", "retry_base"),
    "train": ("logging_steps", "disable_tqdm", "report_to", "save_steps", "save_total_limit", "save_strategy",
              "keep_checkpoints"),
    "evaluate": (),
}


@dataclass
class StageFingerprint:
    """What a stage's result depends on: its settings and its inputs, with the budget keys apart."""

    config: dict  # the stage's settings (fingerprinted)
    inputs: dict  # input identities (fingerprinted)
    extend: dict = field(default_factory=dict)  # budget keys that may grow and still resume

    @property
    def digest(self) -> str:
        """Equal digests: the recorded result still holds (the stage is skipped)."""
        return digest_of({"config": self.config, "extend": self.extend, "inputs": self.inputs})

    @property
    def resume_key(self) -> str:
        """Equal resume keys: only budgets changed, so the work done so far can be extended."""
        return digest_of({"config": self.config, "inputs": self.inputs})


def split_section(section: dict, stage: str) -> tuple[dict, dict]:
    """A stage's section -> (settings that are fingerprinted, budget keys); result-neutral settings are left out."""
    extend = {k: v for k, v in section.items() if k in EXTENDABLE.get(stage, ())}
    neutral = RESULT_NEUTRAL_SETTINGS.get(stage, ())
    rest = {k: v for k, v in section.items() if k not in extend and k not in neutral}
    return rest, extend


_DIGESTS: dict[tuple, str] = {}


def file_digest(path: Path) -> str:
    """sha256 of a file's content (memoised per process by path, size and mtime: one read per run)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def source_identity(ref: str) -> dict:
    """What a data or model reference stands for: file content hashes where it is local, else the name itself.

    A model folder: content hashes of its small files (config, tokenizer) and the size of each weight file;
    weights are not re-read (many GB), so replacing weights with same-sized ones goes unnoticed."""
    from medusa_forge.data.conversations import DATA_ALIASES
    from medusa_forge.defaults import MODEL_ALIAS, sharegpt_path, smollm2_gguf_path

    if ref in DATA_ALIASES:
        return {"alias": ref, "file": file_digest(sharegpt_path())}
    if ref == MODEL_ALIAS:
        return {"alias": ref, "gguf_bytes": smollm2_gguf_path().stat().st_size}
    path = Path(ref)
    if path.is_file():
        return {"file": file_digest(path)}
    if path.is_dir():
        out = {}
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            name = str(item.relative_to(path))
            big = item.stat().st_size > 50_000_000
            out[name] = f"{item.stat().st_size} bytes" if big else file_digest(item)
        return {"folder": out}
    return {"name": ref}


def digest_of(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def outputs_digest(paths: list[Path], root: Path) -> dict[str, str]:
    """Each output file (named relative to the work folder) -> its content digest, as the state records it."""
    return {str(p.relative_to(root)): file_digest(p) for p in paths}


def outputs_verify(recorded: dict[str, str], root: Path) -> str | None:
    """None when every recorded output exists with the recorded content, else what is wrong."""
    if not recorded:
        return "no outputs recorded"
    for name, digest in recorded.items():
        path = root / name
        if not path.is_file():
            return f"{name} is missing"
        if file_digest(path) != digest:
            return f"{name} changed since it was written"
    return None
