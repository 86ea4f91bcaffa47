"""Where replies come from: any OpenAI-compatible chat completions server, or the model in this process.

Both expose `async complete(messages, params) -> Reply` and raise:
- `ContextLengthError` when the conversation no longer fits the model (the runner ends it at the last turn);
- `BackendUnavailable` when retries are exhausted (the conversation fails now and is retried on --resume);
- `UserError` for a 4xx that retrying cannot fix (bad URL, model name or key): the run stops with its message.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from dataclasses import dataclass
from urllib.parse import urlparse

import httpx
import torch

from medusa_forge.errors import UserError
from medusa_forge.generation.batching import make_engine
from medusa_forge.generation.generator import ContextLengthError, GenerationRequest
from medusa_forge.generation.hf import HFGenerator

logger = logging.getLogger(__name__)

RETRY_STATUSES = {408, 409, 425, 429}  # plus every 5xx
# How servers word "this conversation is too long" in a 400: vLLM, TGI, llama.cpp, OpenAI, and ours.
_CONTEXT_MESSAGE = re.compile(r"context|max_new_tokens|too long|maximum.*tokens|tokens.*exceed", re.IGNORECASE)


@dataclass
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Reply:
    text: str
    completion_tokens: int
    finish_reason: str


class BackendUnavailable(RuntimeError):
    """The server did not answer successfully after all retries."""


class BadReply(BackendUnavailable):
    """An answer that is no usable reply (not the OpenAI shape, or empty): retried like a 5xx, never written."""


def checked_reply(text: str, completion_tokens: int, finish_reason: str) -> Reply:
    """A reply worth keeping as training data: an empty one is a failure (training refuses empty turns)."""
    if not text.strip():
        raise BadReply(f"empty reply (finish_reason {finish_reason!r})")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # a lone surrogate ("\ud800" in the JSON): this conversation fails, not the run
        raise BackendUnavailable(
            f"the reply holds {text[err.start:err.end]!r} at character {err.start}, which cannot be written as UTF-8"
        ) from None
    return Reply(text, completion_tokens, finish_reason)


def chat_completions_url(url: str) -> str:
    """Accept a full endpoint, a `/v1` base, or a bare `http://host:port`."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise UserError(f"--url {url!r}: expected http(s)://host:port[/v1[/chat/completions]]")
    base = url.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    if base.endswith("/v1"):
        return base + "/chat/completions"
    return base + "/v1/chat/completions"


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return str(error.get("message") or error.get("detail") or error)[:500]
        return str(error)[:500]
    return str(body)[:500]


class HttpBackend:
    """OpenAI-compatible HTTP client (TGI Messages API, vLLM, llama.cpp server, Ollama, `medusa-forge serve`).

    Requests rotate over the given URLs (a retry moves to the next one, so one dead server is routed around).
    Retries: connection errors, timeouts, 408/409/425/429 and 5xx, with exponential back-off and full jitter,
    honouring Retry-After when the server sends it.
    """

    def __init__(
        self,
        urls: list[str],
        model: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        max_retries: int = 6,
        retry_base_s: float = 1.0,
        retry_max_s: float = 30.0,
        max_connections: int = 64,
    ):
        if not urls:
            raise UserError("--url: give at least one server URL")
        self.urls = [chat_completions_url(u) for u in urls]
        self.model = model
        self.max_retries = max_retries
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self.timeout_s = timeout_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
            headers=headers,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )
        self._next_url = 0

    async def __aenter__(self) -> HttpBackend:
        if self.model is None:
            self.model = await self._discover_model()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.aclose()

    @property
    def description(self) -> str:
        return f"{', '.join(self.urls)} (model {self.model!r})"

    async def _discover_model(self) -> str:
        """vLLM insists on the served model name: ask /v1/models; servers that ignore the field accept any."""
        for url in self.urls:
            models_url = url.removesuffix("/chat/completions") + "/models"
            try:
                response = await self.client.get(models_url, timeout=10.0)
                data = response.json().get("data") if response.status_code == 200 else None
                if data and isinstance(data[0], dict) and data[0].get("id"):
                    return str(data[0]["id"])
            except (httpx.HTTPError, ValueError, AttributeError, TypeError) as err:
                logger.info("could not list models at %s (%s)", models_url, err)
        logger.warning("no server listed its models at /v1/models; sending model 'default' (pass --model to choose)")
        return "default"

    def _backoff(self, attempt: int, response: httpx.Response | None) -> float:
        if response is not None:
            retry_after = response.headers.get("retry-after")
            if retry_after is not None:
                try:
                    return min(max(float(retry_after), 0.0), self.retry_max_s)
                except ValueError:
                    pass
        return random.uniform(0, min(self.retry_max_s, self.retry_base_s * 2**attempt))

    async def complete(self, messages: list[dict[str, str]], params: SamplingParams) -> Reply:
        payload = {
            "model": self.model,
            "messages": messages,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "stream": False,
        }
        # Only what matters: some servers (TGI's validation) reject top_p == 1.0, and greedy needs no seed.
        if params.top_p < 1.0:
            payload["top_p"] = params.top_p
        if params.seed is not None and params.temperature > 0:
            payload["seed"] = params.seed
        last_problem = "no attempt made"
        for attempt in range(self.max_retries + 1):
            url = self.urls[self._next_url % len(self.urls)]
            self._next_url += 1
            response = None
            try:
                # --timeout bounds the whole request: httpx's own timeout is per read, so a server that trickles a
                # byte at a time would otherwise hold the conversation forever.
                response = await asyncio.wait_for(self.client.post(url, json=payload), self.timeout_s)
            except TimeoutError:
                last_problem = f"{url}: no complete reply within --timeout {self.timeout_s:g} s"
            except httpx.TransportError as err:  # connection refused/reset, timeouts, protocol errors
                last_problem = f"{url}: {type(err).__name__}: {err}".rstrip(": ")
            else:
                if response.status_code == 200:
                    try:
                        return self._parse(url, response)
                    except BadReply as err:  # a server having a bad moment: retried like a 5xx
                        last_problem = str(err)
                else:
                    message = _error_message(response)
                    last_problem = f"{url}: HTTP {response.status_code}: {message}"
                    if response.status_code not in RETRY_STATUSES and response.status_code < 500:
                        if response.status_code in (400, 413, 422) and _CONTEXT_MESSAGE.search(message):
                            raise ContextLengthError(message)
                        raise UserError(f"the server rejected the request ({last_problem}); fix the flags and rerun")
            if attempt < self.max_retries:
                delay = self._backoff(attempt, response)
                logger.debug("retry %d in %.2fs after %s", attempt + 1, delay, last_problem)
                await asyncio.sleep(delay)
        raise BackendUnavailable(f"gave up after {self.max_retries + 1} attempts; last: {last_problem}")

    @staticmethod
    def _parse(url: str, response: httpx.Response) -> Reply:
        try:
            body = response.json()
            choice = body["choices"][0]
            text = choice["message"]["content"]
            if not isinstance(text, str):
                raise TypeError(f"message content is {type(text).__name__}")
            usage = body.get("usage") or {}
            completion_tokens, finish_reason = int(usage.get("completion_tokens") or 0), choice.get("finish_reason")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as err:
            raise BadReply(
                f"{url}: the reply is not an OpenAI chat completion ({err!r}): {response.text[:200]!r}"
            ) from None
        try:
            return checked_reply(text, completion_tokens, str(finish_reason or "stop"))
        except BadReply as err:
            raise BadReply(f"{url}: {err}") from None


class LocalBackend:
    """The model in this process, batched across concurrent conversations (continuous batching by default)."""

    def __init__(
        self, generator: HFGenerator, max_batch_size: int, batching: str = "auto", batch_wait_ms: float = 20.0
    ):
        self.generator = generator
        self.engine = make_engine(generator, batching, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms)

    async def __aenter__(self) -> LocalBackend:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.engine.close()

    @property
    def description(self) -> str:
        mode = self.engine.stats()["batching"]
        return f"in-process model {self.generator.model.name_or_path!r} on {self.generator.device} ({mode} batching)"

    def prompt_length(self, messages: list[dict[str, str]]) -> int:
        return len(self.generator.encode_chat(messages))

    async def complete(self, messages: list[dict[str, str]], params: SamplingParams) -> Reply:
        prompt_ids = self.generator.encode_chat(messages)
        self.generator.check_fits(len(prompt_ids), params.max_new_tokens)
        request = GenerationRequest(prompt_ids, params.max_new_tokens, params.temperature, params.top_p, params.seed)
        try:
            result = await self.engine.submit(request)
        except torch.OutOfMemoryError:
            raise BackendUnavailable(
                "out of memory while generating a batch; rerun with a lower --concurrency (the batch size)"
            ) from None
        return checked_reply(result.text, result.completion_tokens, result.finish_reason)
