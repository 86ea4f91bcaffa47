"""The DFlash draft module (its config, layout and checks: `dflash_config.py`; docs/dflash-reference.md holds the
engine rules both follow, cited as §).

One forward drafts a whole block (§2.2). The target's hidden states at `target_layer_ids` (HF hs[t + 1]) are
concatenated and projected once, `context` = hidden_norm(fc(features)); every draft layer projects that same context
to keys/values (`context_kv`: k_proj -> k_norm -> rope at the context's absolute positions, v_proj), never through
input_layernorm (§6.7). The block [bonus token, mask x (B-1)] is embedded with the target's frozen embedding and runs
through Qwen3-style layers (q_norm/k_norm) in which every block token attends, non-causally, to the visible context
keys and to all B tokens of its own block (`block`). The target's lm_head turns the output at slots 1..B-1 into the
B-1 drafted tokens: neither the embedding nor the lm_head is part of the draft, and neither is saved.

The same `block` serves training (N blocks per sequence, block n seeing the context before its anchor only, §4) and
decoding (one block seeing every accepted position, whose keys/values the drafter keeps).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP, Qwen3RMSNorm, Qwen3RotaryEmbedding, rotate_half

from medusa_forge.drafts.dflash_config import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_NUM_LAYERS,
    FLOAT_DTYPES,
    DFlashConfig,
    check_tensors,
)
from medusa_forge.drafts.model_folder import model_folder_files, save_model_folder
from medusa_forge.formats.files import load_safetensors, read_json

KV = tuple[torch.Tensor, torch.Tensor]  # one layer's rotated context keys and values, each [b, nkv, S, hd]


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's rotate_half rotary embedding (neox style, the engines' default, §6.8); cos/sin broadcast over heads."""
    return x * cos + rotate_half(x) * sin


def _repeat_kv(x: torch.Tensor, groups: int, dim: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=dim)


def target_final_norm(target: nn.Module) -> torch.Tensor | None:
    """The weight of the target's final RMSNorm (x * w, not Gemma's x * (1 + w)), from the target or from the
    stand-in training keeps of it (`final_norm`); None where there is none."""
    found = getattr(target, "final_norm", None)
    if found is None:
        norm = getattr(getattr(target, "base_model", None), "norm", None)
        weight = getattr(norm, "weight", None)
        found = (type(norm).__name__, weight) if isinstance(weight, torch.Tensor) else None
    if found is None or not found[0].endswith("RMSNorm") or found[0].startswith("Gemma"):
        return None
    return found[1]


class DFlashAttention(nn.Module):
    """Qwen3 attention projections (names as the engines'); what a block sees comes from `block`'s arguments."""

    def __init__(self, config: DFlashConfig) -> None:
        super().__init__()
        h, hd = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.q_proj = nn.Linear(h, self.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.num_heads * hd, h, bias=False)
        self.q_norm = Qwen3RMSNorm(hd, eps=config.rms_norm_eps)
        self.k_norm = Qwen3RMSNorm(hd, eps=config.rms_norm_eps)

    def keys_values(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> KV:
        """x [..., T, H] -> rotated keys and values [..., nkv, T, hd] (cos/sin [..., T, hd])."""
        shape = (*x.shape[:-1], self.num_kv_heads, self.head_dim)
        k = self.k_norm(self.k_proj(x).view(shape)).transpose(-2, -3)
        v = self.v_proj(x).view(shape).transpose(-2, -3)
        return _rope(k, cos.unsqueeze(-3), sin.unsqueeze(-3)), v

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, context: KV, context_bias: torch.Tensor
    ) -> torch.Tensor:
        """x [b, N, B, H] normed block tokens; context keys/values [b, nkv, S, hd]; context_bias [b, N, S] additive.
        One softmax over the visible context keys and the block's own B keys (non-causal, §2.3)."""
        b, n, size, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, n, size, self.num_heads, self.head_dim)).transpose(2, 3)
        q = _rope(q, cos.unsqueeze(2), sin.unsqueeze(2))  # [b, N, nh, B, hd]
        kb, vb = self.keys_values(x, cos, sin)  # [b, N, nkv, B, hd]
        groups = self.num_heads // self.num_kv_heads
        kc, vc = (_repeat_kv(t, groups, 1).float() for t in context)
        kb, vb = (_repeat_kv(t, groups, 2).float() for t in (kb, vb))
        q32, scale = q.float(), self.head_dim**-0.5
        scores_context = torch.einsum("bnhqd,bhkd->bnhqk", q32, kc) * scale + context_bias[:, :, None, None].float()
        scores_block = torch.einsum("bnhqd,bnhkd->bnhqk", q32, kb) * scale
        probs = torch.softmax(torch.cat([scores_context, scores_block], dim=-1), dim=-1)
        width = kc.shape[2]
        out = torch.einsum("bnhqk,bhkd->bnhqd", probs[..., :width], vc)
        out = out + torch.einsum("bnhqk,bnhkd->bnhqd", probs[..., width:], vb)
        return self.o_proj(out.to(x.dtype).transpose(2, 3).reshape(b, n, size, -1))


class DFlashLayer(nn.Module):
    def __init__(self, config: DFlashConfig) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = Qwen3RMSNorm(h, eps=eps)
        self.self_attn = DFlashAttention(config)
        self.post_attention_layernorm = Qwen3RMSNorm(h, eps=eps)
        self.mlp = Qwen3MLP(config.qwen3_config())


class DFlashDraft(nn.Module):
    """The draft; `state_dict()` names are the engines' (§0, no `model.` prefix), so saving is `save_safetensors`."""

    def __init__(self, config: DFlashConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.fc = nn.Linear(len(config.target_layer_ids) * h, h, bias=False)
        self.hidden_norm = Qwen3RMSNorm(h, eps=config.rms_norm_eps)
        self.layers = nn.ModuleList(DFlashLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = Qwen3RMSNorm(h, eps=config.rms_norm_eps)
        # Not a submodule: `.to(bfloat16)` would round its inv_freq buffer; it moves to the input's device per call.
        object.__setattr__(self, "rotary", Qwen3RotaryEmbedding(config.qwen3_config()))

    def _cos_sin(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [*positions.shape, hd] in x's dtype for integer `positions` of any shape."""
        if self.rotary.inv_freq.device != x.device:
            self.rotary.to(x.device)
        flat = positions.reshape(1, -1)
        cos, sin = self.rotary(x, flat)
        return cos.view(*positions.shape, -1), sin.view(*positions.shape, -1)

    def context(self, features: torch.Tensor) -> torch.Tensor:
        """[..., k*H] target features (hs[t+1] for t in target_layer_ids, concatenated) -> [..., H]."""
        return self.hidden_norm(self.fc(features))

    def context_kv(self, context: torch.Tensor, positions: torch.Tensor) -> list[KV]:
        """Every layer's rotated keys/values [b, nkv, S, hd] of `context` [b, S, H] at `positions` [b, S]."""
        cos, sin = self._cos_sin(context, positions)
        return [layer.self_attn.keys_values(context, cos, sin) for layer in self.layers]

    def block(
        self, embeds: torch.Tensor, positions: torch.Tensor, context: list[KV], visible: torch.Tensor | None = None
    ) -> torch.Tensor:
        """embeds [b, N, B, H]: the target's embedding of each block [bonus, mask ...]; positions [b, N, B] their
        absolute positions; context: `context_kv`; visible [b, N, S] bool: which context positions block n sees
        (None: all). Returns norm(output) [b, N, B, H], which the target's lm_head turns into logits."""
        x = embeds
        cos, sin = self._cos_sin(x, positions)
        width = context[0][0].shape[2] if context else 0
        if visible is None:
            bias = x.new_zeros(x.shape[0], x.shape[1], width, dtype=torch.float32)
        else:
            bias = torch.zeros(visible.shape, device=x.device).masked_fill(~visible, torch.finfo(torch.float32).min)
        for layer, kv in zip(self.layers, context, strict=True):
            x = x + layer.self_attn(layer.input_layernorm(x), cos, sin, kv, bias)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.norm(x)

    # -- creating, saving, loading --

    @classmethod
    def for_target(
        cls,
        target: PreTrainedModel,
        base_model_name_or_path: str,
        mask_token_id: int,
        block_size: int = DEFAULT_BLOCK_SIZE,
        num_layers: int = DEFAULT_NUM_LAYERS,
    ) -> DFlashDraft:
        """Fresh float32 draft for `target`: linear weights normal(0, initializer_range) as HF initialises Qwen3,
        norms at 1 but the final one, which starts as the target's final norm (our choice, the reference's init is
        not published: the draft's output plays the target's last residual state before the shared lm_head, whose
        logits are only as sharp as that norm's scale makes them)."""
        config = DFlashConfig.for_target(target.config, base_model_name_or_path, mask_token_id, block_size, num_layers)
        draft = cls(config)
        std = getattr(target.config.get_text_config(), "initializer_range", None) or 0.02
        with torch.no_grad():
            for module in draft.modules():
                if isinstance(module, nn.Linear):
                    module.weight.normal_(0.0, std)
            final = target_final_norm(target)
            if final is not None and final.shape == draft.norm.weight.shape:
                draft.norm.weight.copy_(final.detach().float().cpu())
        return draft

    def save(self, folder: str | Path) -> Path:
        state = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        self.config = save_model_folder(folder, state, self.config, check_tensors)
        return Path(folder)

    @classmethod
    def load(cls, folder: str | Path) -> DFlashDraft:
        """A checked draft in the dtype it was saved in: exact tensor names, shapes and dtype."""
        config_path, weights_path = model_folder_files(folder, "a DFlash draft")
        config = DFlashConfig.from_json(read_json(config_path), str(config_path))
        state = load_safetensors(weights_path)
        check_tensors(state, config, str(weights_path))
        draft = cls(config).to(FLOAT_DTYPES[config.torch_dtype])
        draft.load_state_dict(state)
        return draft
