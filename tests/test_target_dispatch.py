"""A target larger than one device (issue 24, part 3): dispatched by a device map over this process's devices, CPU
memory and disk (`modeling.TargetPlacement`, train's --target_* flags). On the CPU: a map that forces layers to
disk gives the same records (both kinds) and the same cache key as the target in one piece, and training with it
gives the same losses step for step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.utils import compute_module_sizes
from conftest import write_conversations

from medusa_forge.errors import UserError
from medusa_forge.modeling import TargetPlacement, load_base_model, parse_max_memory
from medusa_forge.train.args import parse_args
from medusa_forge.train.hidden_cache import build_hidden_cache, frozen_pass
from medusa_forge.train.run import train
from medusa_forge.train.target_files import TargetFiles


def split_budget(model_dir: Path) -> int:
    """CPU bytes for the embeddings, the lm_head and layer 0 (plus the one layer accelerate keeps free to load an
    offloaded one into): layer 1 and the final norm then go to disk."""
    whole = load_base_model(str(model_dir))
    sizes = compute_module_sizes(whole)
    return sizes["model.embed_tokens"] + sizes["lm_head"] + 2 * sizes["model.layers.0"] + 64


@pytest.fixture(scope="module")
def dispatched(tiny_model_dir, tmp_path_factory):
    offload = tmp_path_factory.mktemp("offload")
    placement = TargetPlacement(torch.device("cpu"), {"cpu": split_budget(tiny_model_dir)}, str(offload))
    return load_base_model(str(tiny_model_dir), placement=placement)


def test_the_map_splits_the_layers_between_memory_and_disk(dispatched):
    device_map = dispatched.hf_device_map
    assert device_map["model.layers.0"] == "cpu" and device_map["model.layers.1"] == "disk"
    # the draft reads the embeddings and the lm_head directly: pinned in memory, real tensors
    assert device_map["model.embed_tokens"] == device_map["lm_head"] == "cpu"
    assert dispatched.get_output_embeddings().weight.device.type == "cpu"
    assert any(p.device.type == "meta" for p in dispatched.parameters())  # layer 1 really is on disk


@pytest.mark.parametrize("kind", ["medusa", "eagle3"])
def test_dispatched_target_gives_the_records_of_the_whole_one(tiny_model_dir, dispatched, kind, tmp_path):
    whole = load_base_model(str(tiny_model_dir))
    ids = torch.randint(3, whole.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0  # padding, as in a batch of unequal conversations
    expected = frozen_pass(whole, ids, mask, kind)
    assert torch.equal(frozen_pass(dispatched, ids, mask, kind), expected)
    width = whole.config.hidden_size * (1 if kind == "medusa" else 4)  # EAGLE-3: three feature layers + final
    assert expected.shape == (3, 40, width)
    # The cache built with the dispatched target holds the whole target's records (its key is the files').
    items = [{"input_ids": ids[0].tolist(), "labels": ids[0].tolist()}]
    files = TargetFiles(tiny_model_dir, torch.float32)
    cache = build_hidden_cache(dispatched, files, items, tmp_path / "cache", kind=kind)
    assert torch.equal(cache.get(0), expected[0].to(torch.float16))


def losses(out: Path) -> dict[str, list[float]]:
    metrics = json.loads((out / "training_metrics.json").read_text())["train"]
    return {index: [row["loss"] for row in rows] for index, rows in metrics.items()}


@pytest.mark.parametrize("kind", ["medusa", "eagle3"])
def test_training_with_a_dispatched_target_equals_training_with_the_whole_one(tmp_path, tiny_model_dir, kind):
    """Features computed per batch (no cache): the dispatched target runs in every training step."""
    data = write_conversations(tmp_path / "data.json", n=8)
    extra = ["--draft_kind", "eagle3", "--eagle3_ttt_steps", "2", "--eagle3_draft_vocab_size", "64"]
    runs = {}
    for name, placement in (
        ("whole", []),
        ("dispatched", ["--target_device_map", "auto", "--target_max_memory", f"cpu={split_budget(tiny_model_dir)}",
                        "--target_offload_folder", str(tmp_path / "offload")]),
    ):  # fmt: skip
        out = tmp_path / name
        flags = [
            "--model_name_or_path", str(tiny_model_dir), "--data_path", str(data), "--output_dir", str(out),
            "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--model_max_length", "96",
            "--logging_steps", "1", "--max_steps", "4", "--seed", "0", "--disable_tqdm", "True",
            "--save_strategy", "no", "--medusa_hidden_cache", "False", *(extra if kind == "eagle3" else []),
            *placement,
        ]  # fmt: skip
        torch.manual_seed(0)  # the heads' initial biases come from the global generator, as in a fresh process
        train(parse_args(flags))
        runs[name] = losses(out)
    assert runs["dispatched"] == runs["whole"]
    assert all(len(values) == 4 for values in runs["whole"].values())


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--target_device_map", "balanced"], "--target_device_map balanced: the only value is 'auto'"),
        (["--target_max_memory", "cpu=1GiB"], "--target_max_memory applies only with --target_device_map auto"),
        (["--target_offload_folder", "x"], "--target_offload_folder applies only with --target_device_map auto"),
        (["--target_device_map", "auto", "--target_max_memory", "gpu0=1GiB"], "DEVICE a GPU index or 'cpu'"),
        (["--target_device_map", "auto", "--target_max_memory", "0=lots"], "'lots' is not a size"),
    ],
)
def test_bad_target_flags_are_clear_errors(flags, message):
    with pytest.raises(UserError, match=message):
        parse_args(flags)


def test_max_memory_sizes():
    assert parse_max_memory("0=70GiB, 1=1000, cpu=2MB", "--f") == {0: 70 * 2**30, 1: 1000, "cpu": 2 * 10**6}


def test_a_target_that_needs_the_disk_is_refused_without_an_offload_folder(tiny_model_dir):
    placement = TargetPlacement(torch.device("cpu"), {"cpu": split_budget(tiny_model_dir)})
    with pytest.raises(UserError, match="--target_offload_folder DIR"):
        load_base_model(str(tiny_model_dir), placement=placement)


def test_a_budget_smaller_than_the_embeddings_is_refused(tiny_model_dir, tmp_path):
    placement = TargetPlacement(torch.device("cpu"), {"cpu": 1000}, str(tmp_path))
    with pytest.raises(UserError, match="--target_max_memory: cpu must hold at least the target's embeddings"):
        load_base_model(str(tiny_model_dir), placement=placement)


def test_two_gloo_ranks_each_with_a_dispatched_target_train_as_with_the_whole_one(tmp_path, tiny_model_dir):
    """torchrun, 2 ranks, each with its own dispatched target (a 70B target on two 8-GPU nodes runs so: every rank's
    target over its share of its node's GPUs): the same losses as 2 ranks with the whole target."""
    data = write_conversations(tmp_path / "data.json", n=8)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    placement = ["--target_device_map", "auto", "--target_max_memory", f"cpu={split_budget(tiny_model_dir)}",
                 "--target_offload_folder", str(tmp_path / "offload")]  # fmt: skip
    runs = {}
    for name, extra in (("whole", []), ("dispatched", placement)):
        out = tmp_path / name
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m",
            "medusa_forge.train", "--model_name_or_path", str(tiny_model_dir), "--data_path", str(data),
            "--output_dir", str(out), "--per_device_train_batch_size", "2", "--max_steps", "2", "--logging_steps", "1",
            "--seed", "0", "--disable_tqdm", "True", "--save_strategy", "no", "--medusa_hidden_cache", "False",
            "--draft_kind", "eagle3", "--eagle3_ttt_steps", "2", "--eagle3_draft_vocab_size", "64", *extra,
        ]  # fmt: skip
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = losses(out)
    assert runs["dispatched"] == runs["whole"] and all(len(v) == 2 for v in runs["whole"].values())
