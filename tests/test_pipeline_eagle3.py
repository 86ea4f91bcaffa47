"""`medusa-forge pipeline` with `draft_kind: eagle3`, and the key itself: validation before any work, the export
formats each kind takes, an EAGLE-3 draft trained, evaluated, exported for vLLM and SGLang and reported end to end
on a tiny target, re-runs that skip, and a change of kind that trains again."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
import yaml
from conftest import TINY_CONFIGS
from test_pipeline import events, log_length, tiny_config

from medusa_forge.cli import main
from medusa_forge.drafts.eagle3_config import ENGINE_MIN_TARGET_LAYERS, is_eagle3_folder
from medusa_forge.drafts.eagle3_model import Eagle3Draft
from medusa_forge.errors import UserError
from medusa_forge.pipeline import QUICKSTART, load_config
from medusa_forge.pipeline.configuration import config_from_dict
from medusa_forge.pipeline.context import Context
from medusa_forge.pipeline.eta import estimate_seconds
from medusa_forge.pipeline.quickstart import kind_reason
from medusa_forge.pipeline.report import write_pipeline_report
from medusa_forge.pipeline.runner import STATE_FILE

FINISHED = ("train", "evaluate", "export", "report")


# --- config ---------------------------------------------------------------------------------------------------


def test_draft_kind_is_one_top_level_key_with_its_own_export_formats():
    assert config_from_dict({}, "p.yaml").draft_kind == "medusa"  # the tutorial's heads stay the default
    assert config_from_dict({}, "p.yaml").export.formats == ["tgi", "vllm"]
    eagle3 = config_from_dict({"draft_kind": "eagle3"}, "p.yaml")
    assert eagle3.export.formats == ["vllm", "sglang"]
    assert config_from_dict({"draft_kind": "eagle3", "export": {"formats": "sglang"}}, "p").export.formats == ["sglang"]
    with pytest.raises(UserError, match=r"p.yaml: draft_kind 'eagle': choose one of medusa, eagle3"):
        config_from_dict({"draft_kind": "eagle"}, "p.yaml")
    with pytest.raises(UserError, match=r"p.yaml: train: 'draft_kind' is not a key of this section: it is set by "
                                        r"the top-level key `draft_kind`"):  # fmt: skip
        config_from_dict({"train": {"draft_kind": "eagle3"}}, "p.yaml")
    with pytest.raises(UserError, match=r"export.formats \['tgi'\]: with draft_kind eagle3 \(EAGLE-3 draft\) "
                                        r"choose from vllm, sglang"):  # fmt: skip
        config_from_dict({"draft_kind": "eagle3", "export": {"formats": ["vllm", "tgi"]}}, "p.yaml")
    with pytest.raises(UserError, match=r"export.formats \['sglang'\]: with draft_kind medusa"):
        config_from_dict({"export": {"formats": ["sglang"]}}, "p.yaml")


# A format the kind cannot take, and the kind reaching the train stage: test_every_kind.py, for every kind.


def test_eagle3_training_estimate_counts_its_training_time_test_steps():
    """The quickstart's sizes: measured 388 s of head training vs 534 s of 3-step x 3-epoch EAGLE-3 training after
    the same cache (BENCHMARKS.md); the estimates keep that ratio, and EAGLE-3's grows with its steps."""
    from medusa_forge.pipeline.quickstart import quickstart_config

    def eagle3_seconds(steps: int) -> float:  # 3 epochs, as the heads train and as measured
        overrides = ["train.num_train_epochs=3", f"train.eagle3_ttt_steps={steps}"]
        return estimate_seconds(load_config(None, overrides, quickstart_config("eagle3")), "train")

    medusa = estimate_seconds(load_config(None, [], quickstart_config("medusa")), "train")
    eagle3, one_step, six = eagle3_seconds(3), eagle3_seconds(1), eagle3_seconds(6)
    training = 3 * (eagle3 - one_step) / 2  # 3 steps' training; the rest is the shared cache and start-up
    assert six - eagle3 == pytest.approx(training)  # linear in the steps
    assert 1.2 < training / (medusa - (eagle3 - training)) < 1.6  # 534 / 388 = 1.38


# --- end to end -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deep_target(tmp_path_factory, tiny_tokenizer):
    """A tiny random Llama deep enough for the engines' EAGLE-3 layers (2, L//2, L-3), so the export succeeds."""
    folder = tmp_path_factory.mktemp("deep-llama")
    torch.manual_seed(0)
    config = TINY_CONFIGS["llama"](len(tiny_tokenizer))
    config.num_hidden_layers = ENGINE_MIN_TARGET_LAYERS + 1
    config.pad_token_id, config.eos_token_id = tiny_tokenizer.pad_token_id, tiny_tokenizer.eos_token_id
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def eagle3_run(tmp_path_factory, deep_target):
    """One complete EAGLE-3 pipeline run: no distillation, 2 training steps, 2 timed prompts."""
    folder = tmp_path_factory.mktemp("pipeline-eagle3")
    path = tiny_config(folder, deep_target, eagle3_ttt_steps=2, eagle3_draft_vocab_size=64)
    config = yaml.safe_load(path.read_text())
    config.update(draft_kind="eagle3", distill={"enabled": False}, export={})  # export: the kind's default formats
    config["eval"]["depth"] = 2
    path.write_text(yaml.safe_dump(config))
    workdir = folder / "work"
    assert main(["pipeline", "--config", str(path), "--workdir", str(workdir)]) == 0
    return path, workdir


def test_eagle3_pipeline_trains_evaluates_exports_and_reports_the_draft(eagle3_run, deep_target):
    _, workdir = eagle3_run
    assert events(workdir) == {
        "pipeline": ["start", "done"],
        **{stage: ["start", "done"] for stage in FINISHED},
        "distill": ["not-configured"],
        "push": ["not-configured"],
    }
    draft = workdir / "heads"  # the folder keeps its name for either kind (older work folders resume)
    trained = Eagle3Draft.load(draft)
    assert trained.config.draft_vocab_size == 64 and not (draft / "medusa_lm_head.safetensors").exists()
    metrics = json.loads((draft / "training_metrics.json").read_text())
    assert set(metrics["train"]) == {"0", "1"}  # one row per training-time-test step
    evaluation = json.loads((draft / "eval" / "eval.json").read_text())
    assert evaluation["draft_kind"] == "eagle3" and evaluation["speed"]["outputs_equal"] is True
    commands = json.loads((workdir / "export" / "serve_commands.json").read_text())
    assert set(commands) == {"vllm", "sglang"}
    for fmt in ("vllm", "sglang"):
        exported = Eagle3Draft.load(workdir / "export" / fmt)
        assert all(torch.equal(exported.state_dict()[k], v) for k, v in trained.state_dict().items())
    assert '"method": "eagle3"' in commands["vllm"][0]
    assert "--speculative-algorithm EAGLE3" in commands["sglang"][0]
    state = json.loads((workdir / STATE_FILE).read_text())
    assert "heads/model.safetensors" in state["stages"]["train"]["outputs"]
    report = (workdir / "report.md").read_text()
    assert report.startswith(f"# EAGLE-3 draft for `{deep_target}`")
    assert "| Draft | EAGLE-3 draft: `draft_kind: eagle3` in the configuration |" in report
    assert "| Draft layers x vocabulary | 1 x 64 tokens; 2 training-time-test steps |" in report
    assert "| draft step | predicts |" in report and "| 1 | t+2 |" in report and "| 2 | t+3 |" in report
    assert "- step 1, guess #1" in report and "- head" not in report and "Heads x" not in report
    assert f"{evaluation['speed']['speedup']['draft']:.2f}x" in report
    assert "SGLang (folder `export/sglang`)" in report and commands["sglang"][0] in report
    assert f"medusa-forge serve --draft {draft} --port 8000" in report


def test_eagle3_rerun_skips_and_the_quickstart_report_says_why(eagle3_run, tmp_path, capsys):
    config, workdir = eagle3_run
    start = log_length(workdir)
    assert main(["pipeline", "--config", str(config), "--workdir", str(workdir)]) == 0
    assert capsys.readouterr().out.startswith("EAGLE-3 draft: mean accepted tokens per step")
    assert events(workdir, start) == {
        "pipeline": ["start", "done"],
        **{stage: ["skip"] for stage in FINISHED},
        "distill": ["not-configured"],
        "push": ["not-configured"],
    }
    # The quickstart's report names the kind and why: the flag, or QUICKSTART's measured choice (in a copy).
    copy = shutil.copytree(workdir, tmp_path / "copy")
    state = json.loads((copy / STATE_FILE).read_text())
    pipeline_config = load_config(str(config), [])
    assert kind_reason("medusa") == "chosen with `--draft-kind medusa` (the quickstart's default is eagle3)"
    for forced in (None, "eagle3"):  # naming the default kind gives its measured reason too
        write_pipeline_report(Context(pipeline_config, copy, "cmd", state, kind_reason(forced)))
        expected = f"| Draft | EAGLE-3 draft: the quickstart's default: {QUICKSTART['why']} |"
        assert expected in (copy / "report.md").read_text()


def test_changing_the_kind_trains_again_and_redoes_every_later_stage(eagle3_run, capsys):
    config, workdir = eagle3_run
    start = log_length(workdir)
    argv = ["pipeline", "--config", str(config), "--workdir", str(workdir), "--set", "draft_kind=medusa"]
    assert main(argv) == 2  # the EAGLE-3 settings would be ignored by Medusa heads: refused, naming them
    assert "train: --eagle3_ttt_steps 2: applies to EAGLE-3 draft" in capsys.readouterr().err
    medusa = yaml.safe_load(config.read_text())
    medusa["train"] = {k: v for k, v in medusa["train"].items() if not k.startswith("eagle3_")}
    config.with_name("medusa.yaml").write_text(yaml.safe_dump(medusa))
    argv[2] = str(config.with_name("medusa.yaml"))
    assert main(argv) == 0
    got = events(workdir, start)
    assert {stage: got[stage] for stage in FINISHED} == {stage: ["start", "done"] for stage in FINISHED}
    draft = workdir / "heads"
    assert not is_eagle3_folder(draft) and not (draft / "model.safetensors").exists()  # started over, not mixed
    assert (draft / "medusa_lm_head.safetensors").is_file()
    commands = json.loads((workdir / "export" / "serve_commands.json").read_text())
    assert set(commands) == {"tgi", "vllm"} and '"method": "medusa"' in commands["vllm"][0]
    assert (workdir / "report.md").read_text().startswith("# Medusa heads for")
