"""The cache key without re-reading every weight file every run (issue 24): `TargetFiles.fingerprint` hashes a weight
file once and then trusts the record of its (path, size, mtime, ctime) until the file changes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from medusa_forge import file_digests
from medusa_forge.defaults import cache_dir
from medusa_forge.train.target_files import TargetFiles


@pytest.fixture
def target(tiny_model_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "target"
    shutil.copytree(tiny_model_dir, folder)
    return folder


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files hashed (read whole), in order."""
    seen: list[str] = []
    real = file_digests.sha256_file

    def counted(path: Path) -> str:
        seen.append(path.name)
        return real(path)

    monkeypatch.setattr(file_digests, "sha256_file", counted)
    return seen


def fingerprint(folder: Path) -> str:
    return TargetFiles(folder, torch.float32).fingerprint  # a new run: nothing kept in memory


def test_a_second_run_does_not_read_the_weights_again(target: Path, reads: list[str]) -> None:
    first = fingerprint(target)
    assert reads == ["model.safetensors"]
    assert fingerprint(target) == first and reads == ["model.safetensors"]  # the record answered
    record = cache_dir() / file_digests.RECORD_NAME
    assert str((target / "model.safetensors").resolve()) in record.read_text()
    record.write_text("{not json")  # a damaged record is only a cache: hashed again, same key, record rewritten
    assert fingerprint(target) == first and len(reads) == 2
    assert fingerprint(target) == first and len(reads) == 2


def test_an_edited_weight_file_is_hashed_again_even_with_its_old_mtime(target: Path, reads: list[str]) -> None:
    weights = target / "model.safetensors"
    before = fingerprint(target)
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one weight's last byte: the same size
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as `cp -p` or `rsync -t` would leave it
    assert weights.stat().st_size == stat.st_size and weights.stat().st_mtime_ns == stat.st_mtime_ns
    after = fingerprint(target)
    assert after != before and reads == ["model.safetensors", "model.safetensors"]
    (cache_dir() / file_digests.RECORD_NAME).unlink()
    assert fingerprint(target) == after  # what hashing from scratch gives


def test_the_same_files_elsewhere_keep_the_key(target: Path, tmp_path: Path, reads: list[str]) -> None:
    moved = shutil.copytree(target, tmp_path / "elsewhere")
    assert fingerprint(moved) == fingerprint(target) and len(reads) == 2  # each path hashed once
