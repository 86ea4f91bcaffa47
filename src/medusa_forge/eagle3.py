"""EAGLE-3 drafts: the module and its on-disk layout (config.json + model.safetensors), which vLLM's
`llama_eagle3.py` (0.32/0.33) and SGLang's `srt/models/llama_eagle3.py` (0.5.23) load as they are.
docs/eagle3-reference.md holds the engine rules this file follows (its section numbers are cited as §).

The draft reads three hidden states of the frozen target per token (`target_layers`), projects them to the
hidden size (`combine`), and runs one Llama decoder layer whose attention input is
[input_layernorm(token embedding) ; hidden_norm(feature)] with the feature as residual (`layer`). Its pre-norm
output state is the next step's feature; `logits` = lm_head(norm(state)) over a draft vocabulary of V_d target
ids, mapped back with `d2t` (target id = draft id + d2t[draft id]). The target's embedding is not part of the
draft: callers pass `target.get_input_embeddings()(ids)`, frozen, as the engines do (SGLang always uses it).

Attention serves two callers through one `layer`, which always returns the new keys/values:
- `UnrolledAttention`, training-time test: step j's query at index t sees step 0's keys at 0..t (causal +
  padding) and the keys that steps 1..j produced at index t, under one softmax (§4, EAGLE-3's reference).
- `CachedAttention`, inference: new tokens see cached draft keys plus themselves through an additive float
  bias the caller builds (a chain or a tree); the caller keeps or prunes the returned keys/values.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from transformers import LlamaConfig, PretrainedConfig, PreTrainedModel
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from medusa_forge.errors import UserError
from medusa_forge.formats.files import load_safetensors, read_json, save_safetensors

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ARCHITECTURE = "LlamaForCausalLMEagle3"  # the only name both engines accept (§1.1)
# Below this many target layers the engines' default feature layers (2, L//2, L-3) are not three distinct
# layers (L=6 gives 2, 3, 3), so no engine can serve the draft; we still train and decode such tiny targets.
ENGINE_MIN_TARGET_LAYERS = 7
# Values the engines need and we always write; a folder with anything else is refused (§0, §6).
FIXED_CONFIG = {
    "architectures": [ARCHITECTURE],
    "model_type": "llama",
    "num_hidden_layers": 1,  # the engines disagree on layers > 0 (§1.6)
    "hidden_act": "silu",  # vLLM's LlamaMLP accepts only silu
    "rope_scaling": None,
    "tie_word_embeddings": False,  # SGLang would tie lm_head to the V x H embedding
    "attention_bias": False,  # ignored by SGLang, so a bias would make the engines disagree
}
FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def target_layers(num_target_layers: int) -> tuple[int, int, int]:
    """Indices into HF `output_hidden_states` (0 = embeddings, i = after i layers) the draft reads, ascending.

    Targets with >= 7 layers: the engines' defaults hs[2], hs[L//2], hs[L-3] (§2.1), the only ones an export
    may use since we write no layer ids. Smaller targets (tests): those collide or go negative, so we take the
    three states below the final norm, hs[L-3], hs[L-2], hs[L-1]; a 2-layer target has only hs[0..2], where
    hs[2] is after the final norm (consistent between our trainer and decoder, never served by an engine)."""
    n = num_target_layers
    if n >= ENGINE_MIN_TARGET_LAYERS:
        return 2, n // 2, n - 3
    if n >= 3:
        return n - 3, n - 2, n - 1
    if n == 2:
        return 0, 1, 2
    raise UserError(f"an EAGLE-3 draft reads three hidden states of its target, which needs >= 2 layers, not {n}")


def target_features(hidden_states: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
    """[..., 3 H_t]: the target's `output_hidden_states` at `target_layers`, concatenated in ascending order."""
    layers = target_layers(len(hidden_states) - 1)
    return torch.cat([hidden_states[i] for i in layers], dim=-1)


def _rope_theta(config: PretrainedConfig) -> float:
    # transformers 5 keeps it in rope_parameters, 4.x as an attribute
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta or getattr(config, "rope_theta", None) or 10000.0)


@dataclass
class Eagle3Config:
    """What config.json of a draft folder holds: exactly the engines' keys (§0) plus base_model_name_or_path.
    hidden_size equals the target's (H = H_t), so fc is [H, 3H] and no target_hidden_size is written."""

    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    vocab_size: int  # the target's config.vocab_size (padded), not the tokenizer length
    draft_vocab_size: int  # always written: without it SGLang replaces our lm_head with the target's
    base_model_name_or_path: str
    torch_dtype: str = "float32"  # the dtype of the saved weights
    architectures: list[str] = field(default_factory=lambda: [ARCHITECTURE])
    model_type: str = "llama"
    num_hidden_layers: int = 1
    hidden_act: str = "silu"
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False

    @classmethod
    def for_target(
        cls,
        target_config: PretrainedConfig,
        draft_vocab_size: int,
        base_model_name_or_path: str,
        intermediate_size: int | None = None,
    ) -> Eagle3Config:
        """Sizes from the target's text config (Llama, Qwen2/3, Mistral, Gemma ...): one layer of its shape."""
        text = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
        heads = text.num_attention_heads
        vocab = text.vocab_size
        if not 1 <= draft_vocab_size <= vocab:
            raise UserError(f"draft vocabulary size must be between 1 and the target's vocabulary {vocab}")
        return cls(
            hidden_size=text.hidden_size,
            num_attention_heads=heads,
            num_key_value_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            intermediate_size=intermediate_size or text.intermediate_size,
            rms_norm_eps=float(getattr(text, "rms_norm_eps", None) or 1e-6),
            rope_theta=_rope_theta(text),
            max_position_embeddings=getattr(text, "max_position_embeddings", None) or 4096,
            vocab_size=vocab,
            draft_vocab_size=draft_vocab_size,
            base_model_name_or_path=base_model_name_or_path,
        )

    def to_json(self) -> dict:
        raw = asdict(self)
        first = ("architectures", "model_type")  # where a reader looks first
        return {k: raw[k] for k in first} | {k: v for k, v in raw.items() if k not in first}

    @classmethod
    def from_json(cls, raw: dict, where: str) -> Eagle3Config:
        """Exactly our keys, the fixed values the engines need, and integer sizes; errors name the file."""
        keys = set(cls.__dataclass_fields__)
        missing, extra = sorted(keys - set(raw)), sorted(set(raw) - keys)
        if missing or extra:
            raise UserError(
                f"{where} is not an EAGLE-3 draft config written by medusa-forge: "
                + "; ".join(p for p in (missing and f"missing {missing}", extra and f"unexpected {extra}") if p)
                + " (extra keys such as eagle_config or norm_output change what the engines compute)"
            )
        for key, value in FIXED_CONFIG.items():
            if raw[key] != value:
                raise UserError(f"{where}: {key} is {raw[key]!r}; vLLM and SGLang need {value!r}")
        sizes = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")
        for key in (*sizes, "max_position_embeddings", "vocab_size", "draft_vocab_size"):
            if not isinstance(raw[key], int) or isinstance(raw[key], bool) or raw[key] < 1:
                raise UserError(f"{where}: {key} must be a positive integer, found {raw[key]!r}")
        for key in ("rms_norm_eps", "rope_theta"):
            value = raw[key]
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < float("inf"):
                raise UserError(f"{where}: {key} must be a positive number, found {value!r}")
        if not isinstance(raw["base_model_name_or_path"], str) or not raw["base_model_name_or_path"]:
            raise UserError(f"{where}: base_model_name_or_path must name the target model, found "
                            f"{raw['base_model_name_or_path']!r}")  # fmt: skip
        if raw["draft_vocab_size"] > raw["vocab_size"]:
            raise UserError(f"{where}: draft_vocab_size {raw['draft_vocab_size']} > vocab_size {raw['vocab_size']}")
        if raw["num_attention_heads"] % raw["num_key_value_heads"]:
            raise UserError(f"{where}: num_attention_heads must be a multiple of num_key_value_heads")
        if raw["torch_dtype"] not in FLOAT_DTYPES:
            raise UserError(f"{where}: torch_dtype {raw['torch_dtype']!r} is not one of {sorted(FLOAT_DTYPES)}")
        return cls(**raw)

    def llama_config(self) -> LlamaConfig:
        """The transformers config of the one decoder layer, for its building blocks (rotary, MLP)."""
        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=1,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act=self.hidden_act,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            max_position_embeddings=self.max_position_embeddings,
            attention_bias=False,
            mlp_bias=False,
        )

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of model.safetensors and its shape (§0); d2t only when the draft vocabulary is smaller."""
        h, i, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        shapes = {
            "fc.weight": (h, 3 * h),
            "midlayer.hidden_norm.weight": (h,),
            "midlayer.input_layernorm.weight": (h,),
            "midlayer.self_attn.q_proj.weight": (q, 2 * h),
            "midlayer.self_attn.k_proj.weight": (kv, 2 * h),
            "midlayer.self_attn.v_proj.weight": (kv, 2 * h),
            "midlayer.self_attn.o_proj.weight": (h, q),
            "midlayer.post_attention_layernorm.weight": (h,),
            "midlayer.mlp.gate_proj.weight": (i, h),
            "midlayer.mlp.up_proj.weight": (i, h),
            "midlayer.mlp.down_proj.weight": (h, i),
            "norm.weight": (h,),
            "lm_head.weight": (self.draft_vocab_size, h),
            "t2d": (self.vocab_size,),
        }
        if self.draft_vocab_size != self.vocab_size:
            shapes["d2t"] = (self.draft_vocab_size,)  # vLLM raises on a d2t when V_d == V (§1.3)
        return shapes


# ----- the draft vocabulary: d2t offsets and the t2d mask (§1.5) -----


def is_eagle3_folder(folder: str | Path) -> bool:
    """Whether `folder` holds an EAGLE-3 draft (its config.json names the engines' EAGLE-3 architecture)."""
    path = Path(folder, CONFIG_NAME)
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and raw.get("architectures") == [ARCHITECTURE]


def check_servable(config: Eagle3Config, where: str, target: str | None = None, flag: str = "--model") -> int | None:
    """Refuse a draft the engines cannot serve with its target (`target`: the base the engines will load, default the
    draft's own): one of another hidden size or vocabulary (`pairing.check_fits`), or a target with fewer than
    ENGINE_MIN_TARGET_LAYERS layers (the engines' feature layers collide). Returns the target's layer count; None
    when its config is not on this machine (not checked; nothing is downloaded)."""
    from medusa_forge.pairing import check_fits, local_shape

    name = target or config.base_model_name_or_path
    shape = local_shape(name)
    if shape is None or shape.num_layers is None:
        return None
    check_fits("EAGLE-3 draft", config.hidden_size, config.vocab_size, shape, name, where, flag)
    if shape.num_layers < ENGINE_MIN_TARGET_LAYERS:
        raise UserError(
            f"{where}: the target {name} has {shape.num_layers} layers; vLLM and SGLang read the target's hidden "
            f"states 2, L//2 and L-3, which need at least {ENGINE_MIN_TARGET_LAYERS} layers"
        )
    return shape.num_layers


def vocabulary_maps(draft_vocab_ids: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d2t, t2d) for ascending unique target ids: d2t[i] = ids[i] - i (int64), t2d[v] = v in ids (bool)."""
    ids = torch.as_tensor(draft_vocab_ids, dtype=torch.int64).flatten()
    check_vocabulary_ids(ids, vocab_size, "draft vocabulary")
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[ids] = True
    return ids - torch.arange(len(ids)), t2d


def draft_vocab_ids(d2t: torch.Tensor) -> torch.Tensor:
    """The target id of every draft id: arange(V_d) + d2t."""
    return torch.arange(len(d2t), device=d2t.device) + d2t


def draft_vocabulary(token_counts: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `size` most frequent target ids (ties: lower id first; ids that never occurred fill up, lowest
    first), sorted ascending, as (d2t int64 [size], t2d bool [V]). token_counts is [V], e.g. a bincount of
    the loss-masked training tokens with minlength V. size == V gives d2t all zero."""
    counts = torch.as_tensor(token_counts).flatten().cpu()
    if not 1 <= size <= len(counts):
        raise UserError(f"draft vocabulary size must be between 1 and the vocabulary size {len(counts)}, not {size}")
    # A stable descending sort keeps equal counts in id order, so zero counts come last, lowest id first.
    order = torch.sort(counts, descending=True, stable=True).indices
    return vocabulary_maps(order[:size].sort().values, len(counts))


def check_vocabulary_ids(ids: torch.Tensor, vocab_size: int, where: str) -> None:
    """Target ids must be strictly increasing and inside [0, V): vLLM scatters logits to them (§6.6)."""
    if len(ids) == 0 or ids[0] < 0 or ids[-1] >= vocab_size or (len(ids) > 1 and bool((ids[1:] <= ids[:-1]).any())):
        raise UserError(f"{where}: draft ids must map to strictly increasing target ids in [0, {vocab_size})")


def check_tensors(state: dict[str, torch.Tensor], config: Eagle3Config, where: str) -> None:
    """Exactly the tensors the engines load, with the config's shapes and dtypes, and consistent d2t/t2d.
    The engines do not notice a missing tensor (§1.3.8, §1.4.6), so this check must."""
    shapes = config.tensor_shapes()
    missing, extra = sorted(set(shapes) - set(state)), sorted(set(state) - set(shapes))
    if missing:
        raise UserError(f"{where}: missing tensor(s) {missing}")
    if extra:
        raise UserError(f"{where}: unexpected tensor(s) {extra} (vLLM raises on unknown names, SGLang drops them)")
    dtype = FLOAT_DTYPES[config.torch_dtype]
    for name, shape in shapes.items():
        tensor = state[name]
        if tuple(tensor.shape) != shape:
            raise UserError(f"{where}: tensor {name} has shape {tuple(tensor.shape)}, the config says {shape}")
        expected = {"d2t": torch.int64, "t2d": torch.bool}.get(name, dtype)
        if tensor.dtype != expected:
            raise UserError(f"{where}: tensor {name} is {tensor.dtype}, expected {expected}")
    d2t = state.get("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.int64))
    ids = draft_vocab_ids(d2t)
    check_vocabulary_ids(ids, config.vocab_size, f"{where}: tensor d2t")
    t2d = state["t2d"]
    if int(t2d.sum()) != len(ids) or not bool(t2d[ids].all()):
        raise UserError(f"{where}: tensor t2d does not mark exactly the target ids of d2t")


# ----- the module -----


class LayerOutput(NamedTuple):
    state: torch.Tensor  # [B, T, H] pre-norm: the next step's feature, and the input of `logits`
    keys: torch.Tensor  # [B, nkv, T, hd] rotated keys of these tokens
    values: torch.Tensor  # [B, nkv, T, hd]


def causal_bias(attention_mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, 1, T, T] additive bias: 0 where query t may see key s (s <= t and key s is not padding), else the
    dtype's minimum (not -inf, so a fully masked padding row stays finite). attention_mask: [B, T], 1 = token."""
    length = attention_mask.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None, None] & attention_mask.bool()[:, None, None, :]
    return torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


@dataclass
class UnrolledAttention:
    """Training-time test. `bias` [B, 1, T, T] (see `causal_bias`) says which step-0 keys each query sees;
    `keys`/`values` hold the earlier steps' [B, nkv, T, hd], step 0 first. Step j's query at index t attends
    to step 0's keys at the indices `bias` allows and to steps 1..j's keys at index t (the current step's own
    included), one softmax over both. After each step: `attention = attention.after(out.keys, out.values)`."""

    bias: torch.Tensor
    keys: tuple[torch.Tensor, ...] = ()
    values: tuple[torch.Tensor, ...] = ()

    def after(self, keys: torch.Tensor, values: torch.Tensor) -> UnrolledAttention:
        return UnrolledAttention(self.bias, (*self.keys, keys), (*self.values, values))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keys, values = (*self.keys, k), (*self.values, v)
        groups = q.shape[1] // k.shape[1]
        scale = q.shape[-1] ** -0.5
        q32 = q.float()
        prefix = q32 @ _repeat_kv(keys[0], groups).float().transpose(-1, -2) * scale + self.bias.float()
        # Steps 1..j: each query meets only the key of its own index, a dot product per step: [B, nh, T, j].
        diagonal = [(q32 * _repeat_kv(key, groups).float()).sum(-1, keepdim=True) * scale for key in keys[1:]]
        probs = torch.softmax(torch.cat([prefix, *diagonal], dim=-1), dim=-1)
        length = prefix.shape[-1]
        out = probs[..., :length] @ _repeat_kv(values[0], groups).float()
        for step, value in enumerate(values[1:]):
            out = out + probs[..., length + step, None] * _repeat_kv(value, groups).float()
        return out.to(q.dtype)


@dataclass
class CachedAttention:
    """Inference. New tokens see `keys`/`values` [B, nkv, P, hd] (the draft's cache, P may be 0: None) and
    themselves, as `bias` [B or 1, 1, T, P + T] allows: 0 = visible, a large negative (or -inf) = hidden.
    A chain is a causal bias over the new tokens; a tree lets each node see the prefix and its ancestors."""

    keys: torch.Tensor | None
    values: torch.Tensor | None
    bias: torch.Tensor

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.keys is not None:
            k, v = torch.cat([self.keys, k], dim=2), torch.cat([self.values, v], dim=2)
        groups = q.shape[1] // k.shape[1]
        scores = q.float() @ _repeat_kv(k, groups).float().transpose(-1, -2) * q.shape[-1] ** -0.5
        probs = torch.softmax(scores + self.bias.float(), dim=-1)
        return (probs @ _repeat_kv(v, groups).float()).to(q.dtype)


class Eagle3Attention(nn.Module):
    """Projections only (names as the engines'); what may be seen comes from the attention object."""

    def __init__(self, config: Eagle3Config) -> None:
        super().__init__()
        h, hd = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.q_proj = nn.Linear(2 * h, self.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(2 * h, self.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(2 * h, self.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.num_heads * hd, h, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention: UnrolledAttention | CachedAttention,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        out = attention.attend(q, k, v).transpose(1, 2).reshape(batch, length, -1)
        return self.o_proj(out), k, v


class Eagle3Layer(nn.Module):
    """The one decoder layer ("midlayer"): Llama's, with a 2H attention input and a norm for the feature."""

    def __init__(self, config: Eagle3Config) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.hidden_norm = LlamaRMSNorm(h, eps=eps)
        self.input_layernorm = LlamaRMSNorm(h, eps=eps)
        self.self_attn = Eagle3Attention(config)
        self.post_attention_layernorm = LlamaRMSNorm(h, eps=eps)
        self.mlp = LlamaMLP(config.llama_config())


class Eagle3Draft(nn.Module):
    """The draft; `state_dict()` names are the engines' (§0), so saving is `save_safetensors(state)`."""

    def __init__(self, config: Eagle3Config) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.fc = nn.Linear(3 * h, h, bias=False)
        self.midlayer = Eagle3Layer(config)
        self.norm = LlamaRMSNorm(h, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(h, config.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.int64))
        t2d = torch.zeros(config.vocab_size, dtype=torch.bool)
        t2d[: config.draft_vocab_size] = True
        self.register_buffer("t2d", t2d)
        # Not a submodule: `.to(bfloat16)` would round its inv_freq buffer; it moves to the input's device per call.
        object.__setattr__(self, "rotary", LlamaRotaryEmbedding(config.llama_config()))

    # -- the forward pieces (§2.2) --

    def combine(self, features: torch.Tensor) -> torch.Tensor:
        """[..., 3 H_t] target features (`target_features`) -> [..., H], the first step's feature."""
        return self.fc(features)

    def layer(
        self,
        embeds: torch.Tensor,
        feature: torch.Tensor,
        position_ids: torch.Tensor,
        attention: UnrolledAttention | CachedAttention,
    ) -> LayerOutput:
        """One draft pass. embeds [B, T, H]: the target's embedding of the token each index drafts from (the
        token after the feature's position); feature [B, T, H]: `combine(...)` or the previous step's state;
        position_ids [B, T]: rotary positions (the feature's target position, +1 per later step)."""
        m = self.midlayer
        x = torch.cat([m.input_layernorm(embeds), m.hidden_norm(feature)], dim=-1)  # embedding first (§6.12)
        cos, sin = self.rotary(x, position_ids)
        attended, keys, values = m.self_attn(x, cos, sin, attention)
        residual = attended + feature
        state = residual + m.mlp(m.post_attention_layernorm(residual))
        return LayerOutput(state, keys, values)

    def logits(self, state: torch.Tensor) -> torch.Tensor:
        """[..., V_d] logits over the draft vocabulary."""
        return self.lm_head(self.norm(state))

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    def to_target_logits(self, draft_logits: torch.Tensor) -> torch.Tensor:
        """[..., V]: draft logits at their target ids, -inf elsewhere (vLLM's compute_logits)."""
        out = draft_logits.new_full((*draft_logits.shape[:-1], self.config.vocab_size), float("-inf"))
        out[..., draft_vocab_ids(self.d2t)] = draft_logits
        return out

    # -- creating, saving, loading --

    @classmethod
    def for_target(
        cls,
        target: PreTrainedModel,
        draft_vocab_ids: torch.Tensor | None,
        base_model_name_or_path: str,
        intermediate_size: int | None = None,
    ) -> Eagle3Draft:
        """Fresh float32 draft for `target` over the given ascending target ids (None: the whole vocabulary).
        lm_head starts as the target's lm_head rows of those ids (a sensible first guess, since norm(state)
        plays the part of the target's final hidden state); norms at 1; other weights normal(0,
        initializer_range) as HF initialises Llama."""
        lm_head = target.get_output_embeddings()
        if lm_head is None or getattr(lm_head, "weight", None) is None:
            raise UserError(f"{type(target).__name__} has no output embedding (lm_head) to start the draft from")
        vocab = target.config.get_text_config().vocab_size
        ids = torch.arange(vocab) if draft_vocab_ids is None else torch.as_tensor(draft_vocab_ids).flatten()
        config = Eagle3Config.for_target(target.config, len(ids), base_model_name_or_path, intermediate_size)
        if lm_head.weight.shape != (vocab, config.hidden_size):
            shape = (vocab, config.hidden_size)
            raise UserError(f"target lm_head is {tuple(lm_head.weight.shape)}, expected {shape}")
        d2t, t2d = vocabulary_maps(ids, vocab)
        draft = cls(config)
        std = getattr(target.config.get_text_config(), "initializer_range", None) or 0.02
        with torch.no_grad():
            for module in draft.modules():
                if isinstance(module, nn.Linear):
                    module.weight.normal_(0.0, std)
            draft.lm_head.weight.copy_(lm_head.weight.detach()[ids.to(lm_head.weight.device)].float().cpu())
            draft.d2t.copy_(d2t)
            draft.t2d.copy_(t2d)
        return draft

    def engine_state(self) -> dict[str, torch.Tensor]:
        """The tensors of model.safetensors: the state dict, less d2t when V_d == V (vLLM would raise)."""
        state = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        if self.config.draft_vocab_size == self.config.vocab_size:
            del state["d2t"]
        return state

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = self.engine_state()
        dtypes = {t.dtype for name, t in state.items() if name not in ("d2t", "t2d")}
        if len(dtypes) != 1 or next(iter(dtypes)) not in FLOAT_DTYPES.values():
            raise UserError(f"cannot save a draft whose weights are {sorted(map(str, dtypes))}: one float dtype needed")
        dtype = next(iter(dtypes))
        config = Eagle3Config(**{**asdict(self.config), "torch_dtype": str(dtype).removeprefix("torch.")})
        check_tensors(state, config, str(folder / WEIGHTS_NAME))  # never write what the engines misread
        (folder / CONFIG_NAME).write_text(json.dumps(config.to_json(), indent=2) + "\n")
        save_safetensors(state, folder / WEIGHTS_NAME)
        self.config = config
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Eagle3Draft:
        """A checked draft in the dtype it was saved in: exact tensor names, shapes, dtypes and maps."""
        folder = Path(folder)
        config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise UserError(f"{folder} is not an EAGLE-3 draft folder: {path.name} is missing")
        config = Eagle3Config.from_json(read_json(config_path), str(config_path))
        state = load_safetensors(weights_path)
        check_tensors(state, config, str(weights_path))
        state.setdefault("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.int64))
        draft = cls(config).to(FLOAT_DTYPES[config.torch_dtype])
        draft.load_state_dict(state)
        return draft
