"""The EAGLE-3 draft module (its config, layout and checks: `eagle3_config.py`; docs/eagle3-reference.md holds the
engine rules both follow, cited as §).

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

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from medusa_forge.drafts.eagle3_config import (
    FLOAT_DTYPES,
    Eagle3Config,
    check_tensors,
    draft_vocab_ids,
    vocabulary_maps,
)
from medusa_forge.drafts.model_folder import model_folder_files, save_model_folder
from medusa_forge.errors import UserError
from medusa_forge.formats.files import load_safetensors, read_json

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
        # EAGLE 3.1: each feature layer normalised on its own before fc (vLLM's combine_hidden_states)
        self.fc_norm = (
            nn.ModuleList(LlamaRMSNorm(h, eps=config.rms_norm_eps) for _ in range(3)) if config.fc_norm else None
        )
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
        if self.fc_norm is not None:
            chunks = features.chunk(len(self.fc_norm), dim=-1)
            features = torch.cat([norm(chunk) for norm, chunk in zip(self.fc_norm, chunks, strict=True)], dim=-1)
        return self.fc(features)

    def next_feature(self, state: torch.Tensor) -> torch.Tensor:
        """The feature the next step reads from this step's output `state`: the state itself, or with EAGLE 3.1's
        norm_output the post-norm state (vLLM's `aux_output`); `logits` reads the pre-norm state either way."""
        return self.norm(state) if self.config.norm_output else state

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
        fc_norm: bool = False,
        norm_output: bool = False,
    ) -> Eagle3Draft:
        """Fresh float32 draft for `target` over the given ascending target ids (None: the whole vocabulary).
        lm_head starts as the target's lm_head rows of those ids (a sensible first guess, since norm(state)
        plays the part of the target's final hidden state); norms at 1; other weights normal(0,
        initializer_range) as HF initialises Llama. `fc_norm`, `norm_output`: EAGLE 3.1's switches (Eagle3Config)."""
        lm_head = target.get_output_embeddings()
        if lm_head is None or getattr(lm_head, "weight", None) is None:
            raise UserError(f"{type(target).__name__} has no output embedding (lm_head) to start the draft from")
        vocab = target.config.get_text_config().vocab_size
        ids = torch.arange(vocab) if draft_vocab_ids is None else torch.as_tensor(draft_vocab_ids).flatten()
        config = Eagle3Config.for_target(
            target.config, len(ids), base_model_name_or_path, intermediate_size, fc_norm, norm_output
        )
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
        self.config = save_model_folder(folder, self.engine_state(), self.config, check_tensors, maps=("d2t", "t2d"))
        return Path(folder)

    @classmethod
    def load(cls, folder: str | Path) -> Eagle3Draft:
        """A checked draft in the dtype it was saved in: exact tensor names, shapes, dtypes and maps."""
        config_path, weights_path = model_folder_files(folder, "an EAGLE-3 draft")
        config = Eagle3Config.from_json(read_json(config_path), str(config_path))
        state = load_safetensors(weights_path)
        check_tensors(state, config, str(weights_path))
        state.setdefault("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.int64))
        draft = cls(config).to(FLOAT_DTYPES[config.torch_dtype])
        draft.load_state_dict(state)
        return draft
