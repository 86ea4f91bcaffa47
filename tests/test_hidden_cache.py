"""Hidden-state cache: same loss as running the base, never stale, resumable, refuses a full disk."""

import json
from collections import namedtuple

import numpy as np
import pytest
import torch

from medusa_forge.drafts.medusa_training import MedusaForTraining
from medusa_forge.errors import UserError
from medusa_forge.heads import MedusaHeads
from medusa_forge.modeling import load_base_model
from medusa_forge.train import hidden_cache
from medusa_forge.train.dataset import PadCollator
from medusa_forge.train.hidden_cache import CachedHiddenDataset, build_hidden_cache, cache_key


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


def test_cached_and_uncached_training_give_the_same_loss(tmp_path, base):
    items = make_items()
    cache = build_hidden_cache(base, items, tmp_path, max_tokens_per_batch=64)
    heads = MedusaHeads.for_base_model(base, 3, 1, "x")
    model = MedusaForTraining(base, heads, [1.0, 1.0, 1.0], soft_labels=True)
    collate = PadCollator(pad_token_id=0)
    plain = model(**collate(items))
    cached = model(**collate(list(CachedHiddenDataset(items, cache))))
    torch.testing.assert_close(cached["loss"], plain["loss"], rtol=2e-3, atol=2e-3)  # float16 storage
    torch.testing.assert_close(cached["head_stats"][:, 1], plain["head_stats"][:, 1])  # same tokens counted


def test_stale_cache_is_never_reused(tmp_path, base, tiny_tokenizer):
    items = make_items()
    key = cache_key(base, items)
    assert cache_key(base, make_items(seed=1)) != key  # other data (or template, or max length)
    truncated = [{"input_ids": it["input_ids"][:10], "labels": it["labels"][:10]} for it in items]
    assert cache_key(base, truncated) != key
    with torch.no_grad():
        base.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3  # retrained / other base weights
    try:
        assert cache_key(base, items) != key
    finally:
        with torch.no_grad():
            base.model.layers[0].mlp.up_proj.weight[0, 0] -= 1e-3


def test_interrupted_build_resumes_and_matches_a_fresh_build(tmp_path, base):
    items = make_items(n=9)
    fresh = build_hidden_cache(base, items, tmp_path / "fresh", max_tokens_per_batch=40)
    # simulate a crash after 2 batches: no meta.json, progress at 2, garbage after the written rows
    folder = tmp_path / "resumed" / cache_key(base, items)
    build_hidden_cache(base, items, tmp_path / "resumed", max_tokens_per_batch=40)
    (folder / "meta.json").unlink()
    (folder / "progress.json").write_text(json.dumps({"batches": 2}))
    batches = hidden_cache._batches([len(it["input_ids"]) for it in items], 40)
    shape = (int(fresh.offsets[-1]), fresh.width)
    data = np.memmap(folder / "hidden.f16", dtype=np.float16, mode="r+", shape=shape)
    for index in (i for batch in batches[2:] for i in batch):
        data[fresh.offsets[index] : fresh.offsets[index + 1]] = 7.0
    data.flush()
    del data
    resumed = build_hidden_cache(base, items, tmp_path / "resumed", max_tokens_per_batch=40)
    assert np.array_equal(np.fromfile(resumed.path, dtype=np.float16), np.fromfile(fresh.path, dtype=np.float16))
    assert all(torch.equal(resumed.get(i), fresh.get(i)) for i in range(len(items)))


def test_refuses_when_the_disk_cannot_hold_it(tmp_path, base, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(hidden_cache.shutil, "disk_usage", lambda _: usage(10**6, 10**6, 1000))
    with pytest.raises(UserError, match="--medusa_hidden_cache False"):
        build_hidden_cache(base, make_items(), tmp_path)


def test_the_disk_check_counts_the_runs_checkpoints_on_the_same_disk(tmp_path, base, monkeypatch, caplog):
    items = make_items()
    need = sum(len(item["input_ids"]) for item in items) * 32 * 2  # tokens x hidden x float16
    usage = namedtuple("usage", "total used free")
    free = hidden_cache.RESERVE + need + 100
    monkeypatch.setattr(hidden_cache.shutil, "disk_usage", lambda _: usage(10**12, 0, free))
    outputs = hidden_cache.RunOutputs(tmp_path / "out", checkpoint=60, copies=2, draft=0)  # 120 bytes: too many
    with pytest.raises(UserError, match=r"the hidden-state cache .* \+ 2 checkpoint\(s\) x .* optimizer state"):
        build_hidden_cache(base, items, tmp_path / "cache", outputs=outputs)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    fits = hidden_cache.RunOutputs(tmp_path / "out", checkpoint=40, copies=2, draft=10)  # 90 bytes
    assert len(build_hidden_cache(base, items, tmp_path / "cache", outputs=fits)) == len(items)
    assert "2 checkpoint(s)" in caplog.text and str(tmp_path / "out") in caplog.text
