"""pyproject's floor for transformers holds: the tests that hand a KV cache to a model (tree decoding, EAGLE-3
decoding, continuous batching in serve and distill) pass under the oldest transformers it allows.

transformers renamed a model's cache argument and output field (`past_key_values` -> `cache`) within 5.x, and the
suite's own environment has a recent release, so code that uses only the new name passes every other test: it did,
and continuous batching fell back to static batching on transformers 5.0-5.17 without a word. The floor release
is installed once, with the tokenizers and huggingface_hub it accepts, into a folder laid over this environment on
PYTHONPATH (torch and everything else are this environment's), and those test files run under it in a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import install_once

ROOT = Path(__file__).resolve().parents[1]
OVERLAY = ROOT / ".venv-transformers-floor"
FILES = ["tests/test_decode.py", "tests/test_eagle3_decode.py", "tests/test_serve.py", "tests/test_distill.py"]
# What the floor release accepts (transformers 5.0.0: tokenizers>=0.22.0,<=0.23.0, huggingface-hub>=1.3.0,<2.0);
# change them with the floor.
COMPANIONS = ["tokenizers==0.22.2", "huggingface_hub==1.3.7"]


def transformers_floor() -> str:
    """The lowest transformers pyproject.toml allows (its `transformers>=X` requirement)."""
    found = re.search(r'"transformers>=([0-9.]+)', (ROOT / "pyproject.toml").read_text())
    assert found, "pyproject.toml has no transformers>=X requirement"
    return found.group(1)


@pytest.fixture(scope="session")
def overlay() -> Path:
    """The folder holding the floor release and its companions, made on first use (~10 s) and reused while the
    packages match."""
    packages = [f"transformers=={transformers_floor()}", *COMPANIONS]
    step = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(OVERLAY), *packages]
    install_once(OVERLAY, packages, [step], "the transformers floor")
    return OVERLAY


def test_the_tests_that_pass_a_kv_cache_pass_under_the_oldest_transformers_allowed(overlay):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(overlay), str(ROOT / "src"),
                                                                      os.environ.get("PYTHONPATH")]))}  # fmt: skip
    version = subprocess.run(
        [sys.executable, "-c", "import transformers; print(transformers.__version__)"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert version.startswith(transformers_floor())  # the overlay is what the subprocess imports
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *FILES]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, f"under transformers {version}:\n" + done.stdout[-6000:] + done.stderr[-2000:]
