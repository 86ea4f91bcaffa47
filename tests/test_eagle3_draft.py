"""The EAGLE-3 draft: its folder holds exactly what vLLM 0.33's and SGLang 0.5.23's loaders read, an independent
re-implementation of the engines' forward gives our logits and next feature, the training-time-test attention
equals inference with a KV cache, round trips are bit-exact, and bad folders are refused by name.

The engine rules below were read from the engines' wheels (vllm-0.33.0, sglang-0.5.23 on PyPI; paths cited next
to each mirror); docs/eagle3-reference.md says the same with more context."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import TINY_CONFIGS
from safetensors.torch import load_file, save_file

from medusa_forge.drafts.eagle3_config import draft_vocab_ids, draft_vocabulary, target_features, target_layers
from medusa_forge.drafts.eagle3_model import CachedAttention, Eagle3Draft, UnrolledAttention, causal_bias
from medusa_forge.errors import UserError
from medusa_forge.formats.files import same_tensors

VOCAB = 96
DRAFT_IDS = torch.tensor([0, 2, 3, 7, 11, 12, 40, 41, 60, 95])  # ascending, so d2t offsets are non-decreasing


def tiny_target(arch: str, layers: int, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = TINY_CONFIGS[arch](VOCAB)
    config.num_hidden_layers = layers
    if arch == "qwen2":  # Qwen's own theta, so a draft that ignored the target's would be caught
        config.rope_parameters = {"rope_type": "default", "rope_theta": 1_000_000.0}
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def targets() -> dict[str, transformers.PreTrainedModel]:
    # llama: 8 layers, so the features are the engines' defaults hs[2], hs[4], hs[5]; qwen2 as the tests' usual 2.
    return {"llama": tiny_target("llama", 8), "qwen2": tiny_target("qwen2", 2)}


def trained_like(draft: Eagle3Draft, seed: int = 1) -> Eagle3Draft:
    """Random values everywhere (norms too), so a test cannot pass because a weight is still 1 or a copy."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in draft.parameters():
            param.normal_(0.0, 0.3)
    return draft


# ----- mirrors of the engines' loaders -----


def engine_params(raw: dict, target_vocab: int, stacked: bool = True) -> dict[str, tuple[int, ...]]:
    """The draft model's parameters as both engines build them for a config with no optional keys:
    vllm/model_executor/models/llama_eagle3.py (0.33.0) LlamaModel.__init__ / Eagle3LlamaForCausalLM.__init__ and
    sglang/srt/models/llama_eagle3.py (0.5.23) LlamaModel / LlamaForCausalLMEagle3: embed_tokens [V, H], fc
    [H, target_hidden_size (default H) * 3 aux states], layers.0 (Llama decoder layer whose qkv_proj reads 2H, plus
    hidden_norm), norm, lm_head [draft_vocab_size (default vocab_size), H]; vLLM adds draft_id_to_target_id
    [V_d] (long) only when draft_vocab_size != the target's vocabulary."""
    h, hd, i = raw["hidden_size"], raw["head_dim"], raw["intermediate_size"]
    q, kv = raw["num_attention_heads"] * hd, raw["num_key_value_heads"] * hd
    draft_vocab = raw.get("draft_vocab_size") or raw["vocab_size"]
    layer = "model.layers.0."
    params = {
        "model.embed_tokens.weight": (raw["vocab_size"], h),
        "model.fc.weight": (h, raw.get("target_hidden_size", h) * 3),
        layer + "hidden_norm.weight": (h,),
        layer + "input_layernorm.weight": (h,),
        layer + "self_attn.qkv_proj.weight": (q + 2 * kv, 2 * h),
        layer + "self_attn.o_proj.weight": (h, q),
        layer + "post_attention_layernorm.weight": (h,),
        layer + "mlp.gate_up_proj.weight": (2 * i, h),
        layer + "mlp.down_proj.weight": (h, i),
        "model.norm.weight": (h,),
        "lm_head.weight": (draft_vocab, h),
    }
    if draft_vocab != target_vocab:
        params["draft_id_to_target_id"] = (draft_vocab,)
    if raw.get("fc_norm", False):  # EAGLE 3.1, vLLM 0.32.0's LlamaModel.__init__: one RMSNorm per aux hidden state
        params |= {f"model.fc_norm.{i}.weight": (raw.get("target_hidden_size", h),) for i in range(3)}
    return params


def shard_rows(raw: dict, shard: str | int) -> slice:
    """Rows of the stacked qkv_proj (q, k, v) and gate_up_proj (0, 1) that a shard fills (QKVParallelLinear /
    MergedColumnParallelLinear weight_loader with one rank)."""
    hd, i = raw["head_dim"], raw["intermediate_size"]
    q, kv = raw["num_attention_heads"] * hd, raw["num_key_value_heads"] * hd
    return {
        "q": slice(0, q),
        "k": slice(q, q + kv),
        "v": slice(q + kv, q + 2 * kv),
        0: slice(0, i),
        1: slice(i, 2 * i),
    }[shard]


STACKED = {".q_proj": (".qkv_proj", "q"), ".k_proj": (".qkv_proj", "k"), ".v_proj": (".qkv_proj", "v")}
STACKED |= {".gate_proj": (".gate_up_proj", 0), ".up_proj": (".gate_up_proj", 1)}


class EngineDraft:
    """Parameters filled by an engine's load_weights; `loaded` says which rows of which parameter got values."""

    def __init__(self, folder: Path, target_vocab: int) -> None:
        self.raw = json.loads((folder / "config.json").read_text())
        self.shapes = engine_params(self.raw, target_vocab)
        self.params = {name: torch.full(shape, float("nan")) for name, shape in self.shapes.items()}
        if "draft_id_to_target_id" in self.params:
            self.params["draft_id_to_target_id"] = torch.zeros(self.shapes["draft_id_to_target_id"], dtype=torch.long)
        self.loaded: set[tuple[str, str | int | None]] = set()
        self.dropped: list[str] = []

    def put(self, name: str, tensor: torch.Tensor, shard: str | int | None = None) -> None:
        param = self.params[name]
        rows = param if shard is None else param[shard_rows(self.raw, shard)]
        # default_weight_loader (vllm model_loader/weight_utils.py; sglang srt/model_loader/weight_utils.py) and the
        # sharded loaders assert the shape; a float checkpoint is cast to the parameter's dtype.
        assert tuple(tensor.shape) == tuple(rows.shape), f"{name} {shard}: {tuple(tensor.shape)} vs {tuple(rows.shape)}"
        rows.copy_(tensor.to(param.dtype))
        self.loaded.add((name, shard))

    def missing(self) -> list[str]:
        """Parameters neither engine complains about when the checkpoint lacks them (left uninitialised)."""
        expected = {(n, None) for n in self.params if not n.endswith(("qkv_proj.weight", "gate_up_proj.weight"))}
        expected |= {(n, s) for n in self.params if n.endswith("qkv_proj.weight") for s in "qkv"}
        expected |= {(n, s) for n in self.params if n.endswith("gate_up_proj.weight") for s in (0, 1)}
        # embed_tokens is absent on purpose: both engines share the target's (vLLM process_eagle_weight /
        # _maybe_share_embeddings; SGLang eagle_worker set_embed).
        expected.discard(("model.embed_tokens.weight", None))
        return sorted(str(k) for k in expected - self.loaded)


class VllmEagle3(EngineDraft):
    """vllm-0.33.0 (same in 0.32.0), model_executor/models/llama_eagle3.py Eagle3LlamaForCausalLM.load_weights:
    a name containing "t2d" is skipped; "d2t" becomes draft_id_to_target_id (no prefix); any other name without
    "lm_head" gets "model." prepended. LlamaModel.hf_to_vllm_mapper: "midlayer." -> "layers.0.", q/k/v_proj ->
    qkv_proj shards, gate/up_proj -> gate_up_proj shards. models/utils.py AutoWeightsLoader: an unknown name
    raises ValueError unless it ends in ".bias" (ignore_unexpected_suffixes); nothing checks for missing names
    (load_weights returns None, so default_loader's track_weights_loading is off).
    transformers_utils/configs/eagle.py + models/registry.py: an architecture that starts or ends with Eagle3 is
    kept, others get "Eagle3" prefixed; LlamaForCausalLMEagle3 maps to llama_eagle3.Eagle3LlamaForCausalLM.
    The folder's config goes through transformers' AutoConfig (config/speculative.py). LlamaMLP accepts silu only."""

    REGISTERED = {"Eagle3LlamaForCausalLM", "LlamaForCausalLMEagle3", "Eagle3Qwen3ForCausalLM"}

    def __init__(self, folder: Path, target_vocab: int) -> None:
        super().__init__(folder, target_vocab)
        transformers.AutoConfig.from_pretrained(folder)  # model_type must be one transformers knows
        archs = [
            a if a.startswith("Eagle3") or a.endswith("Eagle3") else "Eagle3" + a for a in self.raw["architectures"]
        ]
        assert archs[0] in self.REGISTERED and archs[0] != "Eagle3Qwen3ForCausalLM", archs
        assert self.raw["hidden_act"] == "silu"
        for name, tensor in load_file(str(folder / "model.safetensors")).items():
            if "t2d" in name:
                continue
            if "d2t" in name:
                name = name.replace("d2t", "draft_id_to_target_id")
            elif "lm_head" not in name:
                name = "model." + name
            name = name.replace("midlayer.", "layers.0.")
            shard = None
            for old, (new, shard_id) in STACKED.items():
                if old in name:
                    name, shard = name.replace(old, new), shard_id
                    break
            if name not in self.params:
                if name.endswith(".bias"):
                    continue
                raise ValueError(f"There is no module or parameter named '{name}' in Eagle3LlamaForCausalLM")
            self.put(name, tensor, shard)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Eagle3LlamaForCausalLM.compute_logits: draft logits scattered into a -inf row of the target vocabulary
        at arange(V_d) + draft_id_to_target_id."""
        logits = hidden @ self.params["lm_head.weight"].T
        if "draft_id_to_target_id" not in self.params:
            return logits
        targets = torch.arange(logits.shape[-1]) + self.params["draft_id_to_target_id"]
        out = logits.new_full((*logits.shape[:-1], self.raw["vocab_size"]), float("-inf"))
        out[..., targets] = logits
        return out


class SglangEagle3(EngineDraft):
    """sglang-0.5.23, srt/models/llama_eagle3.py LlamaForCausalLMEagle3.load_weights: legacy renames ("midlayer" ->
    "layers.0"); "d2t" sets hot_token_id = d2t + arange; "t2d" is skipped; q/k/v and gate/up are stacked; a name is
    used as it is if it is a parameter, else with "model." prepended, else dropped silently; missing parameters
    are not noticed. EntryClass = [LlamaForCausalLMEagle3] and no architecture rewriting for EAGLE-3 drafts
    (configs/model_config.py). tie_word_embeddings makes lm_head the V x H embedding; without draft_vocab_size the
    target's lm_head replaces the draft's (speculative/eagle_worker_v2.py init_lm_head)."""

    def __init__(self, folder: Path, target_vocab: int) -> None:
        super().__init__(folder, target_vocab)
        self.params.pop("draft_id_to_target_id", None)  # SGLang keeps the map as hot_token_id, not a parameter
        self.shapes.pop("draft_id_to_target_id", None)
        assert self.raw["architectures"][0] == "LlamaForCausalLMEagle3"
        assert not self.raw.get("tie_word_embeddings", False) and self.raw.get("draft_vocab_size") is not None
        self.hot_token_id = None
        for name, tensor in load_file(str(folder / "model.safetensors")).items():
            name = name.replace("midlayer", "layers.0")
            if "d2t" in name:
                self.hot_token_id = tensor + torch.arange(tensor.shape[0])
                continue
            if "t2d" in name:
                continue
            shard = None
            for old, (new, shard_id) in STACKED.items():
                if old in name:
                    name, shard = name.replace(old, new), shard_id
                    break
            name = name if name in self.params else f"model.{name}"
            if name in self.params:
                self.put(name, tensor, shard)
            else:
                self.dropped.append(name)


def saved(tmp_path: Path, draft: Eagle3Draft, name: str = "draft") -> Path:
    return draft.save(tmp_path / name)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("draft_ids", [DRAFT_IDS, None], ids=["draft-vocab", "full-vocab"])
def test_folder_loads_by_the_engines_rules(tmp_path, targets, arch, draft_ids):
    target = targets[arch]
    folder = saved(tmp_path, Eagle3Draft.for_target(target, draft_ids, f"tiny-{arch}"))
    raw = json.loads((folder / "config.json").read_text())
    assert set(raw) == {
        "architectures", "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "intermediate_size", "hidden_act", "rms_norm_eps", "rope_theta",
        "rope_scaling", "max_position_embeddings", "vocab_size", "draft_vocab_size", "tie_word_embeddings",
        "attention_bias", "torch_dtype", "base_model_name_or_path",
    }  # fmt: skip
    assert raw["architectures"] == ["LlamaForCausalLMEagle3"] and raw["num_hidden_layers"] == 1
    assert raw["vocab_size"] == target.config.vocab_size and raw["tie_word_embeddings"] is False
    assert raw["draft_vocab_size"] == (len(DRAFT_IDS) if draft_ids is not None else VOCAB)
    assert sorted(folder.iterdir()) == [folder / "config.json", folder / "model.safetensors"]

    state = load_file(str(folder / "model.safetensors"))
    assert ("d2t" in state) == (draft_ids is not None)  # vLLM raises on a d2t when V_d == V
    assert state["t2d"].dtype == torch.bool and state["t2d"].shape == (VOCAB,)
    if draft_ids is not None:
        assert state["d2t"].dtype == torch.int64 and torch.equal(draft_vocab_ids(state["d2t"]), DRAFT_IDS)

    vllm, sglang = VllmEagle3(folder, VOCAB), SglangEagle3(folder, VOCAB)
    assert vllm.missing() == [] and sglang.missing() == [] and sglang.dropped == []
    if draft_ids is not None:
        assert torch.equal(vllm.params["draft_id_to_target_id"], state["d2t"])
        assert sglang.hot_token_id.dtype == torch.int64 and torch.equal(sglang.hot_token_id, DRAFT_IDS)
    else:
        assert "draft_id_to_target_id" not in vllm.params and sglang.hot_token_id is None


def test_an_eagle31_folder_loads_by_vllms_rules_and_back(tmp_path, targets):
    draft = trained_like(Eagle3Draft.for_target(targets["llama"], DRAFT_IDS, "tiny", fc_norm=True, norm_output=True))
    folder = saved(tmp_path, draft)
    raw = json.loads((folder / "config.json").read_text())
    assert raw["fc_norm"] is True and raw["norm_output"] is True
    state = load_file(str(folder / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in state.items() if k.startswith("fc_norm")} == {
        f"fc_norm.{i}.weight": (32,) for i in range(3)
    }
    vllm = VllmEagle3(folder, VOCAB)
    assert vllm.missing() == []
    for i in range(3):
        assert torch.equal(vllm.params[f"model.fc_norm.{i}.weight"], state[f"fc_norm.{i}.weight"])
    loaded = Eagle3Draft.load(folder)
    assert loaded.config.fc_norm and loaded.config.norm_output
    assert same_tensors(loaded.state_dict(), draft.state_dict())


def test_engines_do_not_notice_a_missing_tensor_but_load_does(tmp_path, targets):
    folder = saved(tmp_path, Eagle3Draft.for_target(targets["llama"], DRAFT_IDS, "tiny"))
    state = load_file(str(folder / "model.safetensors"))
    del state["midlayer.mlp.up_proj.weight"]
    save_file(state, str(folder / "model.safetensors"))
    assert VllmEagle3(folder, VOCAB).missing() == ["('model.layers.0.mlp.gate_up_proj.weight', 1)"]
    assert SglangEagle3(folder, VOCAB).missing() == ["('model.layers.0.mlp.gate_up_proj.weight', 1)"]
    with pytest.raises(UserError, match=r"missing tensor\(s\) \['midlayer.mlp.up_proj.weight'\]"):
        Eagle3Draft.load(folder)


# ----- the forward, re-implemented from the reference -----


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Llama's rotary embedding (neox style, halves rotated) on [heads, T, hd]."""
    hd = x.shape[-1]
    angles = positions[:, None].double() * (1.0 / theta ** (torch.arange(0, hd, 2).double() / hd))[None]
    cos, sin = torch.cat([angles.cos()] * 2, -1).float(), torch.cat([angles.sin()] * 2, -1).float()
    half = torch.cat([-x[..., hd // 2 :], x[..., : hd // 2]], -1)
    return x * cos + half * sin


class EngineForward:
    """The draft forward of docs/eagle3-reference.md §2.2 (vLLM llama_eagle3.py LlamaDecoderLayer.forward /
    LlamaModel.forward, SGLang the same for one layer), on the parameters `VllmEagle3` loaded (stacked qkv and
    gate_up), one sequence, with the draft's own KV cache: every pass attends causally to all keys so far."""

    def __init__(self, engine: VllmEagle3) -> None:
        self.p, self.raw, self.engine = engine.params, engine.raw, engine
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def combine(self, features: torch.Tensor) -> torch.Tensor:
        """Eagle3LlamaForCausalLM.combine_hidden_states (vLLM 0.32.0): with config fc_norm each of the three aux
        states is RMS-normed by its own fc_norm.{i} before fc."""
        if self.raw.get("fc_norm", False):
            chunks = features.chunk(3, dim=-1)
            eps = self.raw["rms_norm_eps"]
            norms = [self.p[f"model.fc_norm.{i}.weight"] for i in range(3)]
            features = torch.cat([rms_norm(c, w, eps) for c, w in zip(chunks, norms, strict=True)], -1)
        return features @ self.p["model.fc.weight"].T

    def step(self, embeds: torch.Tensor, feature: torch.Tensor, positions: torch.Tensor):
        """embeds, feature [T, H] -> (logits over the target vocabulary [T, V], next feature [T, H]:
        LlamaModel.forward's aux_output, the post-norm state with config norm_output, else the pre-norm one)."""
        p, raw, eps, layer = self.p, self.raw, self.raw["rms_norm_eps"], "model.layers.0."
        nh, nkv, hd = raw["num_attention_heads"], raw["num_key_value_heads"], raw["head_dim"]
        x = torch.cat(
            [
                rms_norm(embeds, p[layer + "input_layernorm.weight"], eps),
                rms_norm(feature, p[layer + "hidden_norm.weight"], eps),
            ],
            -1,
        )
        q, k, v = (x @ p[layer + "self_attn.qkv_proj.weight"].T).split([nh * hd, nkv * hd, nkv * hd], -1)
        q, k, v = (t.view(len(x), -1, hd).transpose(0, 1) for t in (q, k, v))
        q, k = rope(q, positions, raw["rope_theta"]), rope(k, positions, raw["rope_theta"])
        self.keys.append(k), self.values.append(v)
        keys = torch.cat(self.keys, 1).repeat_interleave(nh // nkv, 0)
        values = torch.cat(self.values, 1).repeat_interleave(nh // nkv, 0)
        past = keys.shape[1] - len(x)
        visible = torch.arange(keys.shape[1])[None] <= past + torch.arange(len(x))[:, None]
        scores = (q @ keys.transpose(-1, -2)) / hd**0.5
        attended = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) @ values
        residual = attended.transpose(0, 1).reshape(len(x), -1) @ p[layer + "self_attn.o_proj.weight"].T + feature
        gate, up = (
            rms_norm(residual, p[layer + "post_attention_layernorm.weight"], eps)
            @ p[layer + "mlp.gate_up_proj.weight"].T
        ).chunk(2, -1)
        state = (F.silu(gate) * up) @ p[layer + "mlp.down_proj.weight"].T + residual
        normed = rms_norm(state, p["model.norm.weight"], eps)
        return self.engine.compute_logits(normed), normed if raw.get("norm_output", False) else state


EAGLE31 = {"eagle3": {}, "fc_norm": {"fc_norm": True}, "norm_output": {"norm_output": True}}
EAGLE31["eagle3.1"] = EAGLE31["fc_norm"] | EAGLE31["norm_output"]


@pytest.mark.parametrize("switches", list(EAGLE31))
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_forward_matches_the_engines(tmp_path, targets, arch, switches):
    target = targets[arch]
    draft = trained_like(Eagle3Draft.for_target(target, DRAFT_IDS, "tiny", **EAGLE31[switches]))
    folder = saved(tmp_path, draft)
    raw = json.loads((folder / "config.json").read_text())
    assert {k: raw[k] for k in ("fc_norm", "norm_output") if k in raw} == EAGLE31[switches]  # only when on
    reference = EngineForward(VllmEagle3(folder, VOCAB))
    draft = Eagle3Draft.load(folder)
    tokens = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(0))
    embed = target.get_input_embeddings()
    with torch.no_grad():
        hidden = target(tokens, output_hidden_states=True).hidden_states
        features = target_features(hidden)[0, :-1]  # positions 0..5; each drafts from the token after it
        assert features.shape[-1] == 3 * target.config.hidden_size
        embeds = embed(tokens[0, 1:])  # the first pass: ids shifted left by one, positions unchanged (§2.2)
        positions = torch.arange(6)

        ref_logits, ref_state = reference.step(embeds, reference.combine(features), positions)
        out = draft.layer(
            embeds[None],
            draft.combine(features[None]),
            positions[None],
            CachedAttention(None, None, causal_bias(torch.ones(1, 6))),
        )
        torch.testing.assert_close(draft.to_target_logits(draft.logits(out.state))[0], ref_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(draft.next_feature(out.state)[0], ref_state, rtol=1e-5, atol=1e-5)
        keys, values = out.keys, out.values

        # Two chain steps: the drafted token (a target id) and the previous state, one position further each.
        for step in range(2):
            token = draft.to_target_ids(draft.logits(out.state[:, -1:]).argmax(-1))
            assert token.item() in DRAFT_IDS.tolist() and token.item() == ref_logits[-1].argmax().item()
            position = torch.tensor([6 + step])
            ref_logits, ref_state = reference.step(embed(token[0]), ref_state[-1:], position)
            out = draft.layer(
                embed(token),
                draft.next_feature(out.state[:, -1:]),
                position[None],
                CachedAttention(keys, values, torch.zeros(1, 1, 1, keys.shape[2] + 1)),
            )
            keys, values = torch.cat([keys, out.keys], 2), torch.cat([values, out.values], 2)
            torch.testing.assert_close(
                draft.to_target_logits(draft.logits(out.state))[0], ref_logits, rtol=1e-5, atol=1e-5
            )
            torch.testing.assert_close(draft.next_feature(out.state)[0], ref_state, rtol=1e-5, atol=1e-5)


# ----- the two attention modes agree -----


def test_training_time_test_attention_equals_inference_with_a_cache(targets):
    target = targets["llama"]
    draft = trained_like(Eagle3Draft.for_target(target, DRAFT_IDS, "tiny")).eval()
    batch, length, steps = 2, 6, 3
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (batch, length + steps), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 4:] = 0  # right padding in the second row
    embed = target.get_input_embeddings()
    positions = torch.arange(length)[None].expand(batch, length)
    with torch.no_grad():
        features = torch.randn(batch, length, 3 * target.config.hidden_size, generator=generator)
        attention = UnrolledAttention(causal_bias(mask))
        feature, inputs, outputs = draft.combine(features), [], []
        for j in range(steps):
            embeds = embed(tokens[:, 1 + j : 1 + j + length])  # step j at index t drafts token t+1+j
            out = draft.layer(embeds, feature, positions + j, attention)
            inputs.append((embeds, feature))
            outputs.append(out)
            attention, feature = attention.after(out.keys, out.values), out.state

        for j in range(steps):
            for b in range(batch):
                for t in range(int(mask[b].sum())):
                    # What inference has cached when it drafts at index t, step j: step 0's keys at 0..t (built
                    # from target features; at step 0 only 0..t-1, the query's own key is the new one) and the
                    # keys steps 1..j-1 produced at t.
                    first = t + 1 if j else t
                    cached = [(outputs[0].keys[b : b + 1, :, :first], outputs[0].values[b : b + 1, :, :first])]
                    cached += [
                        (o.keys[b : b + 1, :, t : t + 1], o.values[b : b + 1, :, t : t + 1]) for o in outputs[1:j]
                    ]
                    keys, values = torch.cat([k for k, _ in cached], 2), torch.cat([v for _, v in cached], 2)
                    embeds, feature = inputs[j]
                    single = draft.layer(
                        embeds[b : b + 1, t : t + 1],
                        feature[b : b + 1, t : t + 1],
                        torch.tensor([[t + j]]),
                        CachedAttention(keys, values, torch.zeros(1, 1, 1, keys.shape[2] + 1)),
                    )
                    torch.testing.assert_close(single.state[0, 0], outputs[j].state[b, t], rtol=1e-5, atol=1e-5)
                    torch.testing.assert_close(single.keys[0, :, 0], outputs[j].keys[b, :, t], rtol=1e-5, atol=1e-5)


def test_unrolled_steps_backpropagate_without_nans_through_padding(targets):
    """Training unrolls steps on the draft's own states; a fully padded row must not turn the loss into NaN."""
    target = targets["llama"]
    draft = Eagle3Draft.for_target(target, DRAFT_IDS, "tiny")
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])  # the second row is all padding
    features = torch.randn(2, 4, 3 * target.config.hidden_size)
    embeds = torch.randn(2, 4, target.config.hidden_size)
    attention, feature, loss = UnrolledAttention(causal_bias(mask)), draft.combine(features), 0.0
    for j in range(3):
        out = draft.layer(embeds, feature, torch.arange(4)[None].expand(2, 4) + j, attention)
        loss = loss + 0.8**j * draft.logits(out.state).logsumexp(-1).mean()
        attention, feature = attention.after(out.keys, out.values), out.state
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in draft.parameters())
    assert draft.fc.weight.grad.abs().sum() > 0


def test_cached_attention_with_a_tree_bias_equals_each_branch_as_a_chain(targets):
    """A tree step: node 0 follows the cached prefix; nodes 1 and 2 are both its children. Each node must see
    the prefix and its ancestors only, as if its branch were drafted alone."""
    target = targets["qwen2"]
    draft = trained_like(Eagle3Draft.for_target(target, None, "tiny")).eval()
    generator = torch.Generator().manual_seed(3)
    hidden = target.config.hidden_size
    with torch.no_grad():
        prefix = draft.layer(
            torch.randn(1, 4, hidden, generator=generator),
            torch.randn(1, 4, hidden, generator=generator),
            torch.arange(4)[None],
            CachedAttention(None, None, causal_bias(torch.ones(1, 4))),
        )
        embeds, features = (
            torch.randn(1, 3, hidden, generator=generator),
            torch.randn(1, 3, hidden, generator=generator),
        )
        depth = torch.tensor([[4, 5, 5]])
        visible = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
        bias = torch.zeros(1, 1, 3, 7).masked_fill(
            ~torch.cat([torch.ones(3, 4, dtype=torch.bool), visible], 1), float("-inf")
        )
        tree = draft.layer(embeds, features, depth, CachedAttention(prefix.keys, prefix.values, bias))
        for branch in ([0, 1], [0, 2]):
            chain = draft.layer(
                embeds[:, branch],
                features[:, branch],
                depth[:, branch],
                CachedAttention(prefix.keys, prefix.values, causal_bias(torch.ones(1, 6))[..., -2:, :]),
            )
            torch.testing.assert_close(chain.state, tree.state[:, branch], rtol=1e-5, atol=1e-5)


# ----- saving, loading, the draft vocabulary -----


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip_is_bit_exact(tmp_path, targets, dtype):
    draft = trained_like(Eagle3Draft.for_target(targets["qwen2"], DRAFT_IDS, "tiny-qwen2")).to(dtype)
    folder = saved(tmp_path, draft)
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == str(dtype).removeprefix("torch.")
    loaded = Eagle3Draft.load(folder)
    assert same_tensors(loaded.state_dict(), draft.state_dict()) and loaded.config == draft.config
    again = saved(tmp_path, loaded, "again")
    assert (again / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    assert (again / "config.json").read_text() == (folder / "config.json").read_text()


def test_draft_vocabulary():
    counts = torch.tensor([0, 5, 3, 5, 0, 1, 0, 0, 2, 0])
    d2t, t2d = draft_vocabulary(counts, 4)  # 1 and 3 (5 each), 2 (3), 8 (2): sorted ascending
    assert d2t.dtype == torch.int64 and d2t.tolist() == [1, 1, 1, 5] and draft_vocab_ids(d2t).tolist() == [1, 2, 3, 8]
    assert t2d.dtype == torch.bool and t2d.nonzero().flatten().tolist() == [1, 2, 3, 8]
    assert draft_vocab_ids(draft_vocabulary(counts, 1)[0]).tolist() == [1]  # a tie goes to the lower id
    assert draft_vocab_ids(draft_vocabulary(counts, 2)[0]).tolist() == [1, 3]
    # Only 5 ids occur: the lowest unused ids (0, 4) fill up to 7.
    assert draft_vocab_ids(draft_vocabulary(counts, 7)[0]).tolist() == [0, 1, 2, 3, 4, 5, 8]
    d2t, t2d = draft_vocabulary(counts, 10)
    assert d2t.tolist() == [0] * 10 and bool(t2d.all())
    for size in (0, 11):
        with pytest.raises(UserError, match="between 1 and the vocabulary size 10"):
            draft_vocabulary(counts, size)


def test_full_vocabulary_folder_has_no_d2t_and_loads_zero_offsets(tmp_path, targets):
    counts = torch.bincount(torch.randint(0, VOCAB, (500,)), minlength=VOCAB)
    d2t, _ = draft_vocabulary(counts, VOCAB)
    folder = saved(tmp_path, Eagle3Draft.for_target(targets["llama"], draft_vocab_ids(d2t), "tiny"))
    assert "d2t" not in load_file(str(folder / "model.safetensors"))
    loaded = Eagle3Draft.load(folder)
    assert loaded.d2t.tolist() == [0] * VOCAB and bool(loaded.t2d.all())
    assert loaded.to_target_ids(torch.tensor([5, 90])).tolist() == [5, 90]


def test_for_target_takes_sizes_and_a_sensible_start(targets):
    for arch, layers in (("llama", 8), ("qwen2", 2), ("mistral", 3), ("gemma", 4)):
        target = targets[arch] if arch in targets else tiny_target(arch, layers)
        text = target.config.get_text_config()
        draft = Eagle3Draft.for_target(target, DRAFT_IDS, arch)
        config = draft.config
        assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (
            text.hidden_size, text.num_attention_heads, text.num_key_value_heads,
        )  # fmt: skip
        assert config.head_dim == (getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
        assert config.rope_theta == text.rope_parameters["rope_theta"] and config.hidden_act == "silu"
        assert config.vocab_size == VOCAB and config.draft_vocab_size == len(DRAFT_IDS)
        assert torch.equal(draft.lm_head.weight, target.get_output_embeddings().weight[DRAFT_IDS])
        for norm in (draft.norm, draft.midlayer.hidden_norm, draft.midlayer.input_layernorm):
            assert bool((norm.weight == 1).all())
        assert draft.fc.weight.std().item() == pytest.approx(text.initializer_range, rel=0.2)
        assert "embed" not in " ".join(draft.state_dict())  # the target's embedding stays the target's


def test_target_layers():
    assert target_layers(30) == (2, 15, 27)  # SmolLM2-135M, the embedded default
    assert target_layers(32) == (2, 16, 29) and target_layers(7) == (2, 3, 4)  # engine defaults from 7 layers
    assert target_layers(6) == (3, 4, 5) and target_layers(3) == (0, 1, 2) and target_layers(2) == (0, 1, 2)
    for layers in range(2, 80):
        low, mid, high = target_layers(layers)
        assert 0 <= low < mid < high <= layers
    with pytest.raises(UserError, match=">= 2 layers"):
        target_layers(1)


# ----- refused folders -----


def rewrite_config(folder: Path, **changes) -> None:
    raw = json.loads((folder / "config.json").read_text()) | changes
    (folder / "config.json").write_text(json.dumps({k: v for k, v in raw.items() if v != "DELETE"}))


def rewrite_weights(folder: Path, change) -> None:
    state = load_file(str(folder / "model.safetensors"))
    change(state)
    save_file(state, str(folder / "model.safetensors"))


CORRUPTIONS = {
    "no config": (lambda f: (f / "config.json").unlink(), "config.json is missing"),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), "model.safetensors is missing"),
    "not safetensors": (lambda f: (f / "model.safetensors").write_text("{}"), "not a readable safetensors"),
    "eagle_config": (lambda f: rewrite_config(f, eagle_config={}), r"unexpected \['eagle_config'\]"),
    "no draft_vocab_size": (lambda f: rewrite_config(f, draft_vocab_size="DELETE"), r"missing \['draft_vocab_size'\]"),
    "tied": (lambda f: rewrite_config(f, tie_word_embeddings=True), "tie_word_embeddings is True"),
    "fc_norm not a bool": (lambda f: rewrite_config(f, fc_norm="yes"), "fc_norm must be true or false, found 'yes'"),
    "fc_norm without its norms": (
        lambda f: rewrite_config(f, fc_norm=True),
        r"missing tensor\(s\) \['fc_norm.0.weight', 'fc_norm.1.weight', 'fc_norm.2.weight'\]",
    ),
    "two layers": (lambda f: rewrite_config(f, num_hidden_layers=2), "num_hidden_layers is 2"),
    "Qwen3 arch": (lambda f: rewrite_config(f, architectures=["Qwen3ForCausalLM"]), "architectures is"),
    "vocab mismatch": (lambda f: rewrite_config(f, vocab_size=VOCAB + 1), r"tensor t2d has shape \(96,\)"),
    "model. prefix": (
        lambda f: rewrite_weights(f, lambda s: s.__setitem__("model.fc.weight", s.pop("fc.weight"))),
        r"missing tensor\(s\) \['fc.weight'\]",
    ),
    "extra bias": (
        lambda f: rewrite_weights(f, lambda s: s.__setitem__("fc.bias", torch.zeros(32))),
        r"unexpected tensor\(s\) \['fc.bias'\]",
    ),
    "lm_head rows": (
        lambda f: rewrite_weights(f, lambda s: s.__setitem__("lm_head.weight", s["lm_head.weight"][:5])),
        r"tensor lm_head.weight has shape \(5, 32\), the config says \(10, 32\)",
    ),
    "float d2t": (
        lambda f: rewrite_weights(f, lambda s: s.__setitem__("d2t", s["d2t"].float())),
        "tensor d2t is torch.float32",
    ),
    "absolute d2t": (
        lambda f: rewrite_weights(f, lambda s: s.__setitem__("d2t", DRAFT_IDS.clone())),
        "tensor d2t: draft ids must map to strictly increasing target ids",
    ),
    "t2d off": (lambda f: rewrite_weights(f, lambda s: s["t2d"].__setitem__(1, True)), "t2d does not mark exactly"),
    "mixed dtypes": (
        lambda f: rewrite_weights(f, lambda s: s.__setitem__("norm.weight", s["norm.weight"].bfloat16())),
        r"tensor norm.weight is torch.bfloat16, expected torch.float32",
    ),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_bad_folders_are_refused_by_name(tmp_path, targets, corruption):
    folder = saved(tmp_path, Eagle3Draft.for_target(targets["llama"], DRAFT_IDS, "tiny"))
    corrupt, message = CORRUPTIONS[corruption]
    corrupt(folder)
    with pytest.raises(UserError, match=message):
        Eagle3Draft.load(folder)
