"""Issue 25: nothing lost when two runs meet, drafts that work from any folder, one clear error (never a traceback)
at every output or input edge. Real processes, signals, files and servers on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import transformers
from conftest import CORPUS, TINY_CONFIGS, write_conversations
from test_export_eagle3 import draft_folder, target_folder  # noqa: F401 - fixture
from test_pipeline import tiny_config
from test_serve import free_port
from test_train import small_run_flags
from test_user_errors import error_of, heads_folder, unwritable_folder  # noqa: F401 - fixture
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from medusa_forge.cli import main
from medusa_forge.pipeline.runner import STATE_FILE

SRC = str(Path(__file__).resolve().parents[1] / "src")


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


# -- 1: one run per work folder, refused before any stage looks at it ------------------------------------------------


def test_second_pipeline_on_a_running_work_folder_is_refused_and_clears_nothing(tmp_path, tiny_model_dir, capsys):
    config = tiny_config(tmp_path, tiny_model_dir, max_steps=100000, save_steps=2, save_total_limit=1)
    workdir = tmp_path / "work"
    command = [sys.executable, "-m", "medusa_forge.cli", "pipeline", "--config", str(config), "--workdir", str(workdir)]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        deadline = time.monotonic() + 180
        while not list((workdir / "heads").glob("checkpoint-*")):
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-3000:]
            time.sleep(0.2)
        # Another setting makes train "must rerun": before the lock, this cleared the running run's folder.
        second = ["pipeline", "--config", str(config), "--workdir", str(workdir), "--set", "train.learning_rate=0.02"]
        assert main(second) == 2
        err = error_of(capsys)
        holder = f"(pid {first.pid}: medusa-forge pipeline --config {config}"
        assert f"another pipeline run is writing {workdir} {holder}" in err
        assert "give each run its own --workdir" in err
        assert list((workdir / "heads").glob("checkpoint-*")), "the running run's checkpoints were deleted"
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=60) == 130
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert list((workdir / "heads").glob("checkpoint-*"))
    assert not list(workdir.glob(".lock*"))  # released with its holder file


# -- 10: the pipeline's own files ---------------------------------------------------------------------------------


def test_non_utf8_pipeline_config_is_one_clear_error(tmp_path, capsys):
    config = tmp_path / "p.yaml"
    config.write_bytes("model: caf\u00e9\n".encode("latin-1"))
    assert main(["pipeline", "--config", str(config), "--workdir", str(tmp_path / "w")]) == 2
    assert f"{config}: not UTF-8 text (byte 10); save the config as UTF-8" in error_of(capsys)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("content", ['{"stages": {"distill": {"status": "do', "[1, 2]", '{"stages": 3}'])
def test_damaged_pipeline_state_says_how_to_start_over(tmp_path, tiny_model_dir, capsys, content):
    config = tiny_config(tmp_path, tiny_model_dir)
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / STATE_FILE).write_text(content)
    assert main(["pipeline", "--config", str(config), "--workdir", str(workdir)]) == 2
    err = error_of(capsys)
    assert f"{workdir / STATE_FILE} is damaged" in err and "delete it to start over" in err
    assert (workdir / STATE_FILE).read_text() == content  # left for the user to look at


# -- 7: output locations, checked before any work ---------------------------------------------------------------------


@pytest.mark.parametrize("command", ["pipeline", "quickstart"])
@pytest.mark.parametrize("kind", ["file", "unwritable"])
def test_workdir_that_cannot_be_written_is_refused_first(tmp_path, capsys, command, kind):
    if kind == "file":
        workdir = tmp_path / "work.txt"
        workdir.write_text("a file")
        expected = f"--workdir {workdir}: {workdir} is a file, not a folder"
    else:
        workdir = unwritable_folder(tmp_path) / "work"
        expected = f"--workdir {workdir}: cannot write in {workdir}"
    argv = [command, "--workdir", str(workdir), "--set", "model=/nonexistent/model"]
    assert main(argv) == 2
    assert expected in error_of(capsys)


# -- 2: a draft records its local base as an absolute path ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["medusa", "eagle3"])
def test_draft_trained_from_a_relative_base_works_from_any_folder(tmp_path, tiny_model_dir, monkeypatch, capsys, kind):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    shutil.copytree(tiny_model_dir, work / "models" / "A")
    elsewhere.mkdir()
    data = write_conversations(work / "data.json", n=4)
    monkeypatch.chdir(work)
    steps = ["--eagle3_ttt_steps", "2"] if kind == "eagle3" else []
    flags = small_run_flags(Path("models/A"), data, work / "draft", "--max_steps", "1", "--draft_kind", kind,
                            "--medusa_hidden_cache", "False", *steps)  # fmt: skip
    flags[flags.index("--model_name_or_path") + 1] = "models/A"  # as typed, without ./
    assert main(["train", *flags]) == 0
    recorded = json.loads((work / "draft" / "config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(work / "models" / "A")
    monkeypatch.chdir(elsewhere)
    generate = ["generate", "--draft", str(work / "draft"), "--prompt", "Hello", "--max-new-tokens", "4"]
    assert main(generate) == 0
    capsys.readouterr()
    (work / "models" / "A").rename(work / "models" / "moved")  # the base is gone: say so, name --model
    assert main(generate) == 2
    err = error_of(capsys)
    assert f"{work / 'draft' / 'config.json'} records the base model as the local folder {recorded!r}" in err
    assert "pass the base with --model" in err


def test_hub_ids_and_the_alias_are_recorded_as_they_are():
    from medusa_forge.defaults import absolute_if_folder

    assert absolute_if_folder("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert absolute_if_folder("smollm2") == "smollm2"


# -- 3: generate --model OTHER encodes with OTHER's tokenizer, and refuses another vocabulary ----------------------


def other_tokenizer() -> PreTrainedTokenizerFast:
    """As many tokens as the tiny tokenizer, learnt from other text: the same ids mean other tokens."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|im_end|>", "<|im_start|>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator([line[::-1].upper() for line in CORPUS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def test_generate_with_another_base_refuses_a_draft_of_another_tokenizer(
    tmp_path, tiny_model_dir, heads_folder, tiny_tokenizer, capsys  # noqa: F811
):
    tiny_tokenizer.save_pretrained(heads_folder)  # the draft's own tokenizer, as training saves it
    other = shutil.copytree(tiny_model_dir, tmp_path / "other")  # the same sizes and weights...
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (other / name).unlink(missing_ok=True)
    other_tokenizer().save_pretrained(other)  # ...and another tokenizer
    argv = ["generate", "--draft", str(heads_folder), "--prompt", "Hello", "--max-new-tokens", "4"]
    assert main([*argv, "--model", str(other)]) == 2
    err = error_of(capsys)
    assert f"--model {other}: its tokenizer differs from the one the draft in {heads_folder} was trained with" in err
    same = shutil.copytree(tiny_model_dir, tmp_path / "same")  # the base's tokenizer, equal to the draft's
    assert main([*argv, "--model", str(same)]) == 0


# -- 4: serve without --model names the draft's base ---------------------------------------------------------------


def test_serve_a_draft_names_its_real_base(heads_folder, tiny_model_dir):  # noqa: F811
    port = free_port()
    command = [sys.executable, "-m", "medusa_forge.cli", "serve", "--draft", str(heads_folder), "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()[-3000:]
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        models_ = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).json()
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60).json()
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert health.json()["model"] == str(tiny_model_dir)
    assert [m["id"] for m in models_["data"]] == [str(tiny_model_dir)]
    assert reply["model"] == str(tiny_model_dir)


# -- 5 and 6: one compatibility check, in export --base-model-id and in eval -----------------------------------------


@pytest.fixture
def wider_base(tmp_path, tiny_tokenizer) -> Path:
    """A base like the tiny one but of hidden size 48 (8 layers, enough for the engines' EAGLE-3 feature layers)."""
    config = TINY_CONFIGS["llama"](len(tiny_tokenizer))
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 48, 96, 8
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "wider")
    tiny_tokenizer.save_pretrained(tmp_path / "wider")
    return tmp_path / "wider"


@pytest.mark.parametrize("kind", ["medusa", "eagle3"])
def test_export_checks_the_base_model_id_it_writes(tmp_path, request, wider_base, capsys, kind):
    draft = request.getfixturevalue("heads_folder" if kind == "medusa" else "draft_folder")
    argv = ["export", "--draft", str(draft), "--format", "vllm", "--output-dir", str(tmp_path / "out")]
    assert main([*argv, "--base-model-id", str(wider_base)]) == 2
    err = error_of(capsys)
    assert "trained for hidden size 32 and vocabulary" in err and f"base model {wider_base} has hidden size 48" in err
    assert "--base-model-id" in err and not (tmp_path / "out").exists()
    assert main([*argv, "--base-model-id", "acme/not-on-this-machine"]) == 0
    out = capsys.readouterr().out
    assert "note: not checked against base model 'acme/not-on-this-machine': its config.json is not on this" in out


def test_eval_of_an_eagle3_draft_on_a_base_of_another_hidden_size_is_the_one_clear_error(
    tmp_path, draft_folder, wider_base, capsys  # noqa: F811
):
    data = write_conversations(tmp_path / "held.json", n=4)
    argv = ["eval", "--draft", str(draft_folder), "--model", str(wider_base), "--data", str(data), "--max-prompts", "1"]
    assert main([*argv, "--device", "cpu"]) == 2
    err = error_of(capsys)
    assert f"{draft_folder}: EAGLE-3 draft trained for hidden size 32 and vocabulary" in err
    assert f"base model {wider_base} has hidden size 48" in err and "with --model" in err


@contextlib.contextmanager
def read_only(folder: Path):
    """`folder` made read-only for this process: by mode, or as root (which ignores modes) immutable."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        undo = ["chmod", "755", str(folder)]
    else:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("cannot make a folder read-only for root here (no chattr)")
        undo = ["chattr", "-i", str(folder)]
    try:
        yield folder
    finally:
        subprocess.run(undo, check=True)


@pytest.mark.parametrize("command", ["export", "import"])
@pytest.mark.parametrize("kind", ["file", "unwritable"])
def test_export_and_import_output_that_cannot_be_written(tmp_path, heads_folder, capsys, command, kind):  # noqa: F811
    if kind == "file":
        out = tmp_path / "out.txt"
        out.write_text("a file")
        expected = f"--output-dir {out}: {out} is a file, not a folder"
    else:
        out = unwritable_folder(tmp_path) / "out"
        expected = f"--output-dir {out}: cannot write in {out}"
    argv = {
        "export": ["export", "--draft", str(heads_folder), "--format", "tgi", "--output-dir", str(out)],
        "import": ["import", "--from", str(heads_folder), "--output-dir", str(out)],
    }[command]
    assert main(argv) == 2
    assert expected in error_of(capsys)


def test_eval_output_dir_that_cannot_be_written_is_refused_before_measuring(tmp_path, heads_folder, capsys):  # noqa: F811
    data = write_conversations(tmp_path / "held.json", n=4)
    out = unwritable_folder(tmp_path) / "report"
    argv = ["eval", "--draft", str(heads_folder), "--data", str(data), "--output-dir", str(out), "--max-prompts", "1"]
    assert main([*argv, "--model", "/nonexistent/base-that-must-not-be-loaded"]) == 2
    assert f"--output-dir {out}: cannot write in {out}" in error_of(capsys)


def test_eval_into_a_read_only_draft_folder_is_refused_before_measuring(tmp_path, heads_folder, capsys):  # noqa: F811
    data = write_conversations(tmp_path / "held.json", n=4)
    report = tmp_path / "report"
    argv = ["eval", "--draft", str(heads_folder), "--data", str(data), "--output-dir", str(report),
            "--max-prompts", "1", "--max-new-tokens", "4", "--tree-sizes", "2", "--calibration-prompts", "1",
            "--latency-prefix", "8", "--device", "cpu", "--dtype", "float32"]  # fmt: skip
    with read_only(heads_folder):
        assert main(argv) == 2
    err = error_of(capsys)
    assert f"--draft {heads_folder} (eval stores the chosen tree there; --no-save-tree does not): cannot write" in err
    assert not report.exists()  # refused before anything: no empty report folder left behind


# -- 8: a cut base model.safetensors ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["generate", "serve", "train", "distill"])
def test_cut_base_weights_are_one_error_naming_the_file(tmp_path, tiny_model_dir, heads_folder, capsys, command):  # noqa: F811
    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted download
    data = write_conversations(tmp_path / "data.json", n=2)
    argv = {
        "generate": ["generate", "--draft", str(heads_folder), "--model", str(base), "--prompt", "hi"],
        "serve": ["serve", "--model", str(base), "--port", "0"],
        "train": ["train", *small_run_flags(base, data, tmp_path / "out")],
        "distill": ["distill", "--input-filename", str(data), "--output-filename", str(tmp_path / "o.jsonl"),
                    "--model", str(base), "--no-progress"],
    }[command]  # fmt: skip
    assert main(argv) == 2
    err = error_of(capsys)
    assert f"{weights}: not a readable safetensors file" in err and "download or copy it again" in err


# -- 9: damaged draft files, found when the draft loads ----------------------------------------------------------------


@pytest.mark.parametrize("key,value", [("rms_norm_eps", "tiny"), ("rope_theta", None), ("rope_theta", True)])
def test_eagle3_config_values_of_the_wrong_type(tmp_path, draft_folder, capsys, key, value):  # noqa: F811
    config = draft_folder / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), key: value}))
    assert main(["generate", "--draft", str(draft_folder), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    assert f"{config}: {key} must be a positive number, found {value!r}" in error_of(capsys)


def test_corrupt_tokenizer_json_in_a_draft_folder(tmp_path, draft_folder, capsys):  # noqa: F811
    tokenizer = draft_folder / "tokenizer.json"
    tokenizer.write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))  # JSON, but no tokenizer
    assert main(["generate", "--draft", str(draft_folder), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    assert f"{tokenizer}: not a readable tokenizer file" in error_of(capsys)
    tokenizer.write_text('{"version": "1.0", "mod')  # cut short
    assert main(["generate", "--draft", str(draft_folder), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    assert f"{tokenizer}: not a readable tokenizer file" in error_of(capsys)


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_medusa_tree_beyond_the_heads_vocabulary_is_refused_at_load(heads_folder, command):  # noqa: F811
    (heads_folder / "medusa_choices.json").write_text(json.dumps({"medusa_choices": [[0], [0, 0], [1000]]}))
    argv = {
        "generate": ["generate", "--draft", str(heads_folder), "--prompt", "hi", "--max-new-tokens", "2"],
        "serve": ["serve", "--draft", str(heads_folder), "--port", "0"],  # before: started, then 500 to every request
    }[command]
    done = subprocess.run([sys.executable, "-m", "medusa_forge.cli", *argv], capture_output=True, text=True,
                          timeout=120, env=child_env())  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "asks for a head token of rank 1000; the heads propose from 400 tokens" in done.stderr


# -- 11: distill against servers that misbehave ----------------------------------------------------------------------


def test_a_reply_that_is_no_utf8_fails_its_conversation_not_the_run(tmp_path, capsys):
    from test_distill import ScriptedServer, read_jsonl

    data = write_conversations(tmp_path / "in.json", n=3)
    out = tmp_path / "out.jsonl"
    lone = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "ok \ud800 then"},
                         "finish_reason": "stop"}]}  # fmt: skip
    flags = ["--input-filename", str(data), "--output-filename", str(out), "--concurrency", "1", "--no-progress",
             "--max-turns", "1", "--max-retries", "0"]  # fmt: skip
    with ScriptedServer(bodies=[lone]) as server:
        assert main(["distill", *flags, "--url", server.url]) == 1
    err = error_of(capsys)
    assert "failed: 1" in err and "cannot be written as UTF-8" in err
    assert len(read_jsonl(out)) == 2  # the other conversations are kept


class TricklingServer:
    """Answers every request with headers and then one byte a second, forever (until closed)."""

    def __init__(self) -> None:
        import socketserver

        stop = self.stop = threading.Event()

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.recv(65536)
                self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
                self.request.sendall(b"Content-Length: 1000\r\n\r\n")
                while not stop.wait(1.0):
                    try:
                        self.request.sendall(b" ")
                    except OSError:
                        return

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> TricklingServer:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


def test_distill_timeout_bounds_the_whole_request(tmp_path, capsys):
    data = write_conversations(tmp_path / "in.json", n=1)
    flags = ["--input-filename", str(data), "--output-filename", str(tmp_path / "out.jsonl"), "--no-progress",
             "--max-retries", "0", "--timeout", "2", "--model", "m"]  # fmt: skip
    with TricklingServer() as server:
        start = time.monotonic()
        assert main(["distill", *flags, "--url", server.url]) == 1
        seconds = time.monotonic() - start
    assert seconds < 15, f"--timeout 2 waited {seconds:.0f} s"
    assert "no complete reply within --timeout 2 s" in error_of(capsys)


# -- 12: the smaller ones ---------------------------------------------------------------------------------------------


def test_generate_seed_beyond_64_bits_is_refused(heads_folder, capsys):  # noqa: F811
    argv = ["generate", "--draft", str(heads_folder), "--prompt", "hi", "--temperature", "1", "--seed", str(2**64)]
    assert main(argv) == 2
    assert f"--seed {2**64}: expected {-(2**63)}..{2**64 - 1}" in error_of(capsys)


def test_pipeline_model_max_length_zero_is_refused_before_distill(tmp_path, tiny_model_dir, capsys):
    config = tiny_config(tmp_path, tiny_model_dir)
    workdir = tmp_path / "work"
    argv = ["pipeline", "--config", str(config), "--workdir", str(workdir), "--set", "train.model_max_length=0"]
    assert main(argv) == 2
    assert "--model_max_length 0: must be at least 2" in error_of(capsys)
    assert not workdir.exists()  # nothing ran


@pytest.mark.parametrize(
    "kind,flag,value,other",
    [("medusa", "--eagle3_ttt_steps", "3", "EAGLE-3 draft"), ("eagle3", "--medusa_num_heads", "5", "Medusa heads"),
     ("eagle3", "--medusa_soft_labels", "True", "Medusa heads")],
)  # fmt: skip
def test_flags_of_the_other_kind_are_refused_naming_it(tmp_path, capsys, kind, flag, value, other):
    data = write_conversations(tmp_path / "data.json", n=2)
    flags = small_run_flags("/nonexistent/model", data, tmp_path / "out", "--draft_kind", kind, flag, value)
    assert main(["train", *flags]) == 2
    assert f"{flag} {value}: applies to {other}" in error_of(capsys)
    assert not (tmp_path / "out").exists()


def test_shared_and_default_valued_flags_stay_accepted():
    from medusa_forge.train.args import parse_args

    shared = ["--medusa_hidden_cache", "False", "--medusa_loss_chunk_size", "256", "--medusa_num_heads", "3"]
    assert parse_args(["--draft_kind", "eagle3", *shared]).medusa_loss_chunk_size == 256
    assert parse_args(["--medusa_num_heads", "4", "--medusa_soft_labels", "True"]).medusa_num_heads == 4


def test_data_nested_100000_deep_is_one_clear_error(tmp_path, capsys):
    data = tmp_path / "deep.json"
    data.write_text("[" * 100_000 + "]" * 100_000)
    assert main(["train", *small_run_flags("/nonexistent/model", data, tmp_path / "out")]) == 2
    assert f"{data}: lists or objects nested thousands of levels deep" in error_of(capsys)


def test_a_failed_train_leaves_no_empty_default_output_folder(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """What left an empty medusa-heads/ in the repository: a train test without --output_dir whose data was missing."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--model_name_or_path", str(tiny_model_dir), "--data_path", "no-such.json"]) == 2
    assert "data file 'no-such.json' not found" in error_of(capsys)
    assert list(tmp_path.iterdir()) == []
