"""Hidden-state cache: same loss as running the base, never stale, resumable, refuses a full disk; training from it
with only the target's embedding and lm_head read from its files."""

import json
import shutil
from collections import namedtuple

import numpy as np
import pytest
import torch
from conftest import make_tiny_model
from safetensors.torch import load_file, save_file

from medusa_forge.drafts import get_kind
from medusa_forge.drafts.medusa_heads import MedusaHeads
from medusa_forge.drafts.medusa_training import MedusaForTraining
from medusa_forge.errors import UserError
from medusa_forge.modeling import load_base_model
from medusa_forge.pipeline import load_config
from medusa_forge.pipeline.eta import stage_plan
from medusa_forge.train import hidden_cache
from medusa_forge.train.args import parse_args
from medusa_forge.train.dataset import PadCollator
from medusa_forge.train.hidden_cache import CachedHiddenDataset, build_hidden_cache, cache_key
from medusa_forge.train.target_files import TargetFiles


def make_items(n=7, vocab=400, seed=0):
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(n):
        length = int(rng.integers(5, 30))
        ids = rng.integers(3, vocab, length).tolist()
        labels = [t if j > length // 3 else -100 for j, t in enumerate(ids)]
        items.append({"input_ids": ids, "labels": labels})
    return items


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return load_base_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def files(tiny_model_dir):
    return TargetFiles(tiny_model_dir, torch.float32)


def test_cached_and_uncached_training_give_the_same_loss(tmp_path, base, files):
    items = make_items()
    cache = build_hidden_cache(base, files, items, tmp_path, max_tokens_per_batch=64)
    heads = MedusaHeads.for_base_model(base, 3, 1, "x")
    model = MedusaForTraining(base, heads, [1.0, 1.0, 1.0], soft_labels=True)
    collate = PadCollator(pad_token_id=0)
    plain = model(**collate(items))
    cached = model(**collate(list(CachedHiddenDataset(items, cache))))
    torch.testing.assert_close(cached["loss"], plain["loss"], rtol=2e-3, atol=2e-3)  # float16 storage
    torch.testing.assert_close(cached["head_stats"][:, 1], plain["head_stats"][:, 1])  # same tokens counted


def test_stale_cache_is_never_reused(tmp_path, tiny_model_dir):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    items = make_items()
    key = cache_key(TargetFiles(model, torch.float32), items)
    files = TargetFiles(model, torch.float32)
    assert cache_key(files, make_items(seed=1)) != key  # other data (or template, or max length)
    truncated = [{"input_ids": it["input_ids"][:10], "labels": it["labels"][:10]} for it in items]
    assert cache_key(files, truncated) != key
    assert cache_key(TargetFiles(model, torch.bfloat16), items) != key  # a frozen pass in another dtype
    assert cache_key(files, items, "eagle3") != key
    # One weight changed on disk (retrained or other base weights): read from the files, without loading the model.
    weights = load_file(model / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"][0, 0] += 1e-3
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    assert cache_key(TargetFiles(model, torch.float32), items) != key


def test_interrupted_build_resumes_and_matches_a_fresh_build(tmp_path, base, files):
    items = make_items(n=9)
    fresh = build_hidden_cache(base, files, items, tmp_path / "fresh", max_tokens_per_batch=40)
    # simulate a crash after 2 batches: no meta.json, the shard unfinished with progress at 2, garbage after the
    # written rows
    resumed = build_hidden_cache(base, files, items, tmp_path / "resumed", max_tokens_per_batch=40)
    (shard,) = resumed.shards
    (shard.parent / "meta.json").unlink()
    (shard / "shard.json").unlink()
    (shard / "progress.json").write_text(json.dumps({"batches": 2}))
    batches = hidden_cache._batches([len(it["input_ids"]) for it in items], 40)
    data = np.memmap(shard / "hidden.f16", dtype=np.float16, mode="r+")
    for index in (i for batch in batches[2:] for i in batch):
        _, start, stop = resumed.location[index]
        data[start * 32 : stop * 32] = 7.0
    data.flush()
    del data
    resumed = build_hidden_cache(base, files, items, tmp_path / "resumed", max_tokens_per_batch=40)
    assert np.array_equal(
        np.fromfile(resumed.shards[0] / "hidden.f16", dtype=np.float16),
        np.fromfile(fresh.shards[0] / "hidden.f16", dtype=np.float16),
    )
    assert all(torch.equal(resumed.get(i), fresh.get(i)) for i in range(len(items)))


def test_refuses_when_the_disk_cannot_hold_it(tmp_path, base, files, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(hidden_cache.shutil, "disk_usage", lambda _: usage(10**6, 10**6, 1000))
    with pytest.raises(UserError, match="--medusa_hidden_cache False"):
        build_hidden_cache(base, files, make_items(), tmp_path)


def test_the_disk_check_counts_the_runs_checkpoints_on_the_same_disk(tmp_path, base, files, monkeypatch, caplog):
    items = make_items()
    need = sum(len(item["input_ids"]) for item in items) * 32 * 2  # tokens x hidden x float16
    usage = namedtuple("usage", "total used free")
    free = hidden_cache.RESERVE + need + 100
    monkeypatch.setattr(hidden_cache.shutil, "disk_usage", lambda _: usage(10**12, 0, free))
    outputs = hidden_cache.RunOutputs(tmp_path / "out", checkpoint=60, copies=2, draft=0)  # 120 bytes: too many
    with pytest.raises(UserError, match=r"the hidden-state cache .* \+ 2 checkpoint\(s\) x .* optimizer state"):
        build_hidden_cache(base, files, items, tmp_path / "cache", outputs=outputs)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    fits = hidden_cache.RunOutputs(tmp_path / "out", checkpoint=40, copies=2, draft=10)  # 90 bytes
    assert len(build_hidden_cache(base, files, items, tmp_path / "cache", outputs=fits)) == len(items)
    assert "2 checkpoint(s)" in caplog.text and str(tmp_path / "out") in caplog.text


@pytest.mark.parametrize("arch", ["llama", "llama-tied", "gpt2"])
def test_the_stand_in_holds_the_targets_embedding_and_lm_head_read_from_its_files(tmp_path, tiny_tokenizer, arch):
    folder = make_tiny_model(arch, tmp_path / "model", tiny_tokenizer)
    target = load_base_model(str(folder))
    target.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    tied = target.get_output_embeddings().weight is target.get_input_embeddings().weight
    for source in (folder, tmp_path / "sharded"):
        parts = TargetFiles(source, torch.float32).stand_in(embeddings=True)
        assert torch.equal(parts.get_output_embeddings().weight, target.get_output_embeddings().weight)
        assert torch.equal(parts.get_input_embeddings().weight, target.get_input_embeddings().weight)
        assert (parts.get_output_embeddings().weight is parts.get_input_embeddings().weight) == tied
        assert parts.config.get_text_config().hidden_size == target.config.get_text_config().hidden_size
    # Only what the kind reads, in the run's dtype, and never a forward pass.
    lm_head_only = TargetFiles(folder, torch.bfloat16).stand_in(embeddings=False)
    assert [name for name, _ in lm_head_only.named_parameters()] == ["lm_head.weight"]
    assert lm_head_only.dtype == torch.bfloat16
    expected = load_base_model(str(folder), dtype=torch.bfloat16).get_output_embeddings().weight
    assert torch.equal(lm_head_only.get_output_embeddings().weight, expected)
    with pytest.raises(RuntimeError, match="decoder layers were not loaded"):
        MedusaForTraining(parts, MedusaHeads.for_base_model(parts, 2, 1, "x"), [1.0, 1.0])(
            labels=torch.zeros(1, 4, dtype=torch.long), input_ids=torch.ones(1, 4, dtype=torch.long)
        )


@pytest.mark.parametrize("kind", ["medusa", "eagle3"])
def test_training_from_the_cache_with_the_stand_in_matches_the_full_target_step_for_step(
    tmp_path, tiny_model_dir, base, files, kind
):
    items = make_items(n=12)
    cache = build_hidden_cache(base, files, items, tmp_path, max_tokens_per_batch=64, kind=kind)
    dataset = CachedHiddenDataset(items, cache)
    collate = PadCollator(pad_token_id=0)
    batches = [collate([dataset[i] for i in range(start, start + 4)]) for start in (0, 4, 8)]
    own = {  # each kind's own flags (train refuses another kind's)
        "medusa": ["--medusa_soft_labels", "True", "--medusa_draft_vocab_size", "64"],
        "eagle3": ["--eagle3_draft_vocab_size", "64", "--eagle3_ttt_steps", "2"],
    }
    config = parse_args(["--draft_kind", kind, *own[kind], "--output_dir", str(tmp_path / "out")])
    losses = {}
    stand_in = files.stand_in(get_kind(kind).records_need_token_ids)
    for name, target in (("target", base), ("stand-in", stand_in)):
        model = get_kind(kind).training_module(target, config, str(tiny_model_dir), lambda: items)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses[name] = []
        for step in range(6):
            loss = model(**batches[step % 3])["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[name].append(loss.item())
    assert losses["target"] == losses["stand-in"], losses
    assert losses["target"][-1] < losses["target"][0]  # it trained


def test_train_and_the_pipeline_plan_the_disk_alike_before_building(tmp_path, base, files, caplog):
    """The plan says what a token's record holds and costs (EAGLE-3 on a 2-layer, 32-wide target: three states and
    the final one, 4 x 32 x 2 bytes), the total, where, and the free space there; the pipeline says the same from
    its estimate of the data's tokens, before the train stage starts."""
    items = make_items()
    build_hidden_cache(base, files, items, tmp_path / "cache", kind="eagle3")
    record = "hidden states 0, 1, 2 + the final state = 4 x 32 x 2 bytes = 256 bytes per token"
    tokens = sum(len(item["input_ids"]) for item in items)
    assert f"a token's record holds {record}; {tokens} tokens = {tokens * 256 / 1e9:.2f} GB at" in caplog.text
    assert "GB free there" in caplog.text
    config = load_config(
        None,
        [f"model={files.folder}", "draft_kind=eagle3", "train.max_samples=100", "train.model_max_length=200",
         f"train.medusa_hidden_cache_dir={tmp_path / 'cache'}"],
    )  # fmt: skip
    plan = stage_plan(config, "train")
    assert f"{record}; 20000 tokens = 0.01 GB at {tmp_path / 'cache'}" in plan  # 100 conversations x 200 tokens
    assert stage_plan(config, "distill") is None
