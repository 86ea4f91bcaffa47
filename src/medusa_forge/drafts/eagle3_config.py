"""EAGLE-3 drafts on disk: the config and the layout (config.json + model.safetensors) that vLLM's `llama_eagle3.py`
(0.32/0.33) and SGLang's `srt/models/llama_eagle3.py` (0.5.23) load as they are, the target's feature layers, the
draft vocabulary's maps, and the checks an engine's loader would make. docs/eagle3-reference.md holds the engine
rules this file follows (its section numbers are cited as §). The module itself: `eagle3_model.py`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import LlamaConfig, PretrainedConfig

from medusa_forge.drafts.model_folder import CONFIG_NAME, FLOAT_DTYPES, check_config_values
from medusa_forge.errors import UserError

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
EAGLE31_SWITCHES = ("fc_norm", "norm_output")  # optional config keys, absent = off (Eagle3Config)


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
    # A target dispatched over several devices leaves each layer's state on that layer's device: the features go
    # to the first (the embeddings' output), where the inputs and the draft are.
    return torch.cat([hidden_states[i].to(hidden_states[0].device) for i in layers], dim=-1)


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
    # EAGLE 3.1's switches (arXiv 2605.09992), read by vLLM's llama_eagle3.py (0.32.0's CPU build already has them)
    # as `getattr(config, "fc_norm" / "norm_output", False)`: written only when on, so a plain draft's config.json
    # stays what every engine version reads. fc_norm: an RMSNorm per feature layer before `fc` (weights
    # fc_norm.{i}.weight); norm_output: the next step is fed the post-norm state instead of the pre-norm one.
    fc_norm: bool = False
    norm_output: bool = False

    @classmethod
    def for_target(
        cls,
        target_config: PretrainedConfig,
        draft_vocab_size: int,
        base_model_name_or_path: str,
        intermediate_size: int | None = None,
        fc_norm: bool = False,
        norm_output: bool = False,
    ) -> Eagle3Config:
        """Sizes from the target's text config (Llama, Qwen2/3, Mistral, Gemma ...): one layer of its shape; EAGLE
        3.1's switches as given."""
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
            fc_norm=fc_norm,
            norm_output=norm_output,
        )

    def to_json(self) -> dict:
        raw = {k: v for k, v in asdict(self).items() if k not in EAGLE31_SWITCHES or v}
        first = ("architectures", "model_type")  # where a reader looks first
        return {k: raw[k] for k in first} | {k: v for k, v in raw.items() if k not in first}

    @classmethod
    def from_json(cls, raw: dict, where: str) -> Eagle3Config:
        """Exactly our keys, the fixed values the engines need, and integer sizes; errors name the file."""
        keys = set(cls.__dataclass_fields__)
        missing, extra = sorted(keys - set(raw) - set(EAGLE31_SWITCHES)), sorted(set(raw) - keys)
        if missing or extra:
            raise UserError(
                f"{where} is not an EAGLE-3 draft config written by medusa-forge: "
                + "; ".join(p for p in (missing and f"missing {missing}", extra and f"unexpected {extra}") if p)
                + " (extra keys such as eagle_config or norm_before_fc change what the engines compute)"
            )
        for key in EAGLE31_SWITCHES:
            if not isinstance(raw.get(key, False), bool):
                raise UserError(f"{where}: {key} must be true or false, found {raw[key]!r}")
        sizes = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")
        integers = (*sizes, "max_position_embeddings", "vocab_size", "draft_vocab_size")
        check_config_values(raw, where, FIXED_CONFIG, integers)
        if raw["draft_vocab_size"] > raw["vocab_size"]:
            raise UserError(f"{where}: draft_vocab_size {raw['draft_vocab_size']} > vocab_size {raw['vocab_size']}")
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
        if self.fc_norm:
            shapes |= {f"fc_norm.{i}.weight": (h,) for i in range(3)}  # one per feature layer, before fc
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
