"""The DFlash draft: its folder holds exactly what vLLM 0.32.0's `model_executor/models/qwen3_dflash.py` loader
reads (mirrored below, with the line it comes from), an independent re-implementation of the reference forward
(docs/dflash-reference.md §2.2, z-lab's `DFlashDraftModel.forward`) gives our block output, several blocks at once
with context masks equal one block at a time, round trips are bit-exact, and bad folders are refused by name."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import TINY_CONFIGS
from safetensors.torch import load_file, save_file

from medusa_forge.drafts.dflash_config import (
    build_target_layer_ids,
    feature_layer_ids,
    hidden_state_indices,
    is_dflash_folder,
    resolve_mask_token_id,
)
from medusa_forge.drafts.dflash_model import DFlashDraft
from medusa_forge.errors import UserError
from medusa_forge.formats.files import same_tensors

VOCAB = 96


def tiny_target(layers: int = 6, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = TINY_CONFIGS["llama"](VOCAB)
    config.num_hidden_layers = layers
    config.rope_parameters = {"rope_type": "default", "rope_theta": 50_000.0}  # not a default: must be carried over
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def trained_like(draft: DFlashDraft, seed: int = 1) -> DFlashDraft:
    """Random values everywhere (norms too), so a test cannot pass because a weight is still 1."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in draft.parameters():
            param.normal_(0.0, 0.3)
    return draft


@pytest.fixture(scope="module")
def draft() -> DFlashDraft:
    return trained_like(DFlashDraft.for_target(tiny_target(), "tiny", mask_token_id=5, block_size=4, num_layers=2))


# ----- a mirror of vLLM 0.32.0's loader (vllm/model_executor/models/qwen3_dflash.py) -----


def vllm_parameters(raw: dict) -> dict[str, tuple[tuple[int, ...], dict]]:
    """The parameters DFlashQwen3Model.__init__ / DFlashQwen3ForCausalLM.__init__ build for `raw` (config.json),
    by name, with the shards a stacked parameter takes (QKVParallelLinear: q, k, v; gate_up_proj: 0, 1)."""
    h, i = raw["hidden_size"], raw["intermediate_size"]
    hd = raw.get("head_dim") or h // raw["num_attention_heads"]
    q, kv = raw["num_attention_heads"] * hd, raw["num_key_value_heads"] * hd
    # _get_dflash_fc_input_size: (target_hidden_size or hidden_size) * len(aux layers from dflash_config)
    k = len(raw["dflash_config"]["target_layer_ids"])
    params = {
        "model.fc.weight": ((h, (raw.get("target_hidden_size") or h) * k), {}),
        "model.hidden_norm.weight": ((h,), {}),
        "model.norm.weight": ((h,), {}),
    }
    for n in range(raw["num_hidden_layers"]):
        p = f"model.layers.{n}."
        params |= {
            p + "input_layernorm.weight": ((h,), {}),
            p + "post_attention_layernorm.weight": ((h,), {}),
            p + "self_attn.qkv_proj.weight": ((q + 2 * kv, h), {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}),
            p + "self_attn.o_proj.weight": ((h, q), {}),
            p + "self_attn.q_norm.weight": ((hd,), {}),
            p + "self_attn.k_norm.weight": ((hd,), {}),
            p + "mlp.gate_up_proj.weight": ((2 * i, h), {0: (0, i), 1: (i, i)}),
            p + "mlp.down_proj.weight": ((h, i), {}),
        }
    return params


STACKED = {".q_proj": (".qkv_proj", "q"), ".k_proj": (".qkv_proj", "k"), ".v_proj": (".qkv_proj", "v"),
           ".gate_proj": (".gate_up_proj", 0), ".up_proj": (".gate_up_proj", 1)}  # fmt: skip


def vllm_load(raw: dict, state: dict[str, torch.Tensor]) -> set[str]:
    """What DFlashQwen3ForCausalLM.load_weights does with each tensor name (lines 886-927): assert no mask_hidden,
    skip t2d, prefix `model.` unless lm_head, then hf_to_vllm_mapper's stacking; every shard must fit its parameter.
    Returns the parameters (and shards) loaded; an own embed_tokens / lm_head marks the draft as owning them."""
    params, loaded = vllm_parameters(raw), set()
    for name, tensor in state.items():
        assert "mask_hidden" not in name and "t2d" not in name and "d2t" not in name
        assert "lm_head" not in name and "embed_tokens" not in name, f"{name}: the draft would not share the target's"
        name = "model." + name
        shard = None
        for old, (new, shard_id) in STACKED.items():
            if old in name:
                name, shard = name.replace(old, new), shard_id
                break
        assert name in params, f"vLLM has no parameter {name}"
        shape, shards = params[name]
        if shard is None:
            assert tuple(tensor.shape) == shape, name
        else:
            assert tuple(tensor.shape) == (shards[shard][1], *shape[1:]), (name, shard)
        key = f"{name}:{shard}"
        assert key not in loaded
        loaded.add(key)
    return loaded


def test_saved_folder_is_what_vllm_0_32_qwen3_dflash_loads(draft, tmp_path):
    draft.save(tmp_path / "d")
    raw = json.loads((tmp_path / "d" / "config.json").read_text())
    # §0: the keys both engines read, and none of those that silently change what they compute (§6)
    assert raw["architectures"] == ["DFlashDraftModel"] and raw["model_type"] == "qwen3"
    assert raw["dflash_config"] == {"mask_token_id": 5, "target_layer_ids": [1, 2, 3]}  # build_target_layer_ids(6, 3)
    assert raw["block_size"] == 4 and raw["num_target_layers"] == 6 and raw["num_hidden_layers"] == 2
    assert raw["rope_theta"] == 50_000.0 and raw["layer_types"] == ["full_attention"] * 2
    assert raw["tie_word_embeddings"] is False and raw["use_sliding_window"] is False
    for key in ("eagle_config", "eagle_aux_hidden_state_layer_ids", "target_layer_ids", "draft_vocab_size",
                "target_hidden_size", "is_causal", "logit_scale", "auto_map", "mask_token_id"):  # fmt: skip
        assert key not in raw
    state = load_file(str(tmp_path / "d" / "model.safetensors"))
    loaded = vllm_load(raw, state)
    expected = {f"{n}:{s}" for n, (_, shards) in vllm_parameters(raw).items() for s in (shards or [None])}
    assert loaded == expected  # every parameter vLLM builds (less the shared embedding and lm_head) gets its weights
    assert not (tmp_path / "d" / "mask_embedding.pt").exists()
    # transformers (what vLLM's ModelConfig reads) takes the folder for a Qwen3 config, all layers full attention
    hf = transformers.AutoConfig.from_pretrained(tmp_path / "d")
    assert hf.model_type == "qwen3" and hf.layer_types == ["full_attention"] * 2 and hf.head_dim == 8


def test_round_trip_is_bit_exact_and_keeps_the_dtype(draft, tmp_path):
    draft.save(tmp_path / "f32")
    again = DFlashDraft.load(tmp_path / "f32")
    assert same_tensors(again.state_dict(), draft.state_dict()) and again.config == draft.config
    half = DFlashDraft.load(tmp_path / "f32").to(torch.bfloat16)
    half.save(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert DFlashDraft.load(tmp_path / "bf16").fc.weight.dtype == torch.bfloat16


def reference_block(draft: DFlashDraft, features, embeds, ctx_pos, block_pos) -> torch.Tensor:
    """z-lab's forward written out (§2.2): context = hidden_norm(fc(features)); per layer the block is normed, the
    keys/values are projected from [context ; normed block] and the block attends to all of them without a mask."""
    cfg = draft.config
    rotary = transformers.models.qwen3.modeling_qwen3.Qwen3RotaryEmbedding(cfg.qwen3_config())
    ctx = draft.hidden_norm(draft.fc(features))
    cos, sin = rotary(embeds, torch.cat([ctx_pos, block_pos])[None])
    x = embeds
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    for layer in draft.layers:
        a = layer.self_attn
        h = layer.input_layernorm(x)
        both = torch.cat([ctx, h])
        q = a.q_norm(a.q_proj(h).view(-1, nh, hd)).transpose(0, 1)
        k = a.k_norm(a.k_proj(both).view(-1, nkv, hd)).transpose(0, 1)
        v = a.v_proj(both).view(-1, nkv, hd).transpose(0, 1)
        q, _ = transformers.models.llama.modeling_llama.apply_rotary_pos_emb(
            q[None], q[None], cos[:, len(ctx_pos):], sin[:, len(ctx_pos):]
        )
        k, _ = transformers.models.llama.modeling_llama.apply_rotary_pos_emb(k[None], k[None], cos, sin)
        k, v = k[0].repeat_interleave(nh // nkv, 0), v.repeat_interleave(nh // nkv, 0)
        out = F.scaled_dot_product_attention(q[0], k, v)  # no mask: non-causal over context + block
        x = x + a.o_proj(out.transpose(0, 1).reshape(len(x), -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return draft.norm(x)


def test_block_forward_matches_the_reference_and_masks_give_one_block_at_a_time(draft):
    torch.manual_seed(3)
    length, size, hidden = 10, draft.config.block_size, draft.config.hidden_size
    features = torch.randn(length, 3 * hidden)
    embeds = torch.randn(3, size, hidden)  # three blocks, anchors 2, 5, 9
    anchors = [2, 5, 9]
    positions = torch.tensor([[a + k for k in range(size)] for a in anchors])
    with torch.no_grad():
        context = draft.context(features)[None]
        kv = draft.context_kv(context, torch.arange(length)[None])
        visible = torch.arange(length)[None, :] < torch.tensor(anchors)[:, None]  # strictly before the anchor (§6.6)
        ours = draft.block(embeds[None], positions[None], kv, visible[None])[0]
        for n, anchor in enumerate(anchors):
            ref = reference_block(draft, features[:anchor], embeds[n], torch.arange(anchor), positions[n])
            torch.testing.assert_close(ours[n], ref, atol=1e-5, rtol=1e-5)
            # decoding's path: only the visible context's keys, no mask
            cut = [(k[:, :, :anchor], v[:, :, :anchor]) for k, v in kv]
            alone = draft.block(embeds[None, n : n + 1], positions[None, n : n + 1], cut)[0, 0]
            torch.testing.assert_close(alone, ref, atol=1e-5, rtol=1e-5)


def test_feature_layers_and_mask_token_follow_the_reference(tiny_tokenizer):
    assert build_target_layer_ids(30, 1) == [15] and build_target_layer_ids(30, 3) == [1, 14, 27]
    assert build_target_layer_ids(36, 5) == [1, 9, 17, 25, 33]  # SpecForge configs/qwen3-8b-dflash.json
    assert feature_layer_ids(4) == [1] and feature_layer_ids(5) == [1, 2]  # no repeats
    assert feature_layer_ids(30) == [1, 14, 27] and feature_layer_ids(2) == [1]  # SmolLM2; the tests' tiny models
    assert hidden_state_indices([1, 27]) == (2, 28)  # decoder layer t is HF hidden_states[t + 1] (§6.1)
    with pytest.raises(UserError, match="--dflash_num_layers 1"):
        build_target_layer_ids(2, 2)
    # no mask token and no spare row (tokenizer = vocabulary): pad; a padded vocabulary: the first spare row
    vocab = len(tiny_tokenizer)
    assert resolve_mask_token_id(tiny_tokenizer, vocab) == tiny_tokenizer.pad_token_id
    assert resolve_mask_token_id(tiny_tokenizer, vocab + 64) == vocab
    assert resolve_mask_token_id(tiny_tokenizer, vocab, given=7) == 7
    with pytest.raises(UserError, match="--dflash_mask_token_id"):
        resolve_mask_token_id(None, vocab, given=vocab)


def test_bad_folders_are_refused_by_name(draft, tmp_path):
    folder = draft.save(tmp_path / "d")
    assert is_dflash_folder(folder)
    raw = json.loads((folder / "config.json").read_text())
    for change, message in [
        ({"eagle_config": {}}, "unexpected \\['eagle_config'\\]"),
        ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
        ({"dflash_config": {"mask_token_id": 5, "target_layer_ids": [1, 2, 3], "causal": True}}, "dflash_config"),
        ({"dflash_config": {"mask_token_id": 5, "target_layer_ids": [3, 1]}}, "ascending"),
        ({"model_type": "llama"}, "model_type"),
    ]:
        (folder / "config.json").write_text(json.dumps(raw | change))
        with pytest.raises(UserError, match=message):
            DFlashDraft.load(folder)
    (folder / "config.json").write_text(json.dumps(raw))
    state = load_file(str(folder / "model.safetensors"))
    save_file({"model." + k: v for k, v in state.items()}, str(folder / "model.safetensors"))
    with pytest.raises(UserError, match="missing tensor"):
        DFlashDraft.load(folder)
    save_file(state | {"lm_head.weight": torch.zeros(VOCAB, 32)}, str(folder / "model.safetensors"))
    with pytest.raises(UserError, match="unexpected tensor.*lm_head"):
        DFlashDraft.load(folder)
