"""`medusa-forge serve`: an OpenAI-compatible chat completions server over the in-process model.

Endpoints: POST /v1/chat/completions (JSON or SSE streaming), GET /v1/models, GET /health.
Every request, streaming or not, goes through one engine (`generation.batching.make_engine`): by default
continuous batching (requests join and leave the running batch between decode steps), or static batching
(`--batching static`: requests arriving together with the same sampling settings share one left-padded
`generate`). Streamed requests receive their text as each step decodes it.
Another decoder (a draft: Medusa heads or EAGLE-3) plugs in by passing its own generator to `create_app`; with a
draft, concurrent requests take turns step by step (`generation.interleaved`).

One request must not hurt the others: every field is validated before the request reaches the engine (400 naming
the field), the engines end only the request whose work raised, a request whose client went away stops at its
next step, bodies over `--max-request-bytes` get 413 before they are parsed, and tokenising runs in a worker
thread so the event loop keeps answering (`/health` included) while a large prompt is encoded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from medusa_forge.defaults import MODEL_ALIAS
from medusa_forge.errors import UserError
from medusa_forge.generation.batching import BATCHING_MODES, check_batching, make_engine
from medusa_forge.generation.device import device_field, dtype_field, resolve_device
from medusa_forge.generation.generator import ContextLengthError, GenerationRequest, Generator, SteppedGenerator
from medusa_forge.generation.hf import HFGenerator
from medusa_forge.generation.sampling import SEED_MAX, SEED_MIN
from medusa_forge.modeling import (
    check_target_flags,
    target_device_map_field,
    target_max_memory_field,
    target_offload_folder_field,
    target_placement,
)

logger = logging.getLogger("medusa_forge.serve")


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionRequest(BaseModel):
    """The OpenAI fields we honour; unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)  # what torch's generators take
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)
    stop: str | list[str] | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def _error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20


class BodySizeLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 before the app reads or parses any of it.

    A declared Content-Length is checked at once; a chunked body is counted as it arrives. An accepted body is
    buffered (at most `limit` bytes) and handed on to the app."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                await self._refuse(scope, receive, send)
                return
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the disconnect, when it comes
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send) -> None:
        message = (
            f"the request body is larger than this server's limit of {self.limit} bytes; send a smaller request "
            f"or raise the limit with serve --max-request-bytes"
        )
        response = JSONResponse(_error_body(message, "invalid_request_error", "request_too_large"), 413)
        await response(scope, receive, send)


async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A malformed body: every problem in one message, the first field as `param` (as OpenAI answers)."""
    problems = []
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            problems.append(f"the request body is not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})")
            continue
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        problems.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
    locations = [e.get("loc", ()) for e in exc.errors() if e.get("type") != "json_invalid"]
    first_param = ".".join(str(part) for part in locations[0][1:]) if locations else None
    return JSONResponse(_error_body("; ".join(problems), "invalid_request_error", "invalid_request", first_param), 400)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    kind = "invalid_request_error" if exc.status < 500 else "server_error"
    return JSONResponse(_error_body(exc.message, kind, exc.code, exc.param), exc.status)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(_error_body(str(exc.detail), "invalid_request_error", str(exc.status_code)), exc.status_code)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("request failed")
    return JSONResponse(_error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"), 500)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error answers in OpenAI's error shape (clients parse `error.message`), none as a bare 500 page."""
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)


def _generation_request(
    generator: Generator | SteppedGenerator, body: ChatCompletionRequest, default_max_tokens: int
) -> GenerationRequest:
    """A chat request as the engine takes it; an ApiError (400) for what the server cannot answer."""
    if body.stop:
        raise ApiError(400, "'stop' sequences are not supported by this server", "unsupported_parameter", "stop")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        prompt_ids = generator.encode_chat(messages)
    except Exception as err:  # e.g. a template that insists on alternating roles
        raise ApiError(
            400, f"the chat template rejected these messages: {err}", "invalid_messages", "messages"
        ) from None
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is None:
        max_tokens = max(1, min(default_max_tokens, generator.max_context - len(prompt_ids)))
    try:
        generator.check_fits(len(prompt_ids), max_tokens)
    except ContextLengthError as err:
        raise ApiError(400, str(err), "context_length_exceeded", "messages") from None
    return GenerationRequest(prompt_ids, max_tokens, body.temperature, body.top_p, body.seed, body.stream)


def _completion(completion_id: str, created: int, model_name: str, result) -> dict:  # noqa: ANN001 - a result
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model_name,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "finish_reason": result.finish_reason,
            }
        ],
        "usage": _usage(result),
    }


def create_app(
    generator: Generator | SteppedGenerator,
    model_name: str,
    max_batch_size: int = 16,
    batch_wait_ms: float = 25.0,
    default_max_tokens: int = 512,
    batching: str = "auto",
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> FastAPI:
    """The FastAPI app; `generator` does the decoding (see `generation.generator`)."""
    engine = make_engine(generator, batching, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms)
    app = FastAPI(title="medusa-forge serve")
    app.add_middleware(BodySizeLimit, limit=max_request_bytes)
    app.state.engine = engine

    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, **engine.stats()}  # batching at a glance

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "local"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: Request):
        # Tokenising a long prompt takes seconds: in a worker thread, the event loop keeps serving.
        request = await asyncio.to_thread(_generation_request, generator, body, default_max_tokens)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:  # StreamingResponse cancels `_stream` when the client disconnects
            return StreamingResponse(
                _stream(engine, request, completion_id, created, model_name), media_type="text/event-stream"
            )
        result = await _unless_disconnected(http, engine.submit(request))
        if result is None:  # nobody is left to read an answer; 499 as nginx logs it
            return JSONResponse(_error_body("the client disconnected", "invalid_request_error"), 499)
        return _completion(completion_id, created, model_name, result)

    return app


def _usage(result) -> dict:
    usage = {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }
    if hasattr(result, "accepted_tokens_per_step"):  # decoding with a draft
        usage["accepted_tokens_per_step"] = round(result.accepted_tokens_per_step, 3)
    return usage


async def _unless_disconnected(http: Request, work):
    """Await `work` (an engine submission); None when the client disconnects first: the submission is then
    cancelled, and the engine stops the request at its next step instead of generating for nobody."""

    async def disconnected() -> None:
        while (await http.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # the handler itself was cancelled (shutdown)
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        return None
    return task.result()


async def _stream(engine, request: GenerationRequest, completion_id: str, created: int, model: str):
    """SSE: a role chunk, content deltas as they decode, a finish chunk with usage, then `[DONE]`."""
    deltas: asyncio.Queue = asyncio.Queue()
    task = asyncio.ensure_future(engine.submit(request, on_text=deltas.put_nowait))
    task.add_done_callback(lambda _: deltas.put_nowait(None))

    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
        body = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while (text := await deltas.get()) is not None:
            yield chunk({"content": text})
        try:
            result = task.result()
        except Exception as err:  # headers are sent: report the failure in-band, as OpenAI does
            logger.exception("streamed generation failed")
            yield f"data: {json.dumps(_error_body(f'internal error: {err}', 'server_error'))}\n\n"
            return
        yield chunk({}, result.finish_reason, _usage(result))
        yield "data: [DONE]\n\n"
    finally:
        task.cancel()  # the client went away: drop the request if it has not started yet


@dataclass
class ServeConfig:
    """OpenAI-compatible server (local model)."""

    UNDERSCORE_ALIASES: ClassVar[bool] = True  # --target_device_map as train spells it (and every flag so)

    model: str | None = field(
        default=None, metadata={"help": "Local folder, Hub id or the offline alias 'smollm2' (default: smollm2)."}
    )
    draft: str | None = field(
        default=None,
        metadata={
            "help": "Draft folder (Medusa heads or EAGLE-3, detected): decode with it; concurrent requests take "
            "turns step by step, up to --max-batch-size at once (default base: the draft's own).",
            "aliases": ["--heads"],
        },
    )
    served_model_name: str | None = field(
        default=None, metadata={"help": "Name in /v1/models and replies (default: --model)."}
    )
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = field(
        default=16, metadata={"help": "Most requests decoded together (with a draft: taking turns); others queue."}
    )
    batching: str = field(
        default="auto",
        metadata={
            "help": "continuous (requests join/leave between steps; auto picks it when the model allows) or static. "
            "With --draft: auto (requests take turns step by step).",
            "choices": BATCHING_MODES,
        },
    )
    batch_wait_ms: float = field(default=25.0, metadata={"help": "Gather requests arriving this close together."})
    default_max_tokens: int = field(default=512, metadata={"help": "max_tokens when a request omits it."})
    max_request_bytes: int = field(
        default=DEFAULT_MAX_REQUEST_BYTES, metadata={"help": "Largest request body accepted; larger ones get 413."}
    )
    dtype: str = dtype_field()
    device: str = device_field()
    target_device_map: str | None = target_device_map_field()
    target_max_memory: str | None = target_max_memory_field()
    target_offload_folder: str | None = target_offload_folder_field()

    def __post_init__(self) -> None:
        check_target_flags(self)
        if self.target_device_map is not None and not self.draft:
            raise UserError("--target_device_map applies to serving with a draft (--draft); add one")
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port {self.port}: expected 0-65535")
        if self.default_max_tokens < 1:
            raise UserError("--default-max-tokens must be at least 1")
        if self.max_request_bytes < 1:
            raise UserError(f"--max-request-bytes {self.max_request_bytes}: must be at least 1")
        check_batching(self.batching, draft=bool(self.draft))


def run_serve(config: ServeConfig) -> int:
    if config.draft:
        from medusa_forge.decode.serving import DraftServeGenerator

        placement = target_placement(config, resolve_device(config.device))
        generator = DraftServeGenerator.load(
            config.draft, config.model, dtype=config.dtype, device=config.device, placement=placement
        )
        base_name = generator.base_name  # the draft's own base unless --model: what clients record as the model
    else:
        base_name = config.model or MODEL_ALIAS
        generator = HFGenerator.load(base_name, dtype=config.dtype, device=config.device)
    app = create_app(
        generator,
        config.served_model_name or base_name,
        max_batch_size=config.max_batch_size,
        batch_wait_ms=config.batch_wait_ms,
        default_max_tokens=config.default_max_tokens,
        batching=config.batching,
        max_request_bytes=config.max_request_bytes,
    )
    import uvicorn

    uvicorn.run(app, host=config.host, port=config.port, log_level="info")
    return 0
