"""Heads: the exact TGI layout on disk, independent blocks, init from lm_head, save/load round trip,
and the assumption every architecture must satisfy (backbone hidden state -> lm_head == base logits)."""

import json

import pytest
import torch
from conftest import TINY_CONFIGS, make_tiny_model
from safetensors.torch import load_file, save_file

from medusa_forge.drafts.medusa_heads import MedusaHeads, MedusaModel
from medusa_forge.errors import UserError
from medusa_forge.modeling import backbone, load_base_model


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return load_base_model(str(tiny_model_dir))


def test_tgi_layout_names_shapes_and_config(tmp_path, base, tiny_model_dir):
    heads = MedusaHeads.for_base_model(base, num_heads=3, num_layers=2, base_model_name_or_path=str(tiny_model_dir))
    heads.save(tmp_path)
    tensors = load_file(str(tmp_path / "medusa_lm_head.safetensors"))
    hidden, vocab = base.config.hidden_size, base.config.vocab_size
    expected = {}
    for i in range(3):
        for j in range(2):
            expected[f"{i}.{j}.linear.weight"] = (hidden, hidden)
            expected[f"{i}.{j}.linear.bias"] = (hidden,)
        expected[f"{i}.2.weight"] = (vocab, hidden)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["medusa_num_heads"] == 3 and config["medusa_num_layers"] == 2
    assert config["base_model_name_or_path"] == str(tiny_model_dir)
    assert "architectures" not in config and "model_type" not in config


def test_blocks_have_their_own_weights(base):
    heads = MedusaHeads.for_base_model(base, num_heads=2, num_layers=2, base_model_name_or_path="x")
    blocks = [heads[i][j].linear.weight for i in range(2) for j in range(2)]
    assert len({b.data_ptr() for b in blocks}) == 4
    with torch.no_grad():
        heads[0][0].linear.weight.fill_(1.0)
    assert heads[0][1].linear.weight.abs().sum() == 0 and heads[1][0].linear.weight.abs().sum() == 0


@pytest.mark.parametrize("arch", ["llama", "llama-tied"])
def test_projection_starts_as_a_copy_of_lm_head(tmp_path, tiny_tokenizer, arch):
    model = load_base_model(str(make_tiny_model(arch, tmp_path, tiny_tokenizer)))
    heads = MedusaHeads.for_base_model(model, num_heads=2, num_layers=1, base_model_name_or_path="x")
    lm_head = model.get_output_embeddings().weight
    for head in heads:
        assert torch.equal(head[-1].weight, lm_head)
        assert head[-1].weight.data_ptr() != lm_head.data_ptr()  # a copy: training heads never touches the base
    assert (model.config.tie_word_embeddings is True) == (arch == "llama-tied")


def test_save_then_load_gives_identical_tensors(tmp_path, base):
    heads = MedusaHeads.for_base_model(base, num_heads=3, num_layers=1, base_model_name_or_path="x")
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn_like(p))
    heads.save(tmp_path)
    loaded = MedusaHeads.load(tmp_path)
    original, reloaded = heads.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    assert all(torch.equal(original[k], reloaded[k]) for k in original)


def test_load_refuses_weights_that_do_not_match_config(tmp_path, base):
    heads = MedusaHeads.for_base_model(base, num_heads=2, num_layers=1, base_model_name_or_path="x")
    heads.save(tmp_path)
    tensors = load_file(str(tmp_path / "medusa_lm_head.safetensors"))
    del tensors["1.1.weight"]
    save_file(tensors, str(tmp_path / "medusa_lm_head.safetensors"))
    with pytest.raises(UserError, match=r"missing 1\.1\.weight"):
        MedusaHeads.load(tmp_path)
    with pytest.raises(UserError, match="config.json is missing"):
        MedusaHeads.load(tmp_path / "nowhere")


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_backbone_hidden_state_feeds_lm_head(tmp_path, tiny_tokenizer, arch):
    model = load_base_model(str(make_tiny_model(arch, tmp_path, tiny_tokenizer)))
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    hidden = backbone(model)(input_ids=ids, use_cache=False).last_hidden_state
    logits = model(input_ids=ids).logits
    torch.testing.assert_close(model.get_output_embeddings()(hidden), logits, rtol=1e-4, atol=1e-4)


def test_medusa_model_loads_heads_onto_base_in_one_call(tmp_path, tiny_model_dir, base):
    heads = MedusaHeads.for_base_model(base, num_heads=3, num_layers=1, base_model_name_or_path=str(tiny_model_dir))
    heads.save(tmp_path)
    model = MedusaModel.from_pretrained(tmp_path)
    ids = torch.randint(0, base.config.vocab_size, (2, 7))
    logits = model.head_logits(ids)
    assert logits.shape == (3, 2, 7, base.config.vocab_size)
    # fresh heads: zero W, so head logits = lm_head(h + silu(b))
    h = model.hidden_states(ids)
    block = model.heads[0][0]
    torch.testing.assert_close(
        logits[0], base.get_output_embeddings()(h + torch.nn.functional.silu(block.linear.bias)), rtol=1e-4, atol=1e-4
    )
    with pytest.raises(UserError, match="hidden size"):
        other = MedusaHeads(heads.config.__class__(3, 1, 16, heads.config.vocab_size, "x"))
        other.save(tmp_path / "other")
        MedusaModel.from_pretrained(tmp_path / "other", base_model=base)
