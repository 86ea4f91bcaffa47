"""`train --draft_kind dflash`: flags, the block loss against a block-by-block recomputation, anchors only where
the reference draws them, cached and per-batch features, and a real CLI run whose loss falls."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import write_conversations
from safetensors.torch import load_file
from test_eagle3_train import sharp_target, tokenised

from medusa_forge.cli import main
from medusa_forge.data.tokenize import IGNORE_INDEX
from medusa_forge.drafts.dflash_model import DFlashDraft
from medusa_forge.drafts.dflash_training import DFlashForTraining, feature_records, sample_anchors, slot_weights
from medusa_forge.errors import UserError
from medusa_forge.modeling import load_base_model
from medusa_forge.train.args import parse_args
from medusa_forge.train.dataset import PadCollator
from medusa_forge.train.hidden_cache import CachedHiddenDataset, build_hidden_cache, cache_key
from medusa_forge.train.target_files import TargetFiles

BLOCK = 4


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory, tiny_tokenizer):
    return sharp_target("llama", tmp_path_factory.mktemp("sharp-llama"), tiny_tokenizer)


@pytest.fixture(scope="module")
def target(target_dir):
    return load_base_model(str(target_dir))


def training_model(target, anchors=8, gamma=7.0, seed=0) -> DFlashForTraining:
    torch.manual_seed(seed)
    draft = DFlashDraft.for_target(target, "x", mask_token_id=0, block_size=BLOCK)
    with torch.no_grad():  # away from the fresh init, so a wrong mask or position shows in the loss
        for param in draft.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return DFlashForTraining(target, draft, slot_weights(BLOCK, gamma), anchors)


def test_flags_validate_and_belong_to_dflash():
    config = parse_args(["--draft_kind", "dflash"])
    assert (config.dflash_block_size, config.dflash_num_layers, config.dflash_loss_gamma) == (16, 1, 7.0)
    for flags, message in ((["--dflash_block_size", "1"], "--dflash_block_size"),
                           (["--dflash_loss_gamma", "-1"], "--dflash_loss_gamma")):  # fmt: skip
        with pytest.raises(UserError, match=message):
            parse_args(["--draft_kind", "dflash", *flags])
    with pytest.raises(UserError, match="--dflash_block_size 8: applies to DFlash draft"):
        parse_args(["--draft_kind", "eagle3", "--dflash_block_size", "8"])
    assert slot_weights(4, 0.0) == [1.0, 1.0, 1.0]
    assert slot_weights(3, 2.0) == pytest.approx([1.0, 0.6065306597])


def test_anchors_are_supervised_pairs_drawn_without_replacement():
    mask = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 0], [0, 0, 0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    torch.manual_seed(0)
    anchors, keep = sample_anchors(mask, 10)
    assert anchors.shape == (2, 7)
    assert sorted(anchors[0][keep[0]].tolist()) == [1, 2, 5]  # a and a+1 both supervised
    assert not keep[1].any()  # no two consecutive supervised tokens: nothing to learn
    anchors, keep = sample_anchors(mask, 2)
    assert keep[0].all() and len(set(anchors[0].tolist())) == 2 and set(anchors[0].tolist()) <= {1, 2, 5}


def test_block_loss_equals_a_block_by_block_recomputation(target, tiny_tokenizer, tmp_path):
    items = tokenised(tiny_tokenizer, write_conversations(tmp_path / "data.json", n=3))
    batch = PadCollator(tiny_tokenizer.pad_token_id)(items)
    model = training_model(target)
    draft, layers = model.draft, model.layers
    ids, labels, attention = batch["input_ids"], batch["labels"], batch["attention_mask"]
    records = feature_records(target, ids, attention, layers)
    loss_mask = (labels != IGNORE_INDEX) & attention.bool()
    torch.manual_seed(1)
    anchors, keep = sample_anchors(loss_mask, 8)
    result = model.loss(records, ids, loss_mask, attention.bool(), anchors, keep)

    head, embed = target.get_output_embeddings().weight, target.get_input_embeddings()
    total = weight = 0.0
    hits = torch.zeros(BLOCK - 1)
    length = ids.shape[1]
    for row in range(ids.shape[0]):
        kv = draft.context_kv(draft.context(records[row : row + 1]), torch.arange(length)[None])
        for a, kept in zip(anchors[row].tolist(), keep[row].tolist(), strict=True):
            if not kept:
                continue
            cut = [(k[:, :, :a], v[:, :, :a]) for k, v in kv]  # the context strictly before the anchor
            block = torch.tensor([ids[row, a].item()] + [0] * (BLOCK - 1))
            out = draft.block(embed(block)[None, None], torch.arange(a, a + BLOCK)[None, None], cut)[0, 0]
            for k in range(1, BLOCK):
                if a + k >= length or not loss_mask[row, a + k]:
                    continue
                logits = out[k] @ head.T
                w = model.weights[k - 1]
                total += w * F.cross_entropy(logits[None], ids[row, a + k][None], reduction="sum")
                weight += w
                hits[k - 1] += float(logits.argmax() == ids[row, a + k])
    assert weight > 0
    assert float(result["loss"].detach()) == pytest.approx(float((total / weight).detach()), rel=1e-4)
    torch.testing.assert_close(result["head_stats"][:, 3], hits)  # top-1 hits per slot
    assert model.weights[0] == 1.0 and model.weights[2] < model.weights[1] < 1.0


def test_cache_records_are_the_feature_layers_and_give_the_per_batch_loss(target, target_dir, tiny_tokenizer, tmp_path):
    items = tokenised(tiny_tokenizer, write_conversations(tmp_path / "data.json", n=5))
    files = TargetFiles(target_dir, torch.float32)
    cache = build_hidden_cache(target, files, items, tmp_path / "cache", max_tokens_per_batch=128, kind="dflash")
    meta = json.loads((tmp_path / "cache" / cache_key(files, items, "dflash") / "meta.json").read_text())
    # a 2-layer target: one feature layer, decoder layer 1 = HF hidden_states[2]
    assert (meta["kind"], meta["layers"], meta["hidden"]) == ("dflash", [2], 32)
    assert cache_key(files, items, "dflash") != cache_key(files, items, "eagle3")
    model = training_model(target)
    collate = PadCollator(tiny_tokenizer.pad_token_id)
    cached_batch = collate(list(CachedHiddenDataset(items, cache)))
    assert cached_batch["hidden_states"].shape[-1] == 32
    torch.manual_seed(5)
    cached = model(**cached_batch)
    torch.manual_seed(5)  # the same anchors
    per_batch = model(**collate(items))
    torch.testing.assert_close(cached["loss"], per_batch["loss"], rtol=2e-3, atol=2e-3)  # float16 storage
    torch.testing.assert_close(cached["head_stats"][:, 1], per_batch["head_stats"][:, 1])


def dflash_flags(target_dir, data, out, *extra: str) -> list[str]:
    return [
        "train", "--model_name_or_path", str(target_dir), "--data_path", str(data), "--output_dir", str(out),
        "--draft_kind", "dflash", "--dflash_block_size", str(BLOCK), "--dflash_num_anchors", "16",
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--model_max_length", "96",
        "--logging_steps", "1", "--seed", "0", "--disable_tqdm", "True",
        "--medusa_hidden_cache_dir", str(out.parent / "cache"), *extra,
    ]  # fmt: skip


def test_train_cli_writes_a_draft_whose_loss_falls(tmp_path, target_dir):
    data = write_conversations(tmp_path / "data.json", n=8)
    out = tmp_path / "out"
    assert main(dflash_flags(target_dir, data, out, "--num_train_epochs", "10", "--save_strategy", "no")) == 0
    draft = DFlashDraft.load(out)
    assert draft.config.block_size == BLOCK and draft.config.base_model_name_or_path == str(target_dir)
    metrics = json.loads((out / "training_metrics.json").read_text())
    assert set(metrics["train"]) == {str(i) for i in range(BLOCK - 1)}
    for i in range(BLOCK - 1):
        losses = [row["loss"] for row in metrics["train"][str(i)]]
        assert losses[-1] < losses[0] * 0.9, (i, losses)
    card = (out / "README.md").read_text()
    assert card.startswith("---") and "# DFlash draft for" in card and "num_speculative_tokens" in card


def test_the_draft_starts_from_the_target_final_norm_with_or_without_the_target(target, target_dir):
    """A run from a complete cache (the stand-in, no layers loaded) starts from the same weights as one with the
    target: the stand-in carries the final norm the draft's own starts from."""
    stand_in = TargetFiles(target_dir, torch.float32).stand_in(True)
    norm = target.model.norm.weight
    assert stand_in.final_norm[0] == "LlamaRMSNorm" and torch.equal(stand_in.final_norm[1], norm)
    assert not torch.equal(norm, torch.ones_like(norm))  # the sharp target's x20: a copy shows
    drafts = [DFlashDraft.for_target(model, "x", 0, block_size=BLOCK) for model in (target, stand_in)]
    assert torch.equal(drafts[0].norm.weight, norm) and torch.equal(drafts[1].norm.weight, norm)


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path, target_dir):
    """The anchors are drawn from torch's generator, which the checkpoint restores: a resumed run draws the same
    ones and ends with the same draft."""
    data = write_conversations(tmp_path / "data.json", n=8)
    flags = ["--max_steps", "4", "--save_steps", "2", "--per_device_train_batch_size", "2"]
    keep = ["--save_total_limit", "2", "--keep_checkpoints", "True"]  # checkpoint-2 is copied below
    assert main(dflash_flags(target_dir, data, tmp_path / "full", *flags, *keep)) == 0
    full = tmp_path / "full"
    DFlashDraft.load(full / "checkpoint-2")  # a checkpoint is a draft folder
    (tmp_path / "resumed").mkdir()
    shutil.copytree(full / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    assert main(dflash_flags(target_dir, data, tmp_path / "resumed", *flags)) == 0
    a, b = load_file(str(full / "model.safetensors")), load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    halfway = load_file(str(full / "checkpoint-2" / "model.safetensors"))
    assert not torch.equal(halfway["fc.weight"], a["fc.weight"])  # steps 3-4 did change the draft
