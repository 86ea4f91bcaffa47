"""The hidden-state cache under torchrun: every process builds its share (real gloo processes on the CPU), the shards
make the cache one process makes, training from either is the same; two nodes with and without a shared folder."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from conftest import write_conversations
from safetensors.torch import load_file
from test_train import small_run_flags
from torch.utils.data import BatchSampler

from medusa_forge.data.conversations import load_conversations
from medusa_forge.data.tokenize import ensure_chat_template
from medusa_forge.modeling import load_base_model, load_tokenizer
from medusa_forge.train.cache_group import NodeShareSampler, balance
from medusa_forge.train.dataset import ConversationDataset
from medusa_forge.train.hidden_cache import HiddenStateCache, build_hidden_cache, cache_key
from medusa_forge.train.target_files import TargetFiles

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
EAGLE3 = ["--draft_kind", "eagle3", "--eagle3_ttt_steps", "2", "--eagle3_draft_vocab_size", "64"]
# ~20k tokens: three of the cache's 8192-token batches, so that two processes both have work.
CONVERSATIONS = 240


def flags(model_dir: Path, data: Path, out: Path, cache: Path, steps: int) -> list[str]:
    return small_run_flags(
        model_dir, data, out, "--max_steps", str(steps), "--save_strategy", "no", "--per_device_train_batch_size",
        "2", "--medusa_hidden_cache_dir", str(cache), *EAGLE3,
    )  # fmt: skip


def torchrun(nproc: int, train_flags: list[str], *launch: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               *(launch or ["--standalone"]), "-m", "medusa_forge.train", *train_flags]  # fmt: skip
    return subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(*processes: subprocess.Popen) -> list[str]:
    """Each process's stderr, once all exited 0."""
    outputs = [process.communicate(timeout=600) for process in processes]
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err[-3000:]
    return [err for _, err in outputs]


def tokenised(model_dir: Path, data: Path) -> list[dict[str, list[int]]]:
    """The training items as `train` makes them."""
    tokenizer = ensure_chat_template(load_tokenizer(str(model_dir)))
    return ConversationDataset(load_conversations(str(data)), tokenizer, 96).all_items()


def cache_folder(root: Path) -> Path:
    (folder,) = [path for path in root.iterdir() if path.is_dir()]
    return folder


def shard_items(folder: Path) -> list[np.ndarray]:
    meta = json.loads((folder / "meta.json").read_text())
    return [np.load(folder / name / "items.npy") for name in meta["shards"]]


def train_losses(out: Path) -> list[float]:
    return [row["loss"] for row in json.loads((out / "training_metrics.json").read_text())["train"]["0"]]


def test_two_ranks_build_the_one_process_cache_and_train_from_it_alike(tmp_path, tiny_model_dir):
    data = write_conversations(tmp_path / "data.json", n=CONVERSATIONS)
    sharded, single = tmp_path / "cache-2", tmp_path / "cache-1"
    # Two processes build (and train); one process builds; two processes train from the one-process cache.
    (built_by_two,) = finished(torchrun(2, flags(tiny_model_dir, data, tmp_path / "a", sharded, 4)))
    finished(torchrun(1, flags(tiny_model_dir, data, tmp_path / "b", single, 1)))
    (read_by_two,) = finished(torchrun(2, flags(tiny_model_dir, data, tmp_path / "c", single, 4)))
    assert "the target is freed" in built_by_two
    assert "reading only the target's embedding and lm_head" in read_by_two and "the target is freed" not in read_by_two

    items = tokenised(tiny_model_dir, data)
    folder = cache_folder(sharded)
    assert folder.name == cache_key(TargetFiles(tiny_model_dir, torch.float32), items, "eagle3")
    assert cache_folder(single).name == folder.name
    # Shards disjoint and complete: each item in exactly one; both processes computed some.
    shards = shard_items(folder)
    assert len(shards) == 2 and all(len(order) for order in shards)
    assert sorted(np.concatenate(shards).tolist()) == list(range(len(items)))
    assert len(shard_items(cache_folder(single))) == 1
    two, one = HiddenStateCache(folder), HiddenStateCache(cache_folder(single))
    assert all(torch.equal(two.get(i), one.get(i)) for i in range(len(items)))  # tensor-identical

    # Training from either cache with two processes: the same steps, losses and draft.
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "c")
    a, c = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "c" / "model.safetensors")
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)

    # A rerun with another number of processes after a crash: the finished shard is reused as it is, the unfinished
    # one's items are computed again (here by one process), and the cache is the same.
    # (The shard of one batch is lost: computed again, its batch is the same, so are its records.)
    (folder / "meta.json").unlink()
    lost, kept = sorted(folder.glob("shard-*"), key=lambda s: json.loads((s / "progress.json").read_text())["batches"])
    (lost / "shard.json").unlink()
    kept_written = (kept / "hidden.f16").stat().st_mtime_ns
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun processes ran
    try:
        base = load_base_model(str(tiny_model_dir))
        rebuilt = build_hidden_cache(base, TargetFiles(tiny_model_dir, torch.float32), items, sharded, kind="eagle3")
    finally:
        torch.set_num_threads(threads)
    assert (kept / "hidden.f16").stat().st_mtime_ns == kept_written and not lost.exists()
    assert len(rebuilt.shards) == 2 and kept in rebuilt.shards
    assert all(torch.equal(rebuilt.get(i), one.get(i)) for i in range(len(items)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("shared", [True, False])
def test_two_nodes_share_one_cache_or_each_cache_and_train_on_its_own_share(tmp_path, tiny_model_dir, shared):
    """Two nodes of one process each, on this machine: with one --medusa_hidden_cache_dir for both (a folder shared
    by all nodes), or one each (a disk local to each node)."""
    data = write_conversations(tmp_path / "data.json", n=CONVERSATIONS)
    port = free_port()
    roots = [tmp_path / ("cache" if shared else f"cache-node{node}") for node in (0, 1)]
    launches = [
        torchrun(
            1,
            flags(tiny_model_dir, data, tmp_path / "out", roots[node], 3),
            "--nnodes=2",
            f"--node_rank={node}",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
        )  # fmt: skip
        for node in (0, 1)
    ]
    first, _ = finished(*launches)
    items = tokenised(tiny_model_dir, data)
    files = TargetFiles(tiny_model_dir, torch.float32)
    if shared:
        assert "not one folder shared by all nodes" not in first
        shards = shard_items(cache_folder(roots[0]))
        assert len(shards) == 2 and sorted(np.concatenate(shards).tolist()) == list(range(len(items)))
    else:
        assert "each node caches and trains on its own share" in first
        # Node n cached exactly its share of the training items (balanced by tokens), the shares disjoint and
        # complete; training succeeded reading only its own node's cache.
        shares = balance([len(item["input_ids"]) for item in items], [1, 1])
        assert sorted(shares[0] + shares[1]) == list(range(len(items))) and shares[0] and shares[1]
        for node in (0, 1):
            folder = cache_folder(roots[node])
            assert folder.name == cache_key(files, [items[i] for i in shares[node]], "eagle3")
            assert json.loads((folder / "meta.json").read_text())["sequences"] == len(shares[node])
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_a_node_share_sampler_gives_each_process_only_its_nodes_items():
    """As accelerate deals the batches out (process p takes batches p, p + W, ...): node 0 (processes 0 and 1) has
    7 items, node 1 (process 2) has 3; every process takes as many steps; each epoch covers each node's share."""
    sampler = NodeShareSampler([7, 3], ((0, 1), (2,)), batch_size=2, seed=0)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        batches = {
            p: list(BatchSamplerShard(BatchSampler(sampler, 2, drop_last=False), num_processes=3, process_index=p))
            for p in range(3)
        }
        assert len({len(b) for b in batches.values()}) == 1  # the same number of steps everywhere
        node0 = [i for p in (0, 1) for batch in batches[p] for i in batch]
        node1 = [i for batch in batches[2] for i in batch]
        assert set(node0) == set(range(7)) and set(node1) == set(range(3))
        if epoch == 0:
            first = batches
    assert first != batches  # reshuffled each epoch
