"""The training command: the tutorial's flags, every architecture learns, the output folder, resume, DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import kind_train_flags, make_tiny_model, write_conversations
from safetensors.torch import load_file

from medusa_forge.cli import main
from medusa_forge.drafts import get_kind, kind_names
from medusa_forge.errors import UserError
from medusa_forge.generation.device import cpu_has_native_bfloat16
from medusa_forge.results import TrainingMetrics
from medusa_forge.train.args import parse_args
from medusa_forge.train.run import train as train_heads

TUTORIAL_FLAGS = """--model_name_or_path HuggingFaceH4/zephyr-7b-beta --data_path zephyr_self_distill.json
--bf16 True --output_dir zephyr_out --num_train_epochs 5 --per_device_train_batch_size 4
--per_device_eval_batch_size 4 --gradient_accumulation_steps 4 --evaluation_strategy no --save_strategy no
--learning_rate 1e-3 --weight_decay 0.0 --warmup_ratio 0.1 --lr_scheduler_type cosine --logging_steps 1
--tf32 True --model_max_length 2048 --lazy_preprocess True --medusa_num_heads 3 --medusa_num_layers 1""".split()


def train(argv: list[str]) -> Path:
    """Train from the command's flags, as a user types them."""
    return train_heads(parse_args(argv))


def small_run_flags(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(model_dir), "--data_path", str(data), "--output_dir", str(out),
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--model_max_length", "96",
        "--logging_steps", "1", "--medusa_num_heads", "3", "--seed", "0", "--disable_tqdm", "True", *extra,
    ]  # fmt: skip


def test_tutorial_flags_parse_verbatim(caplog):
    config = parse_args(TUTORIAL_FLAGS)
    assert config.model_name_or_path == "HuggingFaceH4/zephyr-7b-beta"
    assert config.data_path == "zephyr_self_distill.json" and config.lazy_preprocess is True
    assert (config.medusa_num_heads, config.medusa_num_layers) == (3, 1)
    assert config.eval_strategy == "no" and config.model_max_length == 2048
    assert config.gradient_accumulation_steps == 4 and config.lr_scheduler_type == "cosine"
    assert config.warmup_steps == 0.1
    if not torch.cuda.is_available() and not cpu_has_native_bfloat16():
        assert config.bf16 is False and "--bf16 was requested but no CUDA GPU" in caplog.text
    elif not torch.cuda.is_available():  # kept: bfloat16 autocast on a CPU that multiplies bfloat16 natively
        assert config.bf16 is True and "bfloat16 autocast on this CPU" in caplog.text
    assert config.tf32 is None or torch.cuda.is_available()


def test_deepspeed_without_the_package_is_a_clear_error(tmp_path):
    (tmp_path / "ds.json").write_text("{}")
    try:
        import deepspeed  # noqa: F401

        pytest.skip("deepspeed is installed here")
    except ImportError:
        pass
    with pytest.raises(UserError, match="pip install deepspeed"):
        parse_args(["--deepspeed", str(tmp_path / "ds.json")])


def test_unknown_flag_lists_valid_ones():
    with pytest.raises(UserError) as err:
        parse_args(["--medusa_num_head", "3"])
    message = str(err.value)
    assert "did you mean --medusa_num_heads" in message and "--learning_rate" in message


@pytest.mark.parametrize("arch", ["llama", "llama-tied", "qwen2", "mistral", "gemma", "gpt2"])
def test_each_architecture_learns(tmp_path, tiny_tokenizer, arch):
    model_dir = make_tiny_model(arch, tmp_path / "model", tiny_tokenizer)
    data = write_conversations(tmp_path / "data.json", n=12)
    out = train(small_run_flags(model_dir, data, tmp_path / "out", "--num_train_epochs", "4", "--save_strategy", "no"))
    history = json.loads((out / "training_metrics.json").read_text())["train"]
    for i in range(3):
        losses = [row["loss"] for row in history[str(i)]]
        assert losses[-1] < losses[0] * 0.9, (arch, i, losses)


def test_output_folder(tmp_path, tiny_model_dir):
    data = write_conversations(tmp_path / "data.json", n=8, sharegpt=False)
    eval_data = write_conversations(tmp_path / "eval.json", n=4)
    out = train(
        small_run_flags(
            tiny_model_dir, data, tmp_path / "out", "--num_train_epochs", "2", "--eval_strategy", "epoch",
            "--eval_data_path", str(eval_data), "--save_strategy", "no",
        )
    )  # fmt: skip
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "medusa_lm_head.safetensors", "tokenizer.json", "training_metrics.json",
            "training_curves.png", "README.md"} <= files  # fmt: skip
    tensors = load_file(str(out / "medusa_lm_head.safetensors"))
    assert sorted(tensors) == sorted(
        f"{i}.{s}" for i in range(3) for s in ("0.linear.weight", "0.linear.bias", "1.weight")
    )
    metrics = json.loads((out / "training_metrics.json").read_text())
    assert set(metrics["train"]) == set(metrics["eval"]) == {"0", "1", "2"}
    for head, history in metrics["eval"].items():  # evaluated after each epoch: the heads learn
        first, last = history[0], history[-1]
        assert (first["step"], last["step"]) == (2, 4) and last["loss"] < first["loss"] and last["top1"] > first["top1"]
        assert metrics["final"][f"eval_medusa{head}_top1"] == last["top1"]
    assert "eval_medusa2_top5" in metrics["final"]
    assert TrainingMetrics.load(out / "training_metrics.json").to_json() == metrics  # read back as written
    card = (out / "README.md").read_text()
    assert "--speculate 3" in card and "medusa" in card


# Resume from a checkpoint, for every kind: test_every_kind.py.


@pytest.mark.parametrize("kind", kind_names())
def test_ddp_two_processes_split_the_data_and_write_one_folder_like_one_process(tmp_path, tiny_model_dir, kind):
    """Not bit-identical drafts: two ranks see other batches (2 per device, gradients averaged), so the weights
    differ; what must hold is that both ranks train together and rank 0 alone writes a complete folder."""
    data = write_conversations(tmp_path / "data.json", n=12)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    weights = get_kind(kind).weights_name
    outputs = {}
    for nproc in (1, 2):
        out = tmp_path / f"out{nproc}"
        flags = small_run_flags(tiny_model_dir, data, out, "--num_train_epochs", "1", "--save_strategy", "no",
                                *kind_train_flags(kind))  # fmt: skip
        flags[flags.index("--per_device_train_batch_size") + 1] = "2"
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
                   "-m", "medusa_forge.train", *flags]  # fmt: skip
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[nproc] = out
    names = {n: sorted(p.name for p in out.iterdir()) for n, out in outputs.items()}
    assert names[1] == names[2] and weights in names[1]
    one, two = (load_file(str(outputs[n] / weights)) for n in (1, 2))
    assert {k: v.shape for k, v in one.items()} == {k: v.shape for k, v in two.items()}
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):  # the same folder, written once
        assert (outputs[1] / name).read_bytes() == (outputs[2] / name).read_bytes(), name
    # the same seeded start, other batches: both moved, apart
    assert any(not torch.equal(one[k], two[k]) for k in one if k.endswith("weight"))
    if kind == "medusa":  # Medusa's blocks start at zero: the two-process run trained them
        assert all(two[k].abs().sum() > 0 for k in two if k.endswith("linear.weight"))
    steps = {
        n: json.loads((outputs[n] / "training_metrics.json").read_text())["train"]["0"][-1]["step"] for n in (1, 2)
    }
    assert steps == {1: 6, 2: 3}  # 12 conversations, 2 per device: two ranks really split the data


def test_user_mistakes_exit_2_with_a_message(tmp_path, tiny_model_dir, capsys):
    missing = tmp_path / "none.json"
    assert main(["train", "--model_name_or_path", str(tiny_model_dir), "--data_path", str(missing)]) == 2
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"conversations": [{"from": "human", "value": ["not", "text"]}]}]))
    assert main(["train", "--model_name_or_path", str(tiny_model_dir), "--data_path", str(bad)]) == 2
    assert "record 0, message 0" in capsys.readouterr().err


def test_unreachable_hub_id_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = write_conversations(tmp_path / "data.json", n=2)
    code = main(
        ["train", "--model_name_or_path", "nobody/no-such-model", "--data_path", str(data),
         "--output_dir", str(tmp_path)]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "could not load model 'nobody/no-such-model'" in err and "'smollm2'" in err


def test_end_to_end_on_the_embedded_model(tmp_path, smollm2_dir):
    out = train(
        ["--model_name_or_path", "smollm2", "--data_path", "sharegpt", "--max_samples", "8", "--max_steps", "2",
         "--per_device_train_batch_size", "2", "--model_max_length", "128", "--output_dir", str(tmp_path / "out"),
         "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "True"]
    )  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["base_model_name_or_path"] == str(smollm2_dir)
    assert (config["hidden_size"], config["vocab_size"]) == (576, 49152)
    tensors = load_file(str(out / "medusa_lm_head.safetensors"))
    assert tensors["2.1.weight"].shape == (49152, 576)
    assert (out / "tokenizer.json").is_file()


# Run as a subprocess: train, and SIGKILL the process itself after step 5 (checkpoint-4 saved, checkpoint-6 not).
KILLED_AT_STEP_5 = """
import os, signal, sys
from transformers import TrainerCallback
from medusa_forge.cli import main
from medusa_forge.train.trainer import DraftTrainer

class KillAfterStep5(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 5:
            os.kill(os.getpid(), signal.SIGKILL)

init = DraftTrainer.__init__
def init_with_kill(self, *args, **kwargs):
    init(self, *args, **kwargs)
    self.add_callback(KillAfterStep5())
DraftTrainer.__init__ = init_with_kill
sys.exit(main(["train", *sys.argv[1:]]))
"""


@pytest.mark.parametrize("kind", kind_names())
def test_interrupted_run_keeps_only_the_last_checkpoint_and_a_completed_run_none(
    tmp_path, tiny_model_dir, kind, caplog
):
    data = write_conversations(tmp_path / "data.json", n=8)
    out = tmp_path / "out"
    flags = small_run_flags(
        tiny_model_dir, data, out, "--max_steps", "8", "--save_steps", "2", "--per_device_train_batch_size", "2",
        *kind_train_flags(kind), "--medusa_hidden_cache_dir", str(tmp_path / "cache"),
    )  # fmt: skip
    script = tmp_path / "killed.py"
    script.write_text(KILLED_AT_STEP_5)
    killed = subprocess.run([sys.executable, str(script), *flags], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    # checkpoint-2 went when checkpoint-4 was complete: resume needs only the last
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-4"]
    resumed = train(flags)  # the same command again: resumes from checkpoint-4, finishes, removes it
    assert f"resuming from {out / 'checkpoint-4'}" in caplog.text
    assert not list(resumed.glob("checkpoint-*"))
    assert {"config.json", "README.md"} <= {p.name for p in resumed.iterdir()}
    # asked to keep them: the last one stays
    kept = train([*flags[: flags.index("--output_dir") + 1], str(tmp_path / "kept"),
                  *flags[flags.index("--output_dir") + 2 :], "--keep_checkpoints", "True"])  # fmt: skip
    assert sorted(p.name for p in kept.glob("checkpoint-*")) == ["checkpoint-8"]


@pytest.mark.parametrize("kind", kind_names())
def test_refuses_before_training_when_output_dir_cannot_hold_the_checkpoints(
    tmp_path, tiny_model_dir, kind, monkeypatch
):
    from collections import namedtuple

    from medusa_forge.train import hidden_cache

    data = write_conversations(tmp_path / "data.json", n=4)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(hidden_cache.shutil, "disk_usage", lambda _: usage(10**12, 0, hidden_cache.RESERVE + 1000))
    flags = small_run_flags(
        tiny_model_dir, data, tmp_path / "out", "--max_steps", "2", *kind_train_flags(kind),
        "--medusa_hidden_cache", "False",
    )  # fmt: skip
    with pytest.raises(UserError) as err:
        train(flags)
    message = str(err.value)
    assert f"--output_dir {tmp_path / 'out'}: this run needs" in message
    assert "2 checkpoint(s) x" in message and "(draft weights + optimizer state)" in message
    assert "choose another --output_dir" in message
    assert not (tmp_path / "out").exists()  # refused before anything was written: the folder the check made is gone
