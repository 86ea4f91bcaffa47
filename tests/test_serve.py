"""`medusa-forge serve` over a tiny random model, spoken to over real loopback HTTP."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from medusa_forge.cli import main
from medusa_forge.generation.generator import GenerationRequest
from medusa_forge.generation.hf import HFGenerator
from medusa_forge.serve import create_app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 in a background thread, for the duration of a `with` block."""

    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def generator(tiny_model_dir: Path) -> HFGenerator:
    return HFGenerator.load(str(tiny_model_dir))


@pytest.fixture(scope="module")
def server(generator):
    app = create_app(generator, "tiny", max_batch_size=8, batch_wait_ms=20)  # continuous batching (auto)
    with ServerThread(app) as running:
        running.app = app
        yield running


@pytest.fixture(scope="module")
def static_server(generator):
    app = create_app(generator, "tiny", max_batch_size=8, batch_wait_ms=20, batching="static")
    with ServerThread(app) as running:
        running.app = app
        yield running


def chat(server, **body) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)


def solo(generator: HFGenerator, messages: list[dict], max_tokens: int) -> str:
    """What plain transformers greedy generation gives for these messages, one request alone."""
    return generator.generate_batch([GenerationRequest(generator.encode_chat(messages), max_tokens)])[0].text


HELLO = [{"role": "user", "content": "Hello there! How can I help you today?"}]


def test_health_and_models(server):
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny"
    assert health["batching"] == "continuous"  # what auto picks for a Llama
    models = httpx.get(f"{server.url}/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]


def test_completion_shape_and_greedy_text(server, generator):
    response = chat(server, model="tiny", messages=HELLO, max_tokens=6, temperature=0)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == solo(generator, HELLO, 6)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(generator.encode_chat(HELLO))
    assert 1 <= usage["completion_tokens"] <= 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_content_parts_are_accepted(server, generator):
    parts = [{"role": "user", "content": [{"type": "text", "text": HELLO[0]["content"]}]}]
    body = chat(server, messages=parts, max_tokens=4, temperature=0).json()
    assert body["choices"][0]["message"]["content"] == solo(generator, HELLO, 4)


@pytest.mark.parametrize("server_kind", ["server", "static_server"])
def test_streaming_matches_non_streaming(request, server_kind):
    server = request.getfixturevalue(server_kind)
    plain = chat(server, messages=HELLO, max_tokens=8, temperature=0).json()
    with httpx.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        json={"messages": HELLO, "max_tokens": 8, "temperature": 0, "stream": True},
        timeout=60,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == plain["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == plain["usage"]
    assert len(chunks) >= 3  # role, at least one content delta, finish


@pytest.mark.parametrize("server_kind", ["server", "static_server"])
def test_concurrent_requests_share_batches(request, server_kind, generator):
    server = request.getfixturevalue(server_kind)
    prompts = [[{"role": "user", "content": f"Question {i}: the quick brown fox {'jumps ' * i}"}] for i in range(8)]
    limits = [2 + i % 4 for i in range(8)]
    before = server.app.state.engine.stats()

    async def send_all():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return await asyncio.gather(
                *[
                    client.post("/v1/chat/completions", json={"messages": p, "max_tokens": n, "temperature": 0})
                    for p, n in zip(prompts, limits, strict=True)
                ]
            )

    responses = asyncio.run(send_all())
    after = server.app.state.engine.stats()
    assert all(r.status_code == 200 for r in responses)
    if after["batching"] == "static":
        assert after["generate_calls"] - before["generate_calls"] < len(prompts), "requests should share generate"
    else:
        rows = after["rows_decoded"] - before["rows_decoded"]
        assert rows > after["decode_steps"] - before["decode_steps"], "requests should share decode steps"
    for response, prompt, limit in zip(responses, prompts, limits, strict=True):
        body = response.json()
        # Each request keeps its own max_tokens inside a shared batch and gets its own reply.
        assert body["usage"]["completion_tokens"] <= limit
        assert body["usage"]["prompt_tokens"] == len(generator.encode_chat(prompt))
        if body["choices"][0]["finish_reason"] == "length":
            assert body["usage"]["completion_tokens"] == limit
        assert body["choices"][0]["message"]["content"] == solo(generator, prompt, limit)


def test_seeded_sampling_is_reproducible(server):
    first = chat(server, messages=HELLO, max_tokens=8, temperature=1.0, top_p=0.9, seed=7).json()
    second = chat(server, messages=HELLO, max_tokens=8, temperature=1.0, top_p=0.9, seed=7).json()
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
        ({"messages": []}, "messages"),
        ({"messages": HELLO, "temperature": 5}, "temperature"),
        ({"messages": HELLO, "top_p": 0}, "top_p"),
        ({"messages": HELLO, "max_tokens": 0}, "max_tokens"),
        ({"messages": HELLO, "n": 2}, "n"),
        ({"messages": HELLO, "stop": ["\n"]}, "stop"),
        ({"messages": HELLO, "max_tokens": 100000}, "maximum context length"),
        ({"prompt": "completions-style body"}, "messages"),
    ],
)
def test_bad_requests_get_openai_style_400(server, body, expected):
    response = chat(server, **body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert expected in error["message"] or expected == error["param"]
    assert error["type"] == "invalid_request_error"


def test_invalid_json_and_unknown_route(server):
    response = httpx.post(
        f"{server.url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    missing = httpx.get(f"{server.url}/v1/nothing-here")
    assert missing.status_code == 404 and "error" in missing.json()


def test_context_error_code(server):
    body = chat(server, messages=HELLO, max_tokens=100000).json()
    assert body["error"]["code"] == "context_length_exceeded"


def test_cli_bad_model_is_a_clear_error(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "no-such-model"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model ") and "no such folder" in err and "Traceback" not in err


def test_tokenizer_without_chat_template_uses_the_training_fallback(tmp_path):
    from conftest import build_tokenizer, make_tiny_model

    from medusa_forge.data.tokenize import FALLBACK_CHAT_TEMPLATE

    folder = make_tiny_model("gpt2", tmp_path / "gpt2", build_tokenizer(chat_template=None))
    generator = HFGenerator.load(str(folder))
    assert generator.tokenizer.chat_template == FALLBACK_CHAT_TEMPLATE  # the same prompt format train uses
    prompt = generator.encode_chat(HELLO)
    rendered = generator.tokenizer.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True)
    assert generator.tokenizer.decode(prompt) == rendered and rendered.startswith("User")
    [result] = generator.generate_batch([GenerationRequest(prompt, 3)])
    assert result.completion_tokens <= 3 and result.prompt_tokens == len(prompt)


def test_engine_groups_by_sampling_settings_and_prompt_length(generator):
    """One burst of mixed requests: each generate call holds one sampling setting and neighbouring lengths."""
    from medusa_forge.generation.static import BatchingEngine

    calls = []

    class Recording:
        max_context = generator.max_context
        encode_chat = generator.encode_chat
        check_fits = generator.check_fits

        def generate_batch(self, requests, on_text=None):
            calls.append([(r.sampling_key(), len(r.prompt_ids)) for r in requests])
            return generator.generate_batch(requests, on_text)

    lengths = [30, 5, 22, 9, 41, 17]
    requests = [
        GenerationRequest(list(range(3, 3 + n)), 2, temperature=0.0 if i % 2 else 0.8, seed=1)
        for i, n in enumerate(lengths)
    ]

    async def burst():
        engine = BatchingEngine(Recording(), max_batch_size=2, batch_wait_ms=50)
        results = await asyncio.gather(*[engine.submit(r) for r in requests])
        await engine.close()
        return results

    results = asyncio.run(burst())
    assert [r.prompt_tokens for r in results] == lengths  # each caller gets its own result back
    assert sorted(n for call in calls for _, n in call) == sorted(lengths)
    assert all(len(call) <= 2 and len({key for key, _ in call}) == 1 for call in calls)
    for key in {key for call in calls for key, _ in call}:  # within a setting: batches cut from sorted lengths
        batches = [[n for k, n in call] for call in calls if call[0][0] == key]
        flat = sorted(n for batch in batches for n in batch)
        assert sorted(batches) == [flat[i : i + 2] for i in range(0, len(flat), 2)]


def test_continuous_rows_join_and_leave_with_plain_greedy_results(generator):
    """Staggered arrivals, a batch of 3 and different lengths: rows are admitted into a running batch and leave
    as they finish, and every reply is token for token what transformers' greedy `generate` gives alone."""
    from medusa_forge.generation.continuous import ContinuousEngine

    prompts = [generator.encode_chat([{"role": "user", "content": f"Q{i}: {'fox ' * (3 * i)}"}]) for i in range(7)]
    limits = [3 + (7 * i) % 15 for i in range(7)]
    alone = [generator.generate_batch([GenerationRequest(p, n)])[0] for p, n in zip(prompts, limits, strict=True)]

    async def staggered():
        engine = ContinuousEngine(generator, max_batch_size=3, batch_wait_ms=5)

        async def one(i):
            await asyncio.sleep(0.02 * (i % 3))
            return await engine.submit(GenerationRequest(prompts[i], limits[i]))

        results = await asyncio.gather(*[one(i) for i in range(7)])
        await engine.close()
        return results, engine.step_sizes

    results, steps = asyncio.run(staggered())
    assert [(r.text, r.completion_tokens, r.finish_reason) for r in results] == [
        (r.text, r.completion_tokens, r.finish_reason) for r in alone
    ]
    assert max(steps) == 3 and len(set(steps)) > 1  # batch full at times, shrinking as rows finish


def test_continuous_seeded_sampling_does_not_depend_on_batch_mates(generator):
    from medusa_forge.generation.continuous import ContinuousEngine

    seeded = GenerationRequest(generator.encode_chat(HELLO), 10, temperature=1.0, top_p=0.8, seed=123)
    others = [GenerationRequest(generator.encode_chat([{"role": "user", "content": "x" * i}]), 6) for i in (3, 9)]

    async def run(requests):
        engine = ContinuousEngine(generator, max_batch_size=4, batch_wait_ms=20)
        results = await asyncio.gather(*[engine.submit(r) for r in requests])
        await engine.close()
        return results

    alone = asyncio.run(run([seeded]))[0]
    crowded = asyncio.run(run([others[0], seeded, others[1]]))[1]
    assert alone.text == crowded.text and alone.completion_tokens == crowded.completion_tokens


def test_make_engine_choices(generator):
    from medusa_forge.errors import UserError
    from medusa_forge.generation.batching import make_engine
    from medusa_forge.generation.continuous import ContinuousEngine
    from medusa_forge.generation.interleaved import InterleavedEngine
    from medusa_forge.generation.static import BatchingEngine

    assert isinstance(make_engine(generator), ContinuousEngine)
    assert isinstance(make_engine(generator, "static"), BatchingEngine)

    class OtherDecoder:  # its own generate_batch: the static engine
        max_context = 512

    class SteppedDecoder(OtherDecoder):  # one sequence at a time (a draft): requests take turns
        def steps(self, request, on_text=None): ...

    assert isinstance(make_engine(OtherDecoder()), BatchingEngine)
    with pytest.raises(UserError, match="--batching continuous"):
        make_engine(OtherDecoder(), "continuous")
    assert isinstance(make_engine(SteppedDecoder()), InterleavedEngine)
    with pytest.raises(UserError, match="--batching static: with a draft"):
        make_engine(SteppedDecoder(), "static")
    with pytest.raises(UserError, match="--batching 'fast'"):
        make_engine(generator, "fast")


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "gemma", "mistral"])
def test_continuous_batching_matches_generate_on_other_architectures(tmp_path, arch):
    from conftest import build_tokenizer, make_tiny_model

    from medusa_forge.generation.continuous import ContinuousEngine

    generator = HFGenerator.load(str(make_tiny_model(arch, tmp_path / arch, build_tokenizer())))
    assert ContinuousEngine.supports(generator)
    prompts = [generator.encode_chat([{"role": "user", "content": "fox " * (2 * i + 1)}]) for i in range(4)]
    alone = [generator.generate_batch([GenerationRequest(p, 6 + i)])[0].text for i, p in enumerate(prompts)]

    async def together():
        engine = ContinuousEngine(generator, max_batch_size=2, batch_wait_ms=5)
        results = await asyncio.gather(*[engine.submit(GenerationRequest(p, 6 + i)) for i, p in enumerate(prompts)])
        await engine.close()
        return [r.text for r in results]

    assert asyncio.run(together()) == alone


async def _until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.005)


def test_out_of_range_seed_is_a_400_and_requests_in_flight_finish(server, generator):
    """A seed beyond what torch takes (2**70) used to fail every request in the running batch with a 500."""
    prompts = [[{"role": "user", "content": f"Story {i}: the quick brown fox"}] for i in range(3)]
    engine = server.app.state.engine
    before = engine.stats()["decode_steps"]

    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            running = [
                asyncio.ensure_future(
                    client.post("/v1/chat/completions", json={"messages": p, "max_tokens": 40, "temperature": 0})
                )
                for p in prompts
            ]
            await _until(lambda: engine.stats()["decode_steps"] > before)  # the three are generating
            bad = await client.post(
                "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 4, "temperature": 0.7, "seed": 2**70}
            )
            in_flight = sum(not task.done() for task in running)
            return bad, in_flight, await asyncio.gather(*running)

    bad, in_flight, good = asyncio.run(scenario())
    assert bad.status_code == 400, bad.text
    assert bad.json()["error"]["param"] == "seed" and "seed" in bad.json()["error"]["message"]
    assert in_flight > 0  # the bad request really arrived while others were generating
    for response, prompt in zip(good, prompts, strict=True):
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == solo(generator, prompt, 40)


def test_tiny_temperature_decodes_greedily(server, generator):
    """1e-300 used to overflow the logits to inf/nan: a 500, and in a shared batch every row's."""
    response = chat(server, messages=HELLO, max_tokens=4, temperature=1e-300)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == solo(generator, HELLO, 4)


def test_largest_torch_seed_is_accepted(server):
    assert chat(server, messages=HELLO, max_tokens=2, temperature=0.7, seed=2**64 - 1).status_code == 200


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_an_exception_for_one_request_ends_that_request_only(generator, batching):
    """Behind the server's validation: a request the engine cannot run (here a seed torch refuses) fails alone."""
    from medusa_forge.generation.batching import make_engine

    prompts = [generator.encode_chat([{"role": "user", "content": f"fox {i}"}]) for i in range(3)]
    # The shortest prompt: static batching sorts by length and seeds a batch from its first request.
    bad = GenerationRequest(prompts[0][:3], 6, temperature=0.7, seed=2**70)
    good = [GenerationRequest(p, 6, temperature=0.7, seed=i) for i, p in enumerate(prompts)]

    async def together():
        engine = make_engine(generator, batching, max_batch_size=4, batch_wait_ms=50)
        results = await asyncio.gather(*[engine.submit(r) for r in [bad, *good]], return_exceptions=True)
        await engine.close()
        return results

    failed, *results = asyncio.run(together())
    assert isinstance(failed, Exception) and "long" in str(failed)
    for result, prompt in zip(results, prompts, strict=True):
        assert not isinstance(result, BaseException) and result.prompt_tokens == len(prompt)


def read_chunks_then_disconnect(server, body: dict, chunks: int) -> None:
    """Stream `body`, read `chunks` SSE events, then close the connection (the client goes away)."""
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        seen = 0
        for line in response.iter_lines():
            seen += line.startswith("data: ")
            if seen == chunks:
                break


def wait_for_cancelled(engine, before: dict, timeout: float = 20.0) -> None:
    """Wait until the engine has stopped one more request than in its `before` stats."""
    deadline = time.monotonic() + timeout
    while engine.stats().get("requests_cancelled", 0) <= before.get("requests_cancelled", 0):
        assert time.monotonic() < deadline, f"the engine never stopped the request: {engine.stats()}"
        time.sleep(0.01)


def test_disconnected_stream_stops_generating(server):
    engine = server.app.state.engine
    before = engine.stats()
    long = {"messages": HELLO, "max_tokens": 450, "temperature": 0, "stream": True}
    read_chunks_then_disconnect(server, long, chunks=3)  # the role chunk and two of text
    wait_for_cancelled(engine, before)
    # It stopped well short of its 450 tokens, and a short request answers at once.
    assert engine.stats()["rows_decoded"] - before["rows_decoded"] < 100
    start = time.monotonic()
    assert chat(server, messages=HELLO, max_tokens=4, temperature=0).status_code == 200
    assert time.monotonic() - start < 10


def test_request_body_over_the_limit_is_a_413(generator):
    app = create_app(generator, "tiny", max_request_bytes=2000)
    with ServerThread(app) as small:
        response = chat(small, messages=[{"role": "user", "content": "x" * 5000}], max_tokens=2)
        assert response.status_code == 413
        error = response.json()["error"]
        assert "2000 bytes" in error["message"] and "--max-request-bytes" in error["message"]
        # A chunked body declares no length: it is counted as it arrives.
        chunked = httpx.post(
            f"{small.url}/v1/chat/completions",
            content=iter([b'{"messages": [{"role": "user", "content": "', b"y" * 3000, b'"}]}']),
            headers={"content-type": "application/json"},
            timeout=60,
        )
        assert chunked.status_code == 413 and "error" in chunked.json()
        assert chat(small, messages=HELLO, max_tokens=2).status_code == 200  # within the limit: served


def test_tokenising_a_large_prompt_does_not_block_health(server):
    big = [{"role": "user", "content": "the quick brown fox jumps over the lazy dog " * 36_000}]  # 1.5 MB

    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            task = asyncio.ensure_future(client.post("/v1/chat/completions", json={"messages": big, "max_tokens": 1}))
            await asyncio.sleep(0.1)  # the body is on its way and being tokenised
            waits = []
            while not task.done():
                start = time.monotonic()
                assert (await client.get("/health")).status_code == 200
                waits.append(time.monotonic() - start)
                await asyncio.sleep(0.05)
            return await task, waits

    response, waits = asyncio.run(scenario())
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    assert len(waits) >= 3, "the prompt was tokenised too fast to tell"
    assert max(waits) < 0.5, waits


def test_cli_batching_mode_with_a_draft_is_refused_before_loading(tmp_path, capsys):
    assert main(["serve", "--draft", str(tmp_path / "not-loaded"), "--batching", "static", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "--batching static: with a draft" in err and "not-loaded" not in err
