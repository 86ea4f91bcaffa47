"""Issue 25: nothing lost when two runs meet, drafts that work from any folder, one clear error (never a traceback)
at every output or input edge. Real processes, signals, files and servers on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_pipeline import tiny_config
from test_user_errors import error_of, unwritable_folder

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
