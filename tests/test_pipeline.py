"""`medusa-forge pipeline` end to end on a tiny random model: every artefact, re-runs skip, training resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import write_conversations
from safetensors.torch import load_file

from medusa_forge.cli import main
from medusa_forge.errors import UserError
from medusa_forge.pipeline import QUICKSTART, load_config
from medusa_forge.pipeline.configuration import config_from_dict
from medusa_forge.pipeline.quickstart import quickstart_config
from medusa_forge.pipeline.runner import LOG_FILE, STATE_FILE

REPO = Path(__file__).resolve().parents[1]


def tiny_config(folder: Path, model_dir: Path, **train) -> Path:
    """A pipeline config sized for seconds: 6 conversations, a few training steps, 2 timed prompts."""
    data = write_conversations(folder / "data.json", n=6)
    held_out = write_conversations(folder / "heldout.json", n=4)
    config = {
        "model": str(model_dir),
        "data": str(data),
        "eval_data": str(held_out),
        "distill": {"max_samples": 6, "max_new_tokens": 10, "max_turns": 1, "concurrency": 6, "no_progress": True},
        "train": {
            "max_steps": 2, "save_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 0.01,
            "model_max_length": 96, "logging_steps": 1, "disable_tqdm": True, "report_to": "none",
            "medusa_hidden_cache_dir": str(folder / "hidden-cache"), **train,
        },  # fmt: skip
        "eval": {
            "max_prompts": 2, "max_new_tokens": 10, "calibration_prompts": 1, "max_conversations": 2,
            "tree_sizes": "2,4", "latency_prefix": 16, "device": "cpu", "dtype": "float32",  # exact
        },  # fmt: skip
        "export": {"formats": ["tgi", "vllm"]},
    }
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def events(workdir: Path, since: int = 0) -> dict[str, list[str]]:
    """stage -> events logged (start, resume, skip, done, fail, ...), from line `since` of the pipeline's log."""
    out: dict[str, list[str]] = {}
    for line in (workdir / LOG_FILE).read_text().splitlines()[since:]:
        entry = json.loads(line)
        out.setdefault(entry["stage"], []).append(entry["event"])
    return out


def log_length(workdir: Path) -> int:
    return len((workdir / LOG_FILE).read_text().splitlines())


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir):
    """One complete pipeline run (training stops after 2 steps, a checkpoint at step 2, kept for more steps)."""
    folder = tmp_path_factory.mktemp("pipeline")
    config = tiny_config(folder, tiny_model_dir, keep_checkpoints=True)
    workdir = folder / "work"
    assert main(["pipeline", "--config", str(config), "--workdir", str(workdir)]) == 0
    return config, workdir


def test_every_artefact(finished, capsys):
    _, workdir = finished
    assert events(workdir) == {
        "pipeline": ["start", "done"],
        **{stage: ["start", "done"] for stage in ("distill", "train", "evaluate", "export", "report")},
        "push": ["not-configured"],
    }
    # distill: the tiny model's own replies, one line per conversation
    records = [json.loads(line) for line in (workdir / "distill" / "conversations.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in records)
    # train: heads in the TGI layout, trained on the distilled file, 2 steps
    heads = workdir / "heads"
    config = json.loads((heads / "config.json").read_text())
    assert config["medusa_num_heads"] == 3 and "architectures" not in config
    assert set(load_file(heads / "medusa_lm_head.safetensors")) >= {"0.0.linear.weight", "2.1.weight"}
    metrics = json.loads((heads / "training_metrics.json").read_text())
    assert [row["step"] for row in metrics["train"]["0"]] == [1, 2]
    # evaluate: report + chosen tree stored next to the heads
    evaluation = json.loads((heads / "eval" / "eval.json").read_text())
    assert evaluation["speed"]["outputs_equal"] is True and evaluation["speed"]["prompts"] == 2
    assert evaluation["tree_search"]["sizes"] == [2, 4]
    tree = json.loads((heads / "medusa_choices.json").read_text())["medusa_choices"]
    assert tree == evaluation["tree"]
    # export: both engines' folders, with the tree carried along, and their serve commands
    assert "medusa_lm_head.safetensors" in os.listdir(workdir / "export" / "tgi")
    vllm = json.loads((workdir / "export" / "vllm" / "config.json").read_text())
    assert vllm["model_type"] == "medusa" and vllm["num_heads"] == 3
    commands = json.loads((workdir / "export" / "serve_commands.json").read_text())
    tgi = commands["tgi"][0]
    assert tgi.startswith("text-generation-launcher --model-id") and "--speculate 3" in tgi
    vllm_command = commands["vllm"][0]
    assert vllm_command.startswith("pip install vllm==0.32.0 && vllm serve") and '"method": "medusa"' in vllm_command
    # report: the numbers, the plots it links, the tree, time per stage, serve commands
    report = (workdir / "report.md").read_text()
    for png in ("training_curves.png", "acceptance.png", "tokens_per_second.png", "tree_size.png", "stage_times.png"):
        assert f"]({png})" in report and (workdir / png).stat().st_size > 1000, png
    assert f"{evaluation['acceptance']['mean_accept_length']:.2f}" in report
    assert f"{evaluation['speed']['speedup']['draft']:.2f}x" in report
    assert json.dumps(tree, separators=(",", ":")) in report
    for stage in ("distill", "train", "evaluate", "export"):
        assert f"| {stage} |" in report
    assert commands["tgi"][0] in report and commands["vllm"][0] in report
    # the effective configuration is kept beside the state
    state = json.loads((workdir / STATE_FILE).read_text())
    assert {s: r["status"] for s, r in state["stages"].items()} == {
        s: "done" for s in ("distill", "train", "evaluate", "export", "report")
    }
    assert yaml.safe_load((workdir / "pipeline.yaml").read_text())["train"]["max_steps"] == 2


def test_rerun_skips_every_stage_and_an_edited_output_reruns_its_stage(finished, capsys):
    config, workdir = finished
    start = log_length(workdir)
    assert main(["pipeline", "--config", str(config), "--workdir", str(workdir)]) == 0
    assert events(workdir, start) == {
        "pipeline": ["start", "done"],
        **{stage: ["skip"] for stage in ("distill", "train", "evaluate", "export", "report")},
        "push": ["not-configured"],
    }
    assert "up to date, skipped" in capsys.readouterr().err
    # Checked by content, not presence: an edited report is written again, nothing else runs.
    report = workdir / "report.md"
    report.write_text(report.read_text() + "edited\n")
    start = log_length(workdir)
    assert main(["pipeline", "--config", str(config), "--workdir", str(workdir)]) == 0
    got = events(workdir, start)
    assert got["report"] == ["start", "done"] and got["train"] == ["skip"] and got["evaluate"] == ["skip"]
    assert "edited" not in report.read_text()


def test_more_steps_resume_training_from_its_checkpoint_and_failures_name_the_stage(finished, capsys, caplog):
    config, workdir = finished
    assert (workdir / "heads" / "checkpoint-2").is_dir()
    start = log_length(workdir)
    argv = ["pipeline", "--config", str(config), "--workdir", str(workdir), "--set", "train.max_steps=4"]
    assert main(argv) == 0
    got = events(workdir, start)
    assert got["distill"] == ["skip"] and got["train"] == ["resume", "done"]
    assert "checkpoint-2" in caplog.text  # the train command itself says where it resumed from
    metrics = json.loads((workdir / "heads" / "training_metrics.json").read_text())
    assert [row["step"] for row in metrics["train"]["0"]] == [1, 2, 3, 4]
    assert got["evaluate"] == ["start", "done"] and got["report"] == ["start", "done"]  # new heads: measured again
    # A stage that fails says which, why, and the command that resumes; finished stages stay finished.
    capsys.readouterr()
    bad = [*argv, "--set", "eval.tree=no-such-tree.json"]
    assert main(bad) == 1
    err = capsys.readouterr().err
    assert "error: stage evaluate failed: --tree no-such-tree.json" in err
    assert "resume with:\n  medusa-forge pipeline --config" in err and "eval.tree=no-such-tree.json" in err
    start = log_length(workdir)
    assert main(argv) == 0
    got = events(workdir, start)
    assert got["train"] == ["skip"] and got["evaluate"] == ["start", "done"]


def test_killed_training_resumes_from_its_checkpoint(tmp_path, tiny_model_dir, caplog):
    config = tiny_config(tmp_path, tiny_model_dir, max_steps=400, save_steps=3, save_total_limit=1)
    workdir = tmp_path / "work"
    command = [sys.executable, "-m", "medusa_forge.cli", "pipeline", "--config", str(config), "--workdir", str(workdir)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((workdir / "heads").glob("checkpoint-*")) and time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "interrupted" in err and f"--workdir {workdir}" in err
    state = json.loads((workdir / STATE_FILE).read_text())
    assert state["stages"]["distill"]["status"] == "done" and state["stages"]["train"]["status"] == "running"
    reached = max(int(p.name.split("-")[1]) for p in (workdir / "heads").glob("checkpoint-*"))
    # Same command again (a smaller budget, to keep the test short, still resumes: only growth is required...
    # so keep the budget and let it finish quickly from where it stopped).
    start = log_length(workdir)
    assert main(["pipeline", "--config", str(config), "--workdir", str(workdir), "--set", "eval.max_prompts=1"]) == 0
    got = events(workdir, start)
    assert got["distill"] == ["skip"] and got["train"] == ["resume", "done"]
    assert f"checkpoint-{reached}" in caplog.text


def test_train_launcher_runs_training_under_torchrun(tmp_path, tiny_model_dir, capfd, monkeypatch):
    """Several processes (here 2 CPU ranks over gloo) train the heads; the pipeline carries on from their folder."""
    config = yaml.safe_load(tiny_config(tmp_path, tiny_model_dir).read_text())
    config["distill"] = {"enabled": False}  # train on the given conversations as they are
    config["train_launcher"] = f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node=2"
    config["export"] = {"formats": ["tgi"]}
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(config))
    workdir = tmp_path / "work"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two ranks on two cores
    assert main(["pipeline", "--config", str(path), "--workdir", str(workdir)]) == 0
    err = capfd.readouterr().err
    assert "torch.distributed.run --standalone --nproc_per_node=2 -m medusa_forge.train" in err
    assert "training on 2 processes" in err, err[-3000:]
    metrics = json.loads((workdir / "heads" / "training_metrics.json").read_text())
    assert [row["step"] for row in metrics["train"]["0"]] == [1, 2]
    assert events(workdir)["distill"] == ["not-configured"]
    assert (workdir / "export" / "tgi" / "medusa_lm_head.safetensors").is_file()


# --- config ---------------------------------------------------------------------------------------------------


def test_unknown_keys_are_rejected_with_the_valid_ones(tmp_path):
    with pytest.raises(UserError, match=r"unknown keys 'epochs'; valid keys: data, distill, draft_kind, eval"):
        config_from_dict({"epochs": 3}, "p.yaml")
    with pytest.raises(UserError) as err:
        config_from_dict({"train": {"num_train_epoch": 3}}, "p.yaml")
    assert "p.yaml: train: unknown keys 'num_train_epoch' (did you mean 'num_train_epochs'?)" in str(err.value)
    assert "learning_rate" in str(err.value) and "medusa_num_heads" in str(err.value)
    with pytest.raises(UserError, match=r"p.yaml: distill: unknown keys 'max_new_token' \(did you mean"):
        config_from_dict({"distill": {"max_new_token": 3}}, "p.yaml")
    with pytest.raises(UserError, match="output_dir"):  # set by the pipeline: not a config key
        config_from_dict({"train": {"output_dir": "x"}}, "p.yaml")


def test_bad_values_fail_before_any_stage_runs(tmp_path):
    with pytest.raises(UserError, match="p.yaml: eval: argument --max-prompts.*invalid int value: 'many'"):
        config_from_dict({"eval": {"max_prompts": "many"}}, "p.yaml")
    with pytest.raises(UserError, match=r"export.formats \['onnx'\]: with draft_kind medusa \(Medusa heads\) choose"):
        config_from_dict({"export": {"formats": ["onnx"]}}, "p.yaml")
    with pytest.raises(UserError, match="set 'eval_data' to held-out conversations"):
        config_from_dict({"data": "mine.json"}, "p.yaml")
    with pytest.raises(UserError, match="--set 'train.num_train_epochs': expected KEY=VALUE"):
        load_config(None, ["train.num_train_epochs"])


def test_overrides_and_the_example_config(tmp_path):
    config = load_config(str(REPO / "pipeline.example.yaml"), ["train.num_train_epochs=2", "export.formats=[vllm]"])
    assert config.train["num_train_epochs"] == 2 and config.export.formats == ["vllm"]
    assert config.distill.enabled is True and config.push.repo is None  # nothing is pushed unless asked
    quick = load_config(None, ["distill.max_samples=8", "distill.enabled=true"], quickstart_config())
    assert quick.model == "smollm2" and quick.distill.enabled and quick.distill.flags["max_samples"] == 8
    assert quick.draft_kind == QUICKSTART["default_kind"]
    assert quick.train["num_train_epochs"] == QUICKSTART["kinds"][quick.draft_kind]["train"]["num_train_epochs"]
