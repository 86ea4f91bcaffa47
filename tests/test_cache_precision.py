"""float8 hidden-state cache records (--medusa_hidden_cache_precision float8): read back within e4m3's rounding of
the float16 cache's records, exactly what the bench measured; never mixed with a float16 cache; resumable and
sharded like float16; trainable through the command; the disk plan says both sizes."""

import json

import numpy as np
import pytest
import torch
from conftest import kind_train_flags, write_conversations
from test_cache_ranks import CONVERSATIONS, cache_folder, finished, flags, shard_items, tokenised, torchrun
from test_hidden_cache import make_items
from test_train import small_run_flags

from medusa_forge.cli import main
from medusa_forge.modeling import load_base_model
from medusa_forge.pipeline import load_config
from medusa_forge.pipeline.eta import stage_plan
from medusa_forge.train import hidden_cache
from medusa_forge.train.cache_records import cache_plan, describe_record, float8_round_trip
from medusa_forge.train.hidden_cache import HiddenStateCache, build_hidden_cache, cache_key, complete_cache
from medusa_forge.train.target_files import TargetFiles

HIDDEN = 32  # the tiny target's hidden size


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return load_base_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def files(tiny_model_dir):
    return TargetFiles(tiny_model_dir, torch.float32)


@pytest.mark.parametrize(("kind", "parts"), [("medusa", 1), ("eagle3", 4)])
def test_float8_records_are_the_float16_records_rounded_to_e4m3_per_token_and_part(tmp_path, base, files, kind, parts):
    items = make_items(n=9)
    half = build_hidden_cache(base, files, items, tmp_path, max_tokens_per_batch=40, kind=kind)
    eight = build_hidden_cache(base, files, items, tmp_path, max_tokens_per_batch=40, kind=kind, precision="float8")
    assert eight.shards[0].parent != half.shards[0].parent  # one folder per precision under the same root
    meta = json.loads((eight.shards[0].parent / "meta.json").read_text())
    assert (meta["precision"], meta["hidden"], len(meta["layers"])) == ("float8", parts * HIDDEN, parts)
    tokens = sum(len(item["input_ids"]) for item in items)
    (shard,) = eight.shards
    # Half the disk: one byte per value, plus a float16 scale per token and part.
    assert (shard / "hidden.f8").stat().st_size == tokens * parts * HIDDEN and not (shard / "hidden.f16").exists()
    assert (shard / "scales.f16").stat().st_size == tokens * parts * 2
    rounded_somewhere = False
    for i in range(len(items)):
        exact, back = half.get(i), eight.get(i)
        assert back.dtype == torch.float16 and back.shape == exact.shape == (len(items[i]["input_ids"]), parts * HIDDEN)
        # The numbers the bench trained on (one implementation: the bench imports it).
        assert np.array_equal(back.numpy(), float8_round_trip(exact.numpy(), HIDDEN))
        # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 (plus float16's own rounding), and values below the
        # smallest normal (2^-6 of the scale) are off by at most half a subnormal step (2^-10 of the scale).
        x, y = exact.float().view(-1, parts, HIDDEN), back.float().view(-1, parts, HIDDEN)
        scale = x.abs().amax(dim=-1, keepdim=True) / 448.0
        assert ((y - x).abs() <= x.abs() * (2**-4 + 2**-10) + scale * 2**-9).all()
        rounded_somewhere |= not torch.equal(x, y)
    assert rounded_somewhere  # the records really went through float8


def test_the_precision_is_part_of_the_key_and_a_float16_cache_is_not_reused(tmp_path, base, files):
    items = make_items()
    for kind in ("medusa", "eagle3"):
        assert cache_key(files, items, kind) == cache_key(files, items, kind, "float16")  # old caches keep theirs
        assert cache_key(files, items, kind, "float8") != cache_key(files, items, kind)
    build_hidden_cache(base, files, items, tmp_path, kind="eagle3")
    assert complete_cache(files, items, tmp_path, "eagle3")
    assert not complete_cache(files, items, tmp_path, "eagle3", "float8")
    # A cache written before precisions existed (no "precision" in meta.json) reads as the float16 it is.
    folder = tmp_path / cache_key(files, items, "eagle3")
    meta = json.loads((folder / "meta.json").read_text())
    assert meta.pop("precision") == "float16"
    (folder / "meta.json").write_text(json.dumps(meta))
    assert HiddenStateCache(folder).precision == "float16"


def test_an_interrupted_float8_build_resumes_and_matches_a_fresh_build(tmp_path, base, files):
    items = make_items(n=9)
    build = dict(max_tokens_per_batch=40, kind="eagle3", precision="float8")
    fresh = build_hidden_cache(base, files, items, tmp_path / "fresh", **build)
    # A crash after 2 batches: no meta.json, the shard unfinished with progress at 2, garbage after the written rows.
    resumed = build_hidden_cache(base, files, items, tmp_path / "resumed", **build)
    (shard,) = resumed.shards
    (shard.parent / "meta.json").unlink()
    (shard / "shard.json").unlink()
    (shard / "progress.json").write_text(json.dumps({"batches": 2}))
    written = sum(len(items[i]["input_ids"]) for batch in hidden_cache._batches(
        [len(it["input_ids"]) for it in items], 40)[:2] for i in batch)  # fmt: skip
    tokens = sum(len(item["input_ids"]) for item in items)
    for name, dtype in (("hidden.f8", np.uint8), ("scales.f16", np.float16)):
        data = np.memmap(shard / name, dtype=dtype, mode="r+")
        data[written * (len(data) // tokens) :] = 7
        data.flush()
        del data
    resumed = build_hidden_cache(base, files, items, tmp_path / "resumed", **build)
    for name in ("hidden.f8", "scales.f16"):
        assert (resumed.shards[0] / name).read_bytes() == (fresh.shards[0] / name).read_bytes()


def test_two_ranks_build_the_float8_cache_one_process_builds(tmp_path, tiny_model_dir):
    data = write_conversations(tmp_path / "data.json", n=CONVERSATIONS)
    precision = ["--medusa_hidden_cache_precision", "float8"]
    finished(torchrun(2, [*flags(tiny_model_dir, data, tmp_path / "out", tmp_path / "two", 1), *precision]))
    folder = cache_folder(tmp_path / "two")
    assert len(shard_items(folder)) == 2 and all(len(order) for order in shard_items(folder))
    items = tokenised(tiny_model_dir, data)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun processes ran
    try:
        one = build_hidden_cache(
            load_base_model(str(tiny_model_dir)), TargetFiles(tiny_model_dir, torch.float32), items,
            tmp_path / "one", kind="eagle3", precision="float8",
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert folder.name == one.shards[0].parent.name
    two = HiddenStateCache(folder)
    assert all(torch.equal(two.get(i), one.get(i)) for i in range(len(items)))


def test_training_from_a_float8_cache_through_the_command(tmp_path, tiny_model_dir, caplog):
    data = write_conversations(tmp_path / "data.json", n=12)
    cache = tmp_path / "cache"

    def run(out: str, *extra: str) -> list[float]:
        flags = small_run_flags(
            tiny_model_dir, data, tmp_path / out, "--max_steps", "4", "--save_strategy", "no",
            "--medusa_hidden_cache_dir", str(cache), *kind_train_flags("eagle3"), *extra,
        )  # fmt: skip
        caplog.clear()
        assert main(["train", *flags]) == 0
        return [row["loss"] for row in json.loads((tmp_path / out / "training_metrics.json").read_text())["train"]["0"]]

    run("f16")  # builds the float16 cache
    built = run("f8", "--medusa_hidden_cache_precision", "float8")
    assert "reading only the target's embedding" not in caplog.text  # the float16 cache was not taken for float8
    assert "136 bytes per token" in caplog.text  # 4 parts x (32 bytes + a 2-byte scale)
    reread = run("f8-again", "--medusa_hidden_cache_precision", "float8")
    assert "reading only the target's embedding" in caplog.text  # the float8 cache is complete now: reused
    assert built == reread and all(np.isfinite(built))
    precisions = sorted(json.loads((folder / "meta.json").read_text())["precision"] for folder in cache.iterdir())
    assert precisions == ["float16", "float8"]
    assert (tmp_path / "f8" / "model.safetensors").is_file()


def test_the_plan_states_the_chosen_size_and_what_float8_would_take(tmp_path, files):
    config = files.config
    float8 = "hidden states 0, 1, 2 + the final state = 4 x 32 x 1 byte (float8) + 4 float16 scales = 136 bytes"
    assert describe_record(config, "eagle3", "float8") == f"{float8} per token"
    medusa = describe_record(config, "medusa", "float8")
    assert medusa == "the final state = 1 x 32 x 1 byte (float8) + 1 float16 scale = 34 bytes per token"
    plan = cache_plan(config, "eagle3", 10**6, tmp_path)
    assert "4 x 32 x 2 bytes = 256 bytes per token; 1000000 tokens = 0.26 GB at" in plan
    assert "float8 records would take 136 bytes per token = 0.14 GB (--medusa_hidden_cache_precision float8" in plan
    assert "BENCHMARKS.md" in plan
    chosen = cache_plan(config, "eagle3", 10**6, tmp_path, "float8")
    assert f"{float8} per token; 1000000 tokens = 0.14 GB at" in chosen and "would take" not in chosen
    # The pipeline's estimate says the same, at the precision its train flags choose.
    overrides = [f"model={files.folder}", "draft_kind=eagle3", "train.max_samples=100", "train.model_max_length=200",
                 f"train.medusa_hidden_cache_dir={tmp_path}"]  # fmt: skip
    assert "float8 records would take 136 bytes per token" in stage_plan(load_config(None, overrides), "train")
    eight = stage_plan(load_config(None, [*overrides, "train.medusa_hidden_cache_precision=float8"]), "train")
    assert f"{float8} per token; 20000 tokens = 0.00 GB" in eight and "would take" not in eight
