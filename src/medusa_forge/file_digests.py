"""sha256 of large files, remembered across runs: a 70B target's 140 GB of weights take minutes to hash, and every
training run keys its hidden-state cache by them (`train.target_files.TargetFiles.fingerprint`). A small record in
our cache folder maps (path, size, mtime_ns, ctime_ns) to the file's digest: a file whose stat is unchanged is not
read again; any write changes its mtime and ctime (ctime cannot be set back, so a copy that restores the old mtime,
`cp -p` or `rsync -t` over it, is still seen), and it is hashed again."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from medusa_forge.defaults import cache_dir

logger = logging.getLogger(__name__)

RECORD_NAME = "file-digests.json"
CHUNK = 16 * 2**20


def sha256_file(path: Path) -> str:
    """sha256 of the whole file (hashlib releases the GIL: files hash in parallel threads at disk speed)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _identity(path: Path) -> dict[str, int]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns}


def _read_record(record: Path) -> dict[str, dict]:
    try:
        entries = json.loads(record.read_text())
    except (OSError, ValueError):  # none yet, or damaged (an interrupted write elsewhere): it is only a cache
        return {}
    return entries if isinstance(entries, dict) else {}


def _write_record(record: Path, entries: dict[str, dict]) -> None:
    """Atomically (ranks of one node write it at once: the last whole file wins, the others hash again next time);
    entries of files that are gone are dropped."""
    kept = {path: entry for path, entry in entries.items() if os.path.exists(path)}
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=record.parent, prefix=RECORD_NAME, delete=False) as handle:
            json.dump(kept, handle, indent=0)
        os.replace(handle.name, record)
    except OSError as err:  # a read-only cache folder costs the next run a re-hash, not this run
        logger.warning("could not record file digests in %s (%s): the next run hashes the files again", record, err)


def file_digests(files: list[Path], record: Path | None = None) -> list[str]:
    """sha256 of each of `files`, read from `record` (default: RECORD_NAME in our cache folder) where a file's
    size, mtime and ctime are those recorded with it; the others are hashed (4 at a time) and recorded."""
    record = record or cache_dir() / RECORD_NAME
    entries = _read_record(record)
    identities = {str(path.resolve()): _identity(path) for path in files}
    digests: dict[str, str] = {}
    for name, identity in identities.items():
        entry = entries.get(name)
        if isinstance(entry, dict) and {k: entry.get(k) for k in identity} == identity and "sha256" in entry:
            digests[name] = entry["sha256"]
    missing = [name for name in identities if name not in digests]
    if missing:
        with ThreadPoolExecutor(max_workers=4) as pool:
            for name, digest in zip(missing, pool.map(sha256_file, map(Path, missing)), strict=True):
                digests[name] = digest
                entries[name] = {**identities[name], "sha256": digest}  # the stat from before it was read
        _write_record(record, entries)
    return [digests[str(path.resolve())] for path in files]
