"""`medusa-forge serve --heads DIR`: greedy replies equal the plain server's, usage reports accepted tokens/step."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
import torch
from conftest import plain_sample
from test_serve import HELLO, ServerThread, chat, read_chunks_then_disconnect, solo, wait_for_cancelled

from medusa_forge.decode.serving import DraftServeGenerator
from medusa_forge.drafts.medusa_heads import MedusaHeads
from medusa_forge.generation.hf import HFGenerator
from medusa_forge.generation.text import decode_text
from medusa_forge.modeling import load_base_model, load_tokenizer
from medusa_forge.serve import create_app


@pytest.fixture(scope="module")
def heads_dir(tiny_model_dir: Path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("serve-heads")
    base = load_base_model(str(tiny_model_dir))
    torch.manual_seed(0)
    heads = MedusaHeads.for_base_model(base, 3, 1, str(tiny_model_dir))
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    heads.save(folder)
    load_tokenizer(str(tiny_model_dir)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def medusa_server(heads_dir):
    generator = DraftServeGenerator.load(str(heads_dir), device="cpu", tree="default-8")
    app = create_app(generator, "tiny-medusa", max_batch_size=4, batch_wait_ms=20)
    with ServerThread(app) as running:
        running.app = app
        yield running


MESSAGES = [HELLO, [{"role": "user", "content": "The quick brown fox"}]]


@pytest.mark.parametrize("messages", MESSAGES)
def test_greedy_reply_equals_plain_server(medusa_server, tiny_model_dir, heads_dir, messages):
    plain = HFGenerator.load(str(tiny_model_dir))
    response = chat(medusa_server, messages=messages, max_tokens=20, temperature=0)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"]["content"] == solo(plain, messages, 20)
    usage = body["usage"]
    # What the same decoder accepts per step on the same prompt, run directly (the reply has more than one token).
    generator = DraftServeGenerator.load(str(heads_dir), device="cpu", tree="default-8")
    direct = generator.decoder.generate(generator.encode_chat(messages), 20, eos_token_ids=generator.eos_ids)
    assert len(direct.tokens) > 1 and usage["completion_tokens"] == len(direct.tokens) <= 20
    assert usage["accepted_tokens_per_step"] == round(direct.mean_accept_length, 3)


def test_seeded_sampled_reply_is_plain_sampling_with_that_seed(medusa_server, heads_dir):
    """temperature and top_p reach the decoder, whose sampling keeps the base model's distribution exactly: the
    reply is the text plain sampling draws with the request's seed, every time."""
    generator = DraftServeGenerator.load(str(heads_dir), device="cpu", tree="default-8")
    want = plain_sample(generator.decoder.base, generator.encode_chat(HELLO), 12, 0.8, 7, top_p=0.3)
    end = next((i for i, token in enumerate(want) if token in generator.eos_ids), len(want))
    replies = [chat(medusa_server, messages=HELLO, max_tokens=12, temperature=0.8, top_p=0.3, seed=7) for _ in "ab"]
    texts = [reply.json()["choices"][0]["message"]["content"] for reply in replies]
    assert texts == [decode_text(generator.tokenizer, want[:end])] * 2


def test_streaming_matches_and_reports_acceptance(medusa_server):
    whole = chat(medusa_server, messages=HELLO, max_tokens=16, temperature=0).json()
    text, usage = "", None
    with httpx.stream(
        "POST",
        f"{medusa_server.url}/v1/chat/completions",
        json={"messages": HELLO, "max_tokens": 16, "temperature": 0, "stream": True},
        timeout=60,
    ) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            text += chunk["choices"][0]["delta"].get("content", "")
            usage = chunk.get("usage", usage)
    assert text == whole["choices"][0]["message"]["content"]
    assert usage["accepted_tokens_per_step"] == whole["usage"]["accepted_tokens_per_step"]


def test_context_limit_is_a_400(medusa_server):
    response = chat(medusa_server, messages=HELLO, max_tokens=100000)
    assert response.status_code == 400
    assert "context length" in response.json()["error"]["message"]


def test_disconnected_stream_stops_generating(medusa_server):
    engine = medusa_server.app.state.engine
    before = engine.stats()
    long = {"messages": HELLO, "max_tokens": 450, "temperature": 0, "stream": True}
    read_chunks_then_disconnect(medusa_server, long, chunks=3)
    wait_for_cancelled(engine, before)
    # Stopped at the next step: far fewer steps than 450 tokens need (a step accepts at most the tree's depth + 1).
    assert engine.stats()["decode_steps"] - before.get("decode_steps", 0) < 100
    response = chat(medusa_server, messages=HELLO, max_tokens=4, temperature=0)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] <= 4


def test_a_short_request_is_not_held_behind_a_long_one(medusa_server):
    """Draft requests take turns step by step: a short one finishes while a long one is still generating; the
    long one's client then gives up (a non-streamed request) and the server stops it."""
    engine = medusa_server.app.state.engine
    before = engine.stats()

    async def scenario():
        async with httpx.AsyncClient(base_url=medusa_server.url, timeout=120) as client:
            long = asyncio.ensure_future(
                client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 450, "temperature": 0})
            )
            await asyncio.sleep(0.3)  # the long one is generating (450 tokens take seconds here)
            short = await client.post(
                "/v1/chat/completions", json={"messages": MESSAGES[1], "max_tokens": 4, "temperature": 0}
            )
            long_finished = long.done()
            long.cancel()  # the client hangs up
            return short, long_finished

    short, long_finished = asyncio.run(scenario())
    assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] <= 4
    assert not long_finished
    wait_for_cancelled(engine, before)
