"""`medusa-forge distill` end to end: real files, real loopback HTTP (a scripted fault-injecting server and
`serve` on a tiny model), and the in-process backend."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from conftest import PROMPTS, write_conversations, write_prompt_files
from test_serve import ServerThread, free_port

from medusa_forge.cli import main
from medusa_forge.data.conversations import load_conversations
from medusa_forge.generation.hf import HFGenerator
from medusa_forge.serve import create_app


class ScriptedServer:
    """A minimal OpenAI-compatible server: replies "reply N to: <last user text>" (N = user turns so far),
    after first answering with the scripted failure statuses, one per request, in order; `bodies` are sent (status
    200) instead of the first successful replies, in order."""

    def __init__(
        self, failures: list[int] | None = None, error_message: str = "scripted failure", bodies: list | None = None
    ):
        self.failures = list(failures or [])
        self.bodies = list(bodies or [])
        self.error_message = error_message
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                outer._send(self, 200, {"object": "list", "data": [{"id": "scripted-model", "object": "model"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append({"body": body, "auth": self.headers.get("Authorization")})
                    status = outer.failures.pop(0) if outer.failures else 200
                    body_200 = outer.bodies.pop(0) if status == 200 and outer.bodies else None
                if body_200 is not None:
                    outer._send(self, 200, body_200)
                    return
                if status != 200:
                    headers = {"Retry-After": "0"} if status == 429 else {}
                    outer._send(self, status, {"error": {"message": outer.error_message}}, headers)
                    return
                users = [m for m in body["messages"] if m["role"] == "user"]
                text = f"reply {len(users)} to: {users[-1]['content']}"
                outer._send(
                    self,
                    200,
                    {
                        "object": "chat.completion",
                        "choices": [
                            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                        ],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4},
                    },
                )

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @staticmethod
    def _send(handler, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.end_headers()
        handler.wfile.write(data)

    def __enter__(self) -> ScriptedServer:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def distill(*flags: str) -> int:
    return main(["distill", *flags, "--no-progress", "--retry-base", "0.01"])


def test_replay_keeps_user_turns_and_replaces_assistant_turns(tmp_path, capsys):
    records = [
        {
            "id": "mixed",
            "messages": [
                {"role": "assistant", "content": "leading assistant turn: dropped"},
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "first question"},
                {"role": "assistant", "content": "original answer 1"},
                {"role": "user", "content": "second question"},
                {"role": "user", "content": "third, right after"},
                {"role": "assistant", "content": "original answer 3"},
            ],
        }
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = tmp_path / "out.jsonl"
    with ScriptedServer() as server:
        assert distill("--input-filename", str(source), "--output-filename", str(out), "--url", server.url) == 0
    [record] = read_jsonl(out)
    assert record == {
        "id": "mixed",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "reply 1 to: first question"},
            {"role": "user", "content": "second question"},
            {"role": "assistant", "content": "reply 2 to: second question"},
            {"role": "user", "content": "third, right after"},
            {"role": "assistant", "content": "reply 3 to: third, right after"},
        ],
    }
    # Each request carried the history so far, with the model's own earlier replies.
    sent = [r["body"]["messages"] for r in server.requests]
    assert sent == [record["messages"][:2], record["messages"][:4], record["messages"][:6]]
    assert all(r["body"]["model"] == "scripted-model" for r in server.requests)  # discovered via /v1/models
    assert all(r["body"]["temperature"] == 0 and "top_p" not in r["body"] for r in server.requests)
    assert "done: 1 conversations" in capsys.readouterr().err


def test_max_turns_max_samples_and_api_key(tmp_path, monkeypatch):
    source = write_conversations(tmp_path / "in.json", n=5)
    out = tmp_path / "out.jsonl"
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    with ScriptedServer() as server:
        flags = ["--input-filename", str(source), "--output-filename", str(out), "--url", server.url]
        assert distill(*flags, "--max-turns", "1", "--max-samples", "3", "--temperature", "0.7", "--top-p", "0.9") == 0
    records = read_jsonl(out)
    sent = [r["body"] for r in server.requests]
    assert all(b["temperature"] == 0.7 and b["top_p"] == 0.9 for b in sent)
    assert len({b["seed"] for b in sent}) == 3  # a distinct, stable seed per conversation turn
    assert sorted(r["id"] for r in records) == ["conv0", "conv1", "conv2"]
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in records)
    assert {r["auth"] for r in server.requests} == {"Bearer hf_secret"}


def test_5xx_and_429_are_retried(tmp_path):
    source = write_conversations(tmp_path / "in.json", n=4)
    out = tmp_path / "out.jsonl"
    with ScriptedServer(failures=[503, 429, 500, 502, 429]) as server:
        flags = ["--input-filename", str(source), "--output-filename", str(out), "--url", server.url]
        assert distill(*flags, "--concurrency", "2") == 0
    assert sorted(r["id"] for r in read_jsonl(out)) == [f"conv{i}" for i in range(4)]
    assert len(server.requests) == 4 * 2 + 5  # every turn answered once, plus one retry per failure


def test_exhausted_retries_fail_the_conversation_and_resume_redoes_it(tmp_path, capsys):
    source = write_conversations(tmp_path / "in.json", n=3)
    out = tmp_path / "out.jsonl"
    flags = ["--input-filename", str(source), "--output-filename", str(out), "--concurrency", "1"]
    with ScriptedServer(failures=[503, 503, 503], error_message="overloaded") as server:
        assert distill(*flags, "--url", server.url, "--max-retries", "2") == 1
        err = capsys.readouterr().err
        assert "failed: 1" in err and "conv0" in err and "overloaded" in err
        assert sorted(r["id"] for r in read_jsonl(out)) == ["conv1", "conv2"]
        assert distill(*flags, "--url", server.url, "--resume") == 0
    assert "resuming (2 conversations done" in capsys.readouterr().err
    assert sorted(r["id"] for r in read_jsonl(out)) == ["conv0", "conv1", "conv2"]


def test_4xx_stops_the_run_with_the_server_message(tmp_path, capsys):
    source = write_conversations(tmp_path / "in.json", n=3)
    out = tmp_path / "out.jsonl"
    with ScriptedServer(failures=[401] * 10, error_message="invalid API key") as server:
        rc = distill("--input-filename", str(source), "--output-filename", str(out), "--url", server.url)
    err = capsys.readouterr().err
    assert rc == 2 and "HTTP 401: invalid API key" in err and "Traceback" not in err
    assert len(server.requests) <= 16  # no retries of a 4xx: each in-flight conversation asked once
    assert out.read_text() == ""


def test_requests_spread_over_several_urls_and_route_around_a_dead_one(tmp_path):
    source = write_conversations(tmp_path / "in.json", n=6)
    out = tmp_path / "out.jsonl"
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with ScriptedServer() as first, ScriptedServer() as second:
        flags = ["--input-filename", str(source), "--output-filename", str(out)]
        urls = ["--url", first.url, "--url", dead, "--url", second.url + "/v1/chat/completions"]
        assert distill(*flags, *urls, "--concurrency", "3") == 0
    assert sorted(r["id"] for r in read_jsonl(out)) == [f"conv{i}" for i in range(6)]
    assert len(first.requests) >= 3 and len(second.requests) >= 3
    assert len(first.requests) + len(second.requests) == 12  # each turn answered once


def test_shards_partition_the_input(tmp_path):
    source = write_conversations(tmp_path / "in.json", n=10)
    seen = []
    with ScriptedServer() as server:
        for index in range(3):
            out = tmp_path / f"shard{index}.jsonl"
            flags = ["--input-filename", str(source), "--output-filename", str(out), "--url", server.url]
            assert distill(*flags, "--shard", f"{index}/3") == 0
            seen.append([r["id"] for r in read_jsonl(out)])
    all_ids = [i for ids in seen for i in ids]
    assert sorted(all_ids) == sorted(f"conv{i}" for i in range(10))  # every conversation, exactly once
    assert all(3 <= len(ids) <= 4 for ids in seen)


@pytest.mark.parametrize("shard", ["3/3", "1-3", "0/0"])
def test_bad_shard_is_a_clear_error(tmp_path, capsys, shard):
    source = write_conversations(tmp_path / "in.json", n=2)
    assert (
        distill("--input-filename", str(source), "--output-filename", str(tmp_path / "o.jsonl"), "--shard", shard) == 2
    )
    assert f"--shard {shard!r}" in capsys.readouterr().err


def test_malformed_input_names_the_record(tmp_path, capsys):
    good = {"id": "ok", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    bad = {"id": "broken", "conversations": [{"from": "human"}]}
    source = tmp_path / "in.json"
    source.write_text(json.dumps([good, good, bad]))
    assert distill("--input-filename", str(source), "--output-filename", str(tmp_path / "o.jsonl")) == 2
    err = capsys.readouterr().err
    assert "record 2" in err and str(source) in err and "Traceback" not in err
    lines = tmp_path / "in.jsonl"
    lines.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n{oops\n")
    assert distill("--input-filename", str(lines), "--output-filename", str(tmp_path / "o.jsonl")) == 2
    assert "line 3" in capsys.readouterr().err


def test_torn_last_line_is_redone_and_nothing_is_written_twice(tmp_path, capsys):
    source = write_conversations(tmp_path / "in.json", n=4)
    out = tmp_path / "out.jsonl"
    flags = ["--input-filename", str(source), "--output-filename", str(out)]
    with ScriptedServer() as server:
        assert distill(*flags, "--url", server.url) == 0
        full = out.read_text().splitlines(keepends=True)
        by_id = {json.loads(line)["id"]: line for line in full}
        # A crash mid-write: two complete lines, then half of a third.
        out.write_text(by_id["conv0"] + by_id["conv1"] + by_id["conv2"][:25])
        assert distill(*flags, "--url", server.url) == 0
        assert "torn last line was cut away" in capsys.readouterr().err
        ids = [r["id"] for r in read_jsonl(out)]
        assert sorted(ids) == ["conv0", "conv1", "conv2", "conv3"]
        # A complete run: resume has nothing to do and asks the server nothing.
        asked = len(server.requests)
        assert distill(*flags, "--url", server.url) == 0
        assert len(server.requests) == asked and len(read_jsonl(out)) == 4


def test_existing_foreign_output_is_not_clobbered(tmp_path, capsys):
    source = write_conversations(tmp_path / "in.json", n=2)
    out = tmp_path / "out.jsonl"
    out.write_text('{"something": "else"}\n{"id": "x"}\n')
    assert distill("--input-filename", str(source), "--output-filename", str(out), "--url", "http://127.0.0.1:9") == 2
    assert "line 1 is not a distill record" in capsys.readouterr().err
    assert out.read_text() == '{"something": "else"}\n{"id": "x"}\n'


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_output_is_readable_by_training(tmp_path, suffix):
    source = write_conversations(tmp_path / "in.json", n=5, sharegpt=False)
    out = tmp_path / f"distilled{suffix}"
    with ScriptedServer() as server:
        assert distill("--input-filename", str(source), "--output-filename", str(out), "--url", server.url) == 0
    loaded = load_conversations(str(out))
    assert sorted(c.id for c in loaded) == [str(i) for i in range(5)]
    for conversation in loaded:
        assert [m["role"] for m in conversation.messages] == ["user", "assistant"] * 2
        assert conversation.messages[1]["content"].startswith("reply 1 to: Question")
    if suffix == ".json":
        assert [c.id for c in loaded] == [str(i) for i in range(5)]  # input order
        assert not list(tmp_path.glob("distilled.json.*"))  # no progress or lock file left behind


def test_json_output_resumes_from_progress_file(tmp_path):
    source = write_conversations(tmp_path / "in.json", n=4)
    out = tmp_path / "out.json"
    progress = tmp_path / "out.json.progress.jsonl"
    flags = ["--input-filename", str(source), "--output-filename", str(out)]
    with ScriptedServer() as server:
        assert distill(*flags, "--url", server.url, "--max-samples", "2") == 0  # a first, smaller run
        assert [r["id"] for r in json.loads(out.read_text())] == ["conv0", "conv1"]
        # An interrupted second run left one finished conversation in the progress file.
        progress.write_text(json.dumps({"id": "conv3", "messages": [{"role": "user", "content": "kept"}]}) + "\n")
        assert distill(*flags, "--url", server.url) == 0
        asked = [r["body"]["messages"][-1]["content"] for r in server.requests]
    final = json.loads(out.read_text())
    assert [r["id"] for r in final] == ["conv0", "conv1", "conv2", "conv3"]
    assert final[3]["messages"] == [{"role": "user", "content": "kept"}]  # not redone
    assert sum(text.startswith("Question 3") for text in asked) == 0
    assert not progress.exists()


# --- against the real `serve` on a tiny model -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir):
    generator = HFGenerator.load(str(tiny_model_dir))
    with ServerThread(create_app(generator, "tiny", max_batch_size=8, batch_wait_ms=10)) as server:
        server.generator = generator
        yield server


def test_replay_against_serve_uses_the_models_own_replies(tmp_path, tiny_server):
    source = write_conversations(tmp_path / "in.json", n=3)
    out = tmp_path / "out.jsonl"
    flags = ["--input-filename", str(source), "--output-filename", str(out), "--url", tiny_server.url + "/v1"]
    assert distill(*flags, "--max-new-tokens", "6") == 0
    originals = {c.id: c for c in load_conversations(str(source))}
    for record in read_jsonl(out):
        messages = record["messages"]
        original_users = [m["content"] for m in originals[record["id"]].messages if m["role"] == "user"]
        assert [m["content"] for m in messages if m["role"] == "user"] == original_users
        for turn in range(1, len(messages), 2):  # each reply is what the server says to that exact history
            expected = httpx.post(
                f"{tiny_server.url}/v1/chat/completions",
                json={"messages": messages[:turn], "max_tokens": 6, "temperature": 0},
                timeout=60,
            ).json()["choices"][0]["message"]["content"]
            assert messages[turn] == {"role": "assistant", "content": expected}


def test_concurrency_gives_the_same_records(tmp_path, tiny_server):
    source = write_conversations(tmp_path / "in.json", n=8)
    results = {}
    for concurrency in (1, 4):
        out = tmp_path / f"c{concurrency}.jsonl"
        flags = ["--input-filename", str(source), "--output-filename", str(out), "--url", tiny_server.url]
        assert distill(*flags, "--max-new-tokens", "4", "--concurrency", str(concurrency)) == 0
        records = read_jsonl(out)
        assert len(records) == len({r["id"] for r in records}) == 8
        results[concurrency] = {r["id"]: [m["content"] for m in r["messages"] if m["role"] == "user"] for r in records}
    assert results[1] == results[4]


def _start_serve(model_dir: Path, port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "medusa_forge.cli", "serve", "--model", str(model_dir), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("serve did not come up")


def test_server_killed_mid_run_then_resume_gives_every_record_once(tmp_path, tiny_model_dir):
    source = write_conversations(tmp_path / "in.json", n=40)
    out = tmp_path / "out.jsonl"
    port = free_port()
    flags = ["--input-filename", str(source), "--output-filename", str(out), "--url", f"http://127.0.0.1:{port}"]
    flags += ["--max-new-tokens", "48", "--concurrency", "2", "--max-retries", "1"]
    server = _start_serve(tiny_model_dir, port)
    outcome = {}
    run = threading.Thread(target=lambda: outcome.setdefault("rc", distill(*flags)))
    try:
        run.start()
        while not out.exists() or out.read_text().count("\n") < 3:
            assert run.is_alive(), "the run finished before the server could be killed"
            time.sleep(0.005)
        server.send_signal(signal.SIGKILL)
        server.wait()
        run.join(timeout=120)
    finally:
        server.kill()
    first = read_jsonl(out)
    assert outcome["rc"] == 1 and 3 <= len(first) < 40
    server = _start_serve(tiny_model_dir, port)
    try:
        assert distill(*flags, "--resume") == 0
    finally:
        server.kill()
        server.wait()
    ids = [r["id"] for r in read_jsonl(out)]
    assert sorted(ids) == sorted(f"conv{i}" for i in range(40)) and len(ids) == 40
    assert read_jsonl(out)[: len(first)] == first  # earlier work kept as it was


# --- in-process backend -------------------------------------------------------------------------------------


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_in_process_backend_batches_and_writes_every_conversation(tmp_path, tiny_model_dir, capsys, batching):
    source = write_conversations(tmp_path / "in.json", n=6)
    out = tmp_path / "out.jsonl"
    flags = ["--input-filename", str(source), "--output-filename", str(out), "--model", str(tiny_model_dir)]
    assert distill(*flags, "--max-new-tokens", "5", "--concurrency", "4", "--batching", batching) == 0
    records = read_jsonl(out)
    assert sorted(r["id"] for r in records) == [f"conv{i}" for i in range(6)]
    for record in records:
        assert [m["role"] for m in record["messages"]] == ["user", "assistant"] * 2
        assert all(m["content"] for m in record["messages"])
    assert f"in-process model {str(tiny_model_dir)!r} on cpu ({batching} batching)" in capsys.readouterr().err


def test_in_process_conversation_ends_at_the_context_limit(tmp_path, tiny_model_dir, capsys):
    source = write_conversations(tmp_path / "in.json", n=1)
    out = tmp_path / "out.jsonl"
    flags = ["--input-filename", str(source), "--output-filename", str(out), "--model", str(tiny_model_dir)]
    # The tiny model's context is 512: the first turn fits with 400 new tokens, the second cannot.
    assert distill(*flags, "--max-new-tokens", "400") == 0
    [record] = read_jsonl(out)
    assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
    assert "ended early at the model's context limit: 1" in capsys.readouterr().err


def test_max_context_skips_what_cannot_fit_and_cuts_the_rest(tmp_path, tiny_model_dir, capsys):
    """--max-context (training's model_max_length): no reply is generated that training would cut away."""
    records = [
        {"id": "long", "conversations": [{"from": "human", "value": "word " * 200}, {"from": "gpt", "value": "x"}]},
        {"id": "short", "conversations": [
            {"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "x"},
            {"from": "human", "value": "word " * 40}, {"from": "gpt", "value": "y"},
        ]},
    ]  # fmt: skip
    source = tmp_path / "in.json"
    source.write_text(json.dumps(records))
    out = tmp_path / "out.jsonl"
    flags = ["--input-filename", str(source), "--output-filename", str(out), "--model", str(tiny_model_dir)]
    assert distill(*flags, "--max-new-tokens", "8", "--max-context", "40") == 0  # skipping is not failing
    [record] = read_jsonl(out)
    assert record["id"] == "short" and [m["role"] for m in record["messages"]] == ["user", "assistant"]
    err = capsys.readouterr().err
    assert "skipped 1 (first user turn longer than the context)" in err
    assert "ended early at the model's context limit: 1" in err
    assert distill(*flags, "--max-new-tokens", "8", "--max-context", "8") == 2
    assert "--max-context must be larger than --max-new-tokens" in capsys.readouterr().err


def test_overwrite_starts_over_and_a_second_writer_is_refused(tmp_path, capsys):
    from medusa_forge.distill.store import OutputStore

    source = write_conversations(tmp_path / "in.json", n=2)
    out = tmp_path / "out.jsonl"
    flags = ["--input-filename", str(source), "--output-filename", str(out)]
    with ScriptedServer() as server:
        assert distill(*flags, "--url", server.url) == 0
        assert distill(*flags, "--url", server.url, "--overwrite") == 0
        assert len(server.requests) == 2 * 4  # everything asked twice
        assert sorted(r["id"] for r in read_jsonl(out)) == ["conv0", "conv1"]  # and written once
        holder = OutputStore(out)
        holder.open()
        try:
            assert distill(*flags, "--url", server.url) == 2
            assert "another distill run is writing" in capsys.readouterr().err
        finally:
            holder.close()


def test_a_400_about_context_length_ends_that_conversation_only(tmp_path, capsys):
    source = write_conversations(tmp_path / "in.json", n=2)
    out = tmp_path / "out.jsonl"
    message = "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens."
    with ScriptedServer(failures=[200, 400], error_message=message) as server:  # conv0's second turn is too long
        flags = ["--input-filename", str(source), "--output-filename", str(out), "--url", server.url]
        assert distill(*flags, "--concurrency", "1") == 0
    records = {r["id"]: r["messages"] for r in read_jsonl(out)}
    assert [m["role"] for m in records["conv0"]] == ["user", "assistant"]  # kept up to its last complete turn
    assert [m["role"] for m in records["conv1"]] == ["user", "assistant"] * 2
    assert "ended early at the model's context limit: 1" in capsys.readouterr().err


def test_prompt_only_files_are_distilled_into_training_data(tmp_path, tiny_model_dir):
    prompts, files = PROMPTS, write_prompt_files(tmp_path)
    with ScriptedServer() as server:
        for path, ids in zip(files, [["0", "1", "2"], ["0", "1", "2"], ["q0", "q1", "q2"]], strict=True):
            expected = [
                {
                    "id": i,
                    "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": f"reply 1 to: {p}"}],
                }
                for i, p in zip(ids, prompts, strict=True)
            ]
            out = tmp_path / f"{path.stem}.out.jsonl"
            assert distill("--input-filename", str(path), "--output-filename", str(out), "--url", server.url) == 0
            assert sorted(read_jsonl(out), key=lambda r: r["id"]) == expected
            assert len(load_conversations(str(out))) == 3  # what train reads: replies included
    out = tmp_path / "in_process.jsonl"  # the model generates the replies itself
    flags = ["--input-filename", str(files[0]), "--output-filename", str(out), "--model", str(tiny_model_dir)]
    assert distill(*flags, "--max-new-tokens", "5") == 0
    records = sorted(read_jsonl(out), key=lambda r: r["id"])
    assert [r["messages"][0] for r in records] == [{"role": "user", "content": p} for p in prompts]
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in records)
