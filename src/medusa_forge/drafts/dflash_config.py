"""DFlash block drafts on disk: the config and the layout (config.json + model.safetensors) that vLLM 0.32.0's
`qwen3_dflash.py` and SGLang 0.5.23's `models/dflash.py` load as they are, the target layers the draft reads, the
mask token, and the checks an engine's loader would make. docs/dflash-reference.md holds the engine rules this file
follows (its section numbers are cited as §). The module itself: `dflash_model.py`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import PretrainedConfig, Qwen3Config

from medusa_forge.drafts.model_folder import CONFIG_NAME, FLOAT_DTYPES, check_config_values
from medusa_forge.errors import UserError
from medusa_forge.formats.tree_file import load_served_chain

ARCHITECTURE = "DFlashDraftModel"  # the name both engines resolve (§1.1)
# Training defaults of SpecForge (sgl-project/SpecForge a6b6b02, §4): block size 16 (populate_dflash_generated_config,
# also SGLang's and z-lab's default) and one draft layer (providers.py TargetDerivedDraftDefaults).
DEFAULT_BLOCK_SIZE = 16
DEFAULT_NUM_LAYERS = 1
FEATURE_LAYERS = 3  # target layers read (`feature_layer_ids`)
# Values the engines need and we always write; a folder with anything else is refused (§0, §6).
FIXED_CONFIG = {
    "architectures": [ARCHITECTURE],
    "model_type": "qwen3",
    "hidden_act": "silu",
    "rope_scaling": None,
    "attention_bias": False,
    "tie_word_embeddings": False,
    "use_sliding_window": False,  # any sliding/causal switch makes vLLM run the block causally (§6.5)
    "sliding_window": None,
}


def build_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """The reference's default feature layers (`build_target_layer_ids`, identical in z-lab, SpecForge and SGLang,
    §2.1): decoder-layer indices t, read as HF hidden_states[t + 1]. One draft layer: [L // 2]; else evenly spread
    over 1 .. L-3 (Python's round: halves to even, as the reference)."""
    n, layers = num_draft_layers, num_target_layers
    if n == 1:
        return [layers // 2]
    if layers < 4:
        raise UserError(
            f"the target has {layers} layers: {n} DFlash draft layers read {n} target layers spread over 1 .. L-3, "
            "which needs a target of >= 4 layers (SGLang refuses fewer); use --dflash_num_layers 1"
        )
    return [round(1 + i * (layers - 4) / (n - 1)) for i in range(n)]


def feature_layer_ids(num_target_layers: int) -> list[int]:
    """The target layers a draft for a target of `num_target_layers` layers reads: the reference's spread for
    FEATURE_LAYERS layers (low, middle, high) without repeats (a target under 6 layers spreads them over fewer), or
    [L // 2] for a target under 4 layers (tests' tiny models).

    The reference ties the count to the number of draft layers (k = n_d, §2.1) and SpecForge's one-layer default
    reads [L // 2] alone. We fix it from the target instead: the hidden-state cache is keyed and planned from the
    target's config before train's flags reach the kind (`DraftKind.record_layers`), and three layers give the one
    draft layer the low/middle/high view an EAGLE-3 draft has. The engines read the ids from config.json, so any
    ascending list serves."""
    if num_target_layers < 4:
        return [num_target_layers // 2]
    return sorted(set(build_target_layer_ids(num_target_layers, FEATURE_LAYERS)))


def hidden_state_indices(target_layer_ids: list[int]) -> tuple[int, ...]:
    """The HF `output_hidden_states` indices of DFlash's target layer ids: t + 1 (§2.1, §6.1)."""
    return tuple(t + 1 for t in target_layer_ids)


def resolve_mask_token_id(tokenizer, vocab_size: int, given: int | None = None) -> int:
    """The token whose frozen target embedding row fills the block's masked slots, SpecForge's order
    (`resolve_mask_token_id`, §4): the one given, the tokenizer's mask token, an unused embedding row
    (len(tokenizer) when the vocabulary is padded beyond it, as Qwen3's 151669), then pad, eos, unk. A target such as
    SmolLM2 (tokenizer = vocabulary = 49152) has no spare row, so its pad (or eos) token is the mask: the row stays
    frozen and we ship no mask_embedding.pt, so the target's own outputs never change (§6.4)."""
    candidates = [given, getattr(tokenizer, "mask_token_id", None)]
    if tokenizer is not None and len(tokenizer) < vocab_size:
        candidates.append(len(tokenizer))
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        candidates.append(getattr(tokenizer, name, None))
    for candidate in candidates:
        if isinstance(candidate, int) and 0 <= candidate < vocab_size:
            return candidate
    if given is not None:
        raise UserError(f"--dflash_mask_token_id {given} is outside the target's vocabulary [0, {vocab_size})")
    raise UserError("no mask token for the DFlash block: the tokenizer has no mask, pad, eos or unk token and no "
                    "spare embedding row; pass --dflash_mask_token_id")  # fmt: skip


def _rope_theta(config: PretrainedConfig) -> float:
    # transformers 5 keeps it in rope_parameters, 4.x as an attribute
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta or getattr(config, "rope_theta", None) or 10000.0)


@dataclass
class DFlashConfig:
    """What config.json of a DFlash draft folder holds: the engines' keys (§0) plus base_model_name_or_path.
    hidden_size equals the target's (the target's embedding feeds layer 0, §6.11), so fc is [H, k*H]."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    vocab_size: int  # the target's config.vocab_size (padded): the mask id and the target lm_head live in it
    block_size: int  # B: the bonus token + B-1 masked slots (SGLang reads it; vLLM takes num_speculative_tokens)
    num_target_layers: int  # SGLang range-checks target_layer_ids against it
    dflash_config: dict  # {"mask_token_id": m, "target_layer_ids": [t ...]} (decoder-layer indices, ascending)
    base_model_name_or_path: str
    torch_dtype: str = "float32"  # the dtype of the saved weights
    architectures: list[str] = field(default_factory=lambda: [ARCHITECTURE])
    model_type: str = "qwen3"
    hidden_act: str = "silu"
    rope_scaling: dict | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    use_sliding_window: bool = False
    sliding_window: int | None = None
    layer_types: list[str] = field(default_factory=list)  # all full_attention: the block is non-causal (§2.3)

    def __post_init__(self) -> None:
        if not self.layer_types:
            self.layer_types = ["full_attention"] * self.num_hidden_layers

    @property
    def mask_token_id(self) -> int:
        return self.dflash_config["mask_token_id"]

    @property
    def target_layer_ids(self) -> list[int]:
        return list(self.dflash_config["target_layer_ids"])

    @classmethod
    def for_target(
        cls,
        target_config: PretrainedConfig,
        base_model_name_or_path: str,
        mask_token_id: int,
        block_size: int = DEFAULT_BLOCK_SIZE,
        num_layers: int = DEFAULT_NUM_LAYERS,
    ) -> DFlashConfig:
        """`num_layers` layers of the target's shape (heads, head_dim, MLP width, eps, rope theta) reading the
        target layers `feature_layer_ids`."""
        text = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
        heads, layers = text.num_attention_heads, text.num_hidden_layers
        if block_size < 2:
            raise UserError(f"--dflash_block_size must be >= 2 (a bonus token and a draft), not {block_size}")
        if num_layers < 1:
            raise UserError(f"--dflash_num_layers must be >= 1, not {num_layers}")
        return cls(
            hidden_size=text.hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            num_key_value_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            intermediate_size=text.intermediate_size,
            rms_norm_eps=float(getattr(text, "rms_norm_eps", None) or 1e-6),
            rope_theta=_rope_theta(text),  # written explicitly: vLLM defaults a missing theta to 1e6 (§6.8)
            max_position_embeddings=getattr(text, "max_position_embeddings", None) or 4096,
            vocab_size=text.vocab_size,
            block_size=block_size,
            num_target_layers=layers,
            dflash_config={
                "mask_token_id": mask_token_id,
                "target_layer_ids": feature_layer_ids(layers),
            },
            base_model_name_or_path=base_model_name_or_path,
        )

    def to_json(self) -> dict:
        raw = asdict(self)
        first = ("architectures", "model_type")  # where a reader looks first
        return {k: raw[k] for k in first} | {k: v for k, v in raw.items() if k not in first}

    @classmethod
    def from_json(cls, raw: dict, where: str) -> DFlashConfig:
        """Exactly our keys, the fixed values the engines need, and sane sizes; errors name the file."""
        keys = set(cls.__dataclass_fields__)
        missing, extra = sorted(keys - set(raw)), sorted(set(raw) - keys)
        if missing or extra:
            raise UserError(
                f"{where} is not a DFlash draft config written by medusa-forge: "
                + "; ".join(p for p in (missing and f"missing {missing}", extra and f"unexpected {extra}") if p)
                + " (keys such as eagle_config, is_causal or logit_scale change what the engines compute, §6)"
            )
        sizes = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")
        integers = (*sizes, "intermediate_size", "max_position_embeddings", "vocab_size", "num_target_layers")
        check_config_values(raw, where, FIXED_CONFIG, integers)
        if not isinstance(raw["block_size"], int) or raw["block_size"] < 2:
            raise UserError(f"{where}: block_size must be an integer >= 2, found {raw['block_size']!r}")
        if raw["layer_types"] != ["full_attention"] * raw["num_hidden_layers"]:
            raise UserError(f"{where}: layer_types must be full_attention for every layer (a sliding layer is causal "
                            "in the engines, and the draft was trained non-causal)")  # fmt: skip
        _check_dflash_section(raw["dflash_config"], raw["num_target_layers"], raw["vocab_size"], where)
        return cls(**raw)

    def qwen3_config(self) -> Qwen3Config:
        """The transformers config of the draft layers, for their building blocks (rotary, MLP)."""
        return Qwen3Config(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act=self.hidden_act,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            max_position_embeddings=self.max_position_embeddings,
            attention_bias=False,
        )

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of model.safetensors and its shape (§0): no embed_tokens, no lm_head (the target's)."""
        h, i, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        shapes = {"fc.weight": (h, len(self.target_layer_ids) * h), "hidden_norm.weight": (h,)}
        for n in range(self.num_hidden_layers):
            p = f"layers.{n}."
            shapes |= {
                p + "input_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, q),
                p + "self_attn.q_norm.weight": (hd,),
                p + "self_attn.k_norm.weight": (hd,),
                p + "post_attention_layernorm.weight": (h,),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
            }
        return shapes | {"norm.weight": (h,)}


def _check_dflash_section(section: object, num_target_layers: int, vocab_size: int, where: str) -> None:
    if not isinstance(section, dict) or set(section) != {"mask_token_id", "target_layer_ids"}:
        raise UserError(f"{where}: dflash_config must hold exactly mask_token_id and target_layer_ids "
                        "(causal / use_swa make the engines run the block causally, §6.5)")  # fmt: skip
    mask, ids = section["mask_token_id"], section["target_layer_ids"]
    if not isinstance(mask, int) or isinstance(mask, bool) or not 0 <= mask < vocab_size:
        raise UserError(f"{where}: dflash_config.mask_token_id must be a token id below vocab_size, found {mask!r}")
    if (
        not isinstance(ids, list)
        or not ids
        or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < num_target_layers for t in ids)
        or sorted(set(ids)) != ids
    ):
        raise UserError(f"{where}: dflash_config.target_layer_ids must be ascending distinct decoder-layer indices "
                        f"in [0, {num_target_layers}), found {ids!r}")  # fmt: skip


def served_chain(folder: str | Path, config: DFlashConfig) -> int:
    """Draft tokens per step that export's commands have vLLM draft (num_speculative_tokens, a block of that + 1):
    the chain `eval` chose by measured latency and stored with the tree, else the whole trained block's B-1."""
    longest = config.block_size - 1
    return load_served_chain(folder, longest) or longest


def chain_origin(chain: int, size: int) -> str:
    """Why vLLM is given a chain of `chain` for a draft trained with blocks of `size` (card and export notes)."""
    return "the whole trained block" if chain == size - 1 else "chosen by `medusa-forge eval` from measured latency"


def is_dflash_folder(folder: str | Path) -> bool:
    """Whether `folder` holds a DFlash draft (its config.json names the engines' DFlash architecture)."""
    try:
        raw = json.loads(Path(folder, CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and raw.get("architectures") == [ARCHITECTURE]


def check_tensors(state: dict[str, torch.Tensor], config: DFlashConfig, where: str) -> None:
    """Exactly the tensors the engines load, with the config's shapes and dtype. vLLM's load_weights does no
    completeness check and SGLang skips unknown names (§6.13), so this check must."""
    shapes = config.tensor_shapes()
    missing, extra = sorted(set(shapes) - set(state)), sorted(set(state) - set(shapes))
    if missing:
        raise UserError(f"{where}: missing tensor(s) {missing}")
    if extra:
        raise UserError(f"{where}: unexpected tensor(s) {extra} (an own lm_head/embed_tokens makes vLLM and SGLang "
                        "disagree, §6.10; a model. prefix becomes model.model. in vLLM, §6.13)")  # fmt: skip
    dtype = FLOAT_DTYPES[config.torch_dtype]
    for name, shape in shapes.items():
        tensor = state[name]
        if tuple(tensor.shape) != shape:
            raise UserError(f"{where}: tensor {name} has shape {tuple(tensor.shape)}, the config says {shape}")
        if tensor.dtype != dtype:
            raise UserError(f"{where}: tensor {name} is {tensor.dtype}, the config says {config.torch_dtype}")
