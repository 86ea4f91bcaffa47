"""Issue 14, items 4-11: user mistakes end in one clear `error: ...` line (exit 2) naming the file or flag, never a
traceback, and bad data is never trained on or written silently. Real files, real subprocesses and signals, a real
HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import write_conversations
from test_distill import ScriptedServer, read_jsonl
from test_export_eagle3 import draft_folder  # noqa: F401 - fixture
from test_train import small_run_flags

from medusa_forge.cli import main
from medusa_forge.drafts.medusa_heads import WEIGHTS_NAME, MedusaHeads
from medusa_forge.modeling import load_base_model

SRC = str(Path(__file__).resolve().parents[1] / "src")


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write: read-only by mode, or (root ignores modes) one under /sys."""
    if os.geteuid() == 0:
        return Path("/sys")
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def error_of(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# -- 4: a corrupted weights file in a draft folder ------------------------------------------------------------------


@pytest.fixture
def heads_folder(tmp_path, tiny_model_dir) -> Path:
    heads = MedusaHeads.for_base_model(load_base_model(str(tiny_model_dir)), 2, 1, str(tiny_model_dir))
    heads.save(tmp_path / "heads")
    return tmp_path / "heads"


def corrupt(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a copy cut short: the header promises more than the file holds
    return path


@pytest.mark.parametrize(
    "command",
    [
        ["import", "--from", "{heads}", "--output-dir", "{tmp}/out"],
        ["export", "--heads", "{heads}", "--format", "tgi", "--output-dir", "{tmp}/out"],
        ["export", "--heads", "{heads}", "--format", "vllm", "--output-dir", "{tmp}/out"],
        ["push", "--folder", "{heads}", "--repo", "acme/heads", "--dry-run"],
        ["serve", "--heads", "{heads}", "--model", "/nonexistent/base-that-must-not-be-loaded"],
        ["generate", "--heads", "{heads}", "--prompt", "hi"],
    ],
)
def test_corrupted_heads_file_is_one_clear_error(tmp_path, heads_folder, capsys, command):
    weights = corrupt(heads_folder / WEIGHTS_NAME)
    argv = [part.format(heads=heads_folder, tmp=tmp_path) for part in command]
    assert main(argv) == 2
    err = error_of(capsys)
    assert f"{weights}: not a readable safetensors file" in err and "re-create or re-download" in err
    assert not (tmp_path / "out").exists()


def test_corrupted_eagle3_draft_is_one_clear_error(tmp_path, draft_folder, capsys):  # noqa: F811
    weights = corrupt(draft_folder / "model.safetensors")
    assert main(["export", "--heads", str(draft_folder), "--format", "vllm", "--output-dir", str(tmp_path / "o")]) == 2
    assert f"{weights}: not a readable safetensors file" in error_of(capsys)


# -- 5: train's flags and output folder, checked before the model loads ----------------------------------------------


def test_train_batch_size_zero_is_refused(tmp_path, capsys):
    data = write_conversations(tmp_path / "data.json", n=2)
    flags = small_run_flags("/nonexistent/model", data, tmp_path / "out")
    flags[flags.index("--per_device_train_batch_size") + 1] = "0"
    assert main(["train", *flags]) == 2
    assert "--per_device_train_batch_size 0: must be at least 1" in error_of(capsys)


@pytest.mark.parametrize("kind", ["file", "unwritable"])
def test_train_output_dir_that_cannot_hold_the_heads_is_refused_before_loading(tmp_path, capsys, kind):
    data = write_conversations(tmp_path / "data.json", n=2)
    if kind == "file":
        out = tmp_path / "heads.txt"
        out.write_text("not a folder")
        expected = f"--output_dir {out}: {out} is a file, not a folder"
    else:
        out = unwritable_folder(tmp_path) / "out"
        expected = f"--output_dir {out}: cannot write in {out}"
    # The model named does not exist: the folder check must come first.
    assert main(["train", *small_run_flags("/nonexistent/model", data, out)]) == 2
    assert expected in error_of(capsys)


@pytest.fixture(scope="module")
def two_head_run(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    """A finished 2-head run with checkpoints, written under umask 022."""
    tmp = tmp_path_factory.mktemp("two-heads")
    data = write_conversations(tmp / "data.json", n=4)
    flags = small_run_flags(tiny_model_dir, data, tmp / "out", "--max_steps", "2", "--save_steps", "1",
                            "--keep_checkpoints", "True")  # fmt: skip
    flags[flags.index("--medusa_num_heads") + 1] = "2"
    old = os.umask(0o022)
    try:
        assert main(["train", *flags]) == 0
    finally:
        os.umask(old)
    return tmp / "out", data


def test_rerun_with_another_head_count_says_so_and_how_to_start_over(two_head_run, tiny_model_dir, tmp_path, capsys):
    out, data = tmp_path / "out", two_head_run[1]
    shutil.copytree(two_head_run[0], out)
    flags = small_run_flags(tiny_model_dir, data, out, "--max_steps", "4", "--save_steps", "1")  # 3 heads now
    assert main(["train", *flags]) == 2
    err = error_of(capsys)
    assert f"{out / 'checkpoint-2'} holds a draft of another shape" in err
    assert "--overwrite_output_dir" in err and "another --output_dir" in err
    assert main(["train", *flags, "--overwrite_output_dir", "True", "--save_strategy", "no"]) == 0
    assert not list(out.glob("checkpoint-*")) and len(MedusaHeads.load(out)) == 3


# -- 5 and 11: one run per output folder; SIGINT ends with one line -------------------------------------------------


def test_second_train_on_the_same_folder_is_refused_and_sigint_ends_cleanly(tmp_path, tiny_model_dir, capsys):
    data = write_conversations(tmp_path / "data.json", n=8)
    out = tmp_path / "out"
    flags = small_run_flags(tiny_model_dir, data, out, "--max_steps", "100000", "--save_steps", "1000000")
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    first = subprocess.Popen(
        [sys.executable, "-m", "medusa_forge.cli", "train", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(first.stdout), daemon=True)
        reader.start()
        deadline = time.monotonic() + 120
        while not any(line.startswith("step 2 ") for line in lines):
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-3000:]
            time.sleep(0.2)
        assert main(["train", *flags]) == 2
        assert f"another train run is writing {out}" in error_of(capsys)
        first.send_signal(signal.SIGINT)
        stderr = first.communicate(timeout=60)[1]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 130
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert stderr.rstrip().splitlines()[-1] == "interrupted; rerun the same command to resume"


# -- 6 and 10: the data file itself ----------------------------------------------------------------------------------


def test_non_utf8_data_names_the_file_and_byte(tmp_path, capsys):
    data = tmp_path / "latin1.json"
    text = json.dumps([{"id": "a", "conversations": [{"from": "human", "value": "caf\u00e9"}]}], ensure_ascii=False)
    data.write_bytes(text.encode("latin-1"))
    offset = text.encode("latin-1").index(b"\xe9")
    expected = f"{data}: not UTF-8 text (byte {offset} is 0xe9)"
    assert main(["train", *small_run_flags("/nonexistent/model", data, tmp_path / "out")]) == 2
    assert expected in error_of(capsys)
    assert main(["distill", "--input-filename", str(data), "--output-filename", str(tmp_path / "o.jsonl")]) == 2
    assert expected in error_of(capsys)


def truncated_file(tmp_path: Path) -> tuple[Path, int]:
    full = write_conversations(tmp_path / "full.json", n=6).read_bytes()
    cut = full.index(b'"conv2"') + 20  # in the middle of the third record
    path = tmp_path / "cut.json"
    path.write_bytes(full[:cut])
    return path, full.rindex(b"{", 0, full.index(b'"conv2"'))


def test_truncated_user_data_is_an_error_unless_recovery_is_asked(tmp_path, capsys, caplog):
    data, start = truncated_file(tmp_path)
    expected = f"{data}: the file ends in the middle of record 2 (byte {start})"
    flags = small_run_flags("/nonexistent/model", data, tmp_path / "out")
    assert main(["train", *flags]) == 2
    err = error_of(capsys)
    assert expected in err and "--recover_truncated_data" in err
    assert main(["distill", "--input-filename", str(data), "--output-filename", str(tmp_path / "o.jsonl")]) == 2
    err = error_of(capsys)
    assert expected in err and "--recover-truncated-data" in err
    with ScriptedServer() as server:
        rc = main(["distill", "--input-filename", str(data), "--output-filename", str(tmp_path / "o.jsonl"),
                   "--url", server.url, "--recover-truncated-data", "--no-progress"])  # fmt: skip
    assert rc == 0 and sorted(r["id"] for r in read_jsonl(tmp_path / "o.jsonl")) == ["conv0", "conv1"]  # any order
    assert "recovered 2 complete records" in caplog.text


def test_skipped_records_are_named(tmp_path, caplog):
    from medusa_forge.data.conversations import load_conversations

    data = write_conversations(tmp_path / "data.json", n=4)
    records = json.loads(data.read_text())
    records[1]["conversations"][0]["from"] = "narrator"
    records[3]["conversations"] = records[3]["conversations"][:1]
    data.write_text(json.dumps(records))
    assert len(load_conversations(str(data))) == 2
    assert f"{data}: skipped 2 records" in caplog.text
    assert "record 1 (id conv1)" in caplog.text and "record 3 (id conv3)" in caplog.text


# -- 7 and 8: distill's output and flags, model paths --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["folder", "unwritable"])
def test_distill_output_that_cannot_be_written(tmp_path, capsys, kind):
    data = write_conversations(tmp_path / "in.json", n=2)
    out = tmp_path if kind == "folder" else unwritable_folder(tmp_path) / "out.jsonl"
    expected = f"--output-filename {out}: " + ("is a folder" if kind == "folder" else "cannot write in")
    assert main(["distill", "--input-filename", str(data), "--output-filename", str(out), "--url", "http://x"]) == 2
    assert expected in error_of(capsys)


@pytest.mark.parametrize(
    "flags,message",
    [(["--timeout", "0"], "--timeout must be > 0"), (["--timeout", "-1"], "--timeout must be > 0"),
     (["--retry-base", "-0.5"], "--retry-base must be >= 0")],
)  # fmt: skip
def test_distill_refuses_timeouts_and_back_off_that_cannot_work(tmp_path, capsys, flags, message):
    assert main(["distill", "--input-filename", "x", "--output-filename", str(tmp_path / "o"), *flags]) == 2
    assert message in error_of(capsys)


@pytest.mark.parametrize("name", ["/nonexistent/model", "./no-such-model", "../no/model", "~/no-such-model"])
@pytest.mark.parametrize("command", ["train", "distill", "serve", "generate", "eval"])
def test_path_like_model_that_does_not_exist_is_no_such_folder(tmp_path, heads_folder, capsys, command, name):
    data = write_conversations(tmp_path / "data.json", n=2)
    argv = {
        "train": ["train", *small_run_flags(name, data, tmp_path / "out")],
        "distill": ["distill", "--input-filename", str(data), "--output-filename", str(tmp_path / "o"),
                    "--model", name],
        "serve": ["serve", "--model", name],
        "generate": ["generate", "--heads", str(heads_folder), "--prompt", "hi", "--model", name],
        "eval": ["eval", "--heads", str(heads_folder), "--data", str(data), "--model", name],
    }[command]  # fmt: skip
    assert main(argv) == 2
    err = error_of(capsys)
    assert f"model {name!r}: no such folder ({Path(name).expanduser()})" in err and "repo id" not in err.lower()


# -- 9 and 11: what a server answers ---------------------------------------------------------------------------------

EMPTY = {"choices": [{"index": 0, "message": {"role": "assistant", "content": ""}, "finish_reason": "stop"}]}


def test_empty_and_malformed_replies_are_retried_then_fail_never_written(tmp_path, capsys):
    data = write_conversations(tmp_path / "in.json", n=2)
    out = tmp_path / "out.jsonl"
    flags = ["--input-filename", str(data), "--output-filename", str(out), "--concurrency", "1", "--no-progress",
             "--retry-base", "0.01"]  # fmt: skip
    with ScriptedServer(bodies=[EMPTY, {"detail": "not a completion"}, EMPTY]) as server:
        assert main(["distill", *flags, "--url", server.url]) == 0
    assert len(server.requests) == 2 * 2 + 3  # each bad answer retried once
    assert all(m["content"] for r in read_jsonl(out) for m in r["messages"])
    out.unlink()
    with ScriptedServer(bodies=[EMPTY] * 100) as server:
        assert main(["distill", *flags, "--url", server.url, "--max-retries", "2"]) == 1
    err = error_of(capsys)
    assert "failed: 2" in err and "empty reply" in err
    assert out.read_text() == ""


def test_outputs_are_readable_as_the_umask_says(two_head_run, tmp_path):
    out, _ = two_head_run
    old = os.umask(0o022)
    try:
        assert main(["export", "--heads", str(out), "--format", "vllm", "--output-dir", str(tmp_path / "v")]) == 0
    finally:
        os.umask(old)
    files = [p for folder in (out, tmp_path / "v") for p in folder.rglob("*") if p.is_file()]
    assert any(p.name == WEIGHTS_NAME for p in files) and any(p.parent.name.startswith("checkpoint-") for p in files)
    unreadable = [str(p) for p in files if stat.S_IMODE(p.stat().st_mode) & 0o044 != 0o044]
    assert not unreadable
