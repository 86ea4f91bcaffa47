"""Medusa heads in every engine's on-disk layout: read any known layout into one canonical state dict, write
the layouts TGI, TensorRT-LLM and vLLM load. Formats: DESIGN.md, "Heads: math and on-disk formats".

The canonical state dict uses our own names, which are the TGI / TensorRT-LLM / original Medusa names:
`{i}.{j}.linear.weight` [H, H], `{i}.{j}.linear.bias` [H] for blocks j < L, `{i}.{L}.weight` [V, H].
Every reader checks names, counts and shapes before anything is written, because an engine that meets
wrong names silently skips them (vLLM) and the heads then accept nothing.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from medusa_forge.errors import UserError
from medusa_forge.heads import CONFIG_NAME, WEIGHTS_NAME, MedusaConfig

ORIGINAL_PT_NAME = "medusa_lm_head.pt"  # FasterDecoding/Medusa medusa/model/medusa_model.py
VLLM_WEIGHTS_NAME = "model.safetensors"  # vLLM reads any *.safetensors in the draft folder
FULL_PREFIX = "medusa_head."  # full-model checkpoints of the original trainer (Medusa-2, "new" model class)
VLLM_PREFIX = "medusa_heads."  # vLLM's load_weights strips it
TREE_FILE = "medusa_choices.json"  # the decoding tree chosen by `medusa-forge eval`; engines ignore it

LAYOUTS = {
    "medusa": "Medusa / TGI / TensorRT-LLM layout (config.json + medusa_lm_head.safetensors)",
    "medusa-pt": "original Medusa torch pickle (config.json + medusa_lm_head.pt)",
    "vllm": "vLLM Medusa layout (model_type medusa; blocks.{i}.layers.{j}.*, lm_heads.{i}.weight)",
    "full-checkpoint": "full model checkpoint whose weights carry a `medusa_head.` prefix",
}
FORMATS = ("tgi", "vllm", "tensorrt-llm")

_CANONICAL = re.compile(r"^(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)$")
_VLLM_BLOCK = re.compile(r"^blocks\.(\d+)\.layers\.(\d+)\.(weight|bias)$")
_VLLM_HEAD = re.compile(r"^lm_heads\.(\d+)\.weight$")


@dataclass
class HeadsShape:
    """What the tensors themselves say; `has_projections` is False for the "version 2" variant."""

    num_heads: int
    num_layers: int
    hidden_size: int
    vocab_size: int | None
    dtype: torch.dtype
    has_projections: bool


@dataclass
class LoadedHeads:
    """Heads read from any layout, in canonical names, ready to be written in any other."""

    state: dict[str, torch.Tensor]
    config: MedusaConfig
    layout: str
    source: Path
    notes: list[str] = field(default_factory=list)

    @property
    def description(self) -> str:
        return f"{LAYOUTS[self.layout]} at {self.source}"


# -- checking ---------------------------------------------------------------------------------------------
def check_canonical(state: dict[str, torch.Tensor], where: str) -> HeadsShape:
    """Validate canonical names, contiguous head/layer numbering and shapes; name the first bad tensor."""
    if not state:
        raise UserError(f"{where}: holds no tensors")
    unexpected = [k for k in state if not _CANONICAL.match(k)]
    if unexpected:
        raise UserError(
            f"{where}: unexpected tensor names {unexpected[:5]}; Medusa heads use "
            "`{i}.{j}.linear.weight`, `{i}.{j}.linear.bias` and `{i}.{L}.weight`"
        )
    blocks: dict[int, set[int]] = {}
    projections: dict[int, int] = {}
    for key in state:
        i, j, kind = _CANONICAL.match(key).groups()
        if kind == "weight":
            projections[int(i)] = int(j)
        else:
            blocks.setdefault(int(i), set()).add(int(j))
    heads = sorted(set(blocks) | set(projections))
    if heads != list(range(len(heads))):
        missing = sorted(set(range(max(heads) + 1)) - set(heads))
        raise UserError(f"{where}: heads are numbered {heads}; head(s) {missing} are missing")
    layer_counts = {i: len(blocks.get(i, ())) for i in heads}
    if len(set(layer_counts.values())) != 1:
        raise UserError(f"{where}: heads have different numbers of residual blocks: {layer_counts}")
    num_layers = layer_counts[0]
    for i in heads:
        if blocks.get(i, set()) != set(range(num_layers)):
            raise UserError(f"{where}: head {i} has blocks {sorted(blocks.get(i, ()))}, expected 0..{num_layers - 1}")
        for j in range(num_layers):
            for part in ("weight", "bias"):
                if f"{i}.{j}.linear.{part}" not in state:
                    raise UserError(f"{where}: tensor {i}.{j}.linear.{part} is missing")
        if i in projections and projections[i] != num_layers:
            raise UserError(
                f"{where}: head {i}'s projection is named {i}.{projections[i]}.weight, but with {num_layers} "
                f"block(s) it must be {i}.{num_layers}.weight"
            )
    if projections and set(projections) != set(heads):
        raise UserError(
            f"{where}: only heads {sorted(projections)} have a vocabulary projection ({{i}}.{num_layers}.weight); "
            f"all {len(heads)} heads need one, or none (version 2, which reuses the base lm_head)"
        )
    if num_layers == 0 and not projections:
        raise UserError(f"{where}: no residual blocks and no projections")
    first = state["0.0.linear.weight"] if num_layers else state[f"0.{num_layers}.weight"]
    # The hidden size most tensors agree on, so the odd one out is the one named in the error.
    hidden = Counter(t.shape[-1] for t in state.values() if t.dim() > 0).most_common(1)[0][0]
    vocab = state[f"0.{num_layers}.weight"].shape[0] if projections else None
    for key, tensor in state.items():
        kind = _CANONICAL.match(key).group(3)
        expected = {"linear.weight": (hidden, hidden), "linear.bias": (hidden,), "weight": (vocab, hidden)}[kind]
        if tuple(tensor.shape) != expected:
            raise UserError(f"{where}: {key} has shape {tuple(tensor.shape)}, expected {expected} (hidden {hidden})")
    return HeadsShape(len(heads), num_layers, hidden, vocab, first.dtype, bool(projections))


def check_config_counts(raw: dict, shape: HeadsShape, where: str, keys: tuple[str, str]) -> None:
    """The config's head/layer counts (and sizes, when present) must match the tensors."""
    heads_key, layers_key = keys
    problems = []
    if raw.get(heads_key) is not None and raw[heads_key] != shape.num_heads:
        problems.append(
            f"{heads_key} is {raw[heads_key]} but the weights hold {shape.num_heads} heads "
            f"(if the weights are right, pass --num-heads {shape.num_heads})"
        )
    if raw.get(layers_key) is not None and raw[layers_key] != shape.num_layers:
        problems.append(f"{layers_key} is {raw[layers_key]} but the weights hold {shape.num_layers} block(s) per head")
    if raw.get("hidden_size") is not None and raw["hidden_size"] != shape.hidden_size:
        problems.append(f"hidden_size is {raw['hidden_size']} but the weights have {shape.hidden_size}")
    if raw.get("vocab_size") is not None and shape.vocab_size is not None and raw["vocab_size"] != shape.vocab_size:
        problems.append(f"vocab_size is {raw['vocab_size']} but the projections have {shape.vocab_size} rows")
    if problems:
        raise UserError(
            f"{where} does not match its weights: " + "; ".join(problems) + ". Fix the config or the weights."
        )


def base_dims(base: str) -> tuple[int, int] | None:
    """(hidden_size, vocab_size) of a base model from its config, local files only; None if unavailable."""
    from transformers import AutoConfig

    from medusa_forge.defaults import resolve_model

    try:
        config = AutoConfig.from_pretrained(resolve_model(base), local_files_only=True)
    except (OSError, ValueError):
        return None
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden, vocab = getattr(config, "hidden_size", None), getattr(config, "vocab_size", None)
    return (hidden, vocab) if isinstance(hidden, int) and isinstance(vocab, int) else None


def check_against_base(shape: HeadsShape, base: str, where: str, required: bool) -> str:
    """Refuse heads whose sizes differ from the base model's; returns a note for the user."""
    dims = base_dims(base)
    if dims is None:
        if required:
            raise UserError(
                f"--base-model {base}: no config.json found locally; pass a local folder or a cached Hub id"
            )
        return f"not checked against base model {base!r} (its config is not available locally)"
    hidden, vocab = dims
    if hidden != shape.hidden_size:
        raise UserError(
            f"{where}: heads have hidden size {shape.hidden_size}, but base model {base} has hidden_size {hidden}; "
            "these heads were trained for another model (pass the right one with --base-model)"
        )
    if shape.vocab_size is not None and vocab != shape.vocab_size:
        raise UserError(
            f"{where}: heads project to {shape.vocab_size} tokens, but base model {base} has vocab_size {vocab}; "
            "these heads were trained for another model or tokenizer (pass the right one with --base-model)"
        )
    return f"sizes match base model {base} (hidden {hidden}, vocabulary {vocab})"


# -- reading ----------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except ValueError as err:
        raise UserError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} should hold a JSON object")
    return raw


def _folder_config(folder: Path) -> dict | None:
    path = folder / CONFIG_NAME
    return _read_json(path) if path.is_file() else None


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A torch pickle of tensors only: weights_only=True refuses anything that could run code."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types here; all mean "cannot read safely"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: cannot be loaded safely as a dict of tensors ({first})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: expected a dict of tensors (a state dict), found {type(obj).__name__}")
    return obj


def _safetensors_keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise UserError(f"{path}: not a readable safetensors file ({err})") from None


def _load_safetensors(path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensors whose name starts with prefix (prefix removed); reads only those from disk."""
    out = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key.startswith(prefix):
                    out[key[len(prefix) :]] = f.get_tensor(key)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001
        raise UserError(f"{path}: not a readable safetensors file ({err})") from None
    return out


def _weight_files(folder: Path) -> list[Path]:
    """Model weight files other than medusa_lm_head.*: *.safetensors, then pytorch_model*.bin."""
    files = sorted(p for p in folder.glob("*.safetensors") if p.name != WEIGHTS_NAME)
    return files + sorted(folder.glob("pytorch_model*.bin"))


def _keys(path: Path) -> list[str]:
    return _safetensors_keys(path) if path.suffix == ".safetensors" else list(_load_pickle(path))


def _base_reference(raw: dict | None, base_model: str | None, where: Path) -> str:
    if base_model:
        return base_model
    if raw and raw.get("base_model_name_or_path"):
        return str(raw["base_model_name_or_path"])
    raise UserError(
        f"{where}: the base model is not named (no base_model_name_or_path in {CONFIG_NAME}); pass --base-model"
    )


def _read_medusa(weights: Path) -> dict[str, torch.Tensor]:
    state = load_file(str(weights)) if weights.suffix == ".safetensors" else _load_pickle(weights)
    return {k.removeprefix(FULL_PREFIX): v for k, v in state.items()}


def _read_vllm(
    folder: Path, raw: dict | None, files: list[Path], notes: list[str]
) -> tuple[dict[str, torch.Tensor], int | None]:
    """vLLM names -> canonical, plus the draft vocabulary (our `draft_vocab_size` key, or a token_map of the
    first N ids as older exports and other tools write it). Reads config keys the way vLLM's MedusaConfig does
    (num_heads, ...)."""
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        part = _load_safetensors(path) if path.suffix == ".safetensors" else _load_pickle(path)
        for key, value in part.items():
            tensors[key.removeprefix(VLLM_PREFIX)] = value
    raw = raw or {}
    blocks, lm_heads, other = {}, {}, []
    for key, value in tensors.items():
        if m := _VLLM_BLOCK.match(key):
            blocks[(int(m[1]), int(m[2]), m[3])] = value
        elif m := _VLLM_HEAD.match(key):
            lm_heads[int(m[1])] = value
        elif key != "token_map":
            other.append(key)
    if other:
        raise UserError(
            f"{folder}: unexpected tensor names {other[:5]} for the vLLM layout "
            "(expected blocks.{i}.layers.{j}.weight/bias, lm_heads.{i}.weight, token_map)"
        )
    if not blocks and not lm_heads:
        raise UserError(f"{folder}: no vLLM Medusa tensors (blocks.*, lm_heads.*) found")
    num_heads = raw.get("num_heads", raw.get("medusa_num_heads"))
    heads = sorted({i for i, _, _ in blocks} | set(lm_heads))
    if raw.get("original_lm_head"):
        if set(lm_heads) != {0}:
            raise UserError(f"{folder}: original_lm_head is set, so exactly one lm_heads.0.weight is expected")
        count = num_heads if num_heads is not None else len(heads)
        lm_heads = {i: lm_heads[0] for i in range(count)}
        notes.append("original_lm_head: the one shared projection was copied into every head")
    vocab, truncated = raw.get("vocab_size"), raw.get("truncated_vocab_size")
    draft_vocab = raw.get("draft_vocab_size")  # ours, kept next to vLLM's keys by our export (vLLM ignores it)
    if truncated is not None and vocab is not None and truncated < vocab:
        rows = {t.shape[0] for t in lm_heads.values()}
        if rows != {vocab}:
            raise UserError(
                f"{folder}: the heads project to a truncated vocabulary ({truncated} of {vocab} tokens, token_map); "
                "vLLM gives every other token -inf, which a full-vocabulary Medusa head cannot represent. "
                "Import the untruncated checkpoint instead."
            )
        token_map = tensors.get("token_map")
        if token_map is not None and torch.equal(token_map.long().flatten(), torch.arange(truncated)):
            draft_vocab = truncated  # heads propose ids < N only: our draft_vocab_size, exactly
            notes.append(f"token_map = the first {truncated} ids: kept as draft_vocab_size {truncated}")
        else:
            notes.append(
                f"truncated_vocab_size {truncated} dropped (token_map is not the first {truncated} ids): "
                f"the heads propose from the full {vocab}-token vocabulary"
            )
    with_bias = bool(raw.get("medusa_fc_bias", False))
    has_bias = any(part == "bias" for _, _, part in blocks)
    if has_bias and not with_bias:
        notes.append("biases kept although medusa_fc_bias is not true (vLLM would have dropped them)")
    state = {}
    for (i, j, part), value in blocks.items():
        state[f"{i}.{j}.linear.{part}"] = value
    for (i, j, part), value in blocks.items():
        if part == "weight" and (i, j, "bias") not in blocks:
            state[f"{i}.{j}.linear.bias"] = torch.zeros(value.shape[0], dtype=value.dtype)
    if not has_bias and blocks:
        notes.append("no biases in the checkpoint (medusa_fc_bias false): zero biases written, same outputs")
    num_layers = 1 + max((j for _, j, _ in blocks), default=-1)
    for i, value in lm_heads.items():
        state[f"{i}.{num_layers}.weight"] = value
    return state, draft_vocab


def _read_full(folder: Path, files: list[Path]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in files:
        if path.suffix == ".safetensors":
            state.update(_load_safetensors(path, FULL_PREFIX))
        else:
            state.update({k[len(FULL_PREFIX) :]: v for k, v in _load_pickle(path).items() if k.startswith(FULL_PREFIX)})
    if not state:
        raise UserError(f"{folder}: no tensor names start with {FULL_PREFIX!r}")
    return state


def detect_layout(path: Path) -> tuple[str, Path]:
    """(layout, weights file or folder) for a folder or file; refuses ambiguous or unknown input."""
    if not path.exists():
        raise UserError(f"--from {path}: no such file or folder")
    if path.is_file():
        if path.suffix in (".pt", ".pth"):
            return "medusa-pt", path
        keys = _keys(path)
        if any(_CANONICAL.match(k) for k in keys):
            return ("medusa" if path.suffix == ".safetensors" else "medusa-pt"), path
        if any(k.startswith(FULL_PREFIX) for k in keys):
            return "full-checkpoint", path
        if any(
            _VLLM_BLOCK.match(k.removeprefix(VLLM_PREFIX)) or _VLLM_HEAD.match(k.removeprefix(VLLM_PREFIX))
            for k in keys
        ):
            return "vllm", path
        raise UserError(
            f"{path}: no Medusa head tensors found (names like 0.0.linear.weight, blocks.0.layers.0.weight)"
        )
    found: list[tuple[str, Path]] = []
    if (path / WEIGHTS_NAME).is_file():
        found.append(("medusa", path / WEIGHTS_NAME))
    if (path / ORIGINAL_PT_NAME).is_file():
        found.append(("medusa-pt", path / ORIGINAL_PT_NAME))
    raw = _folder_config(path) or {}
    weights = _weight_files(path)
    if raw.get("model_type") == "medusa" or (weights and "num_heads" in raw and "medusa_num_heads" not in raw):
        found.append(("vllm", path))
    elif weights and raw.get("medusa_num_heads") is not None:
        if any(k.startswith(FULL_PREFIX) for f in weights for k in _keys(f)):
            found.append(("full-checkpoint", path))
    elif weights:
        keys = [k.removeprefix(VLLM_PREFIX) for f in weights if f.suffix == ".safetensors" for k in _keys(f)]
        if any(_VLLM_BLOCK.match(k) or _VLLM_HEAD.match(k) for k in keys):
            found.append(("vllm", path))
    if len(found) == 2 and {name for name, _ in found} == {"medusa", "medusa-pt"}:
        a, b = load_file(str(found[0][1])), _load_pickle(found[1][1])
        if a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a):
            return found[0]  # the same heads saved twice: take the safetensors copy
    if len(found) > 1:
        names = ", ".join(f"{name} ({where.name})" for name, where in found)
        raise UserError(
            f"{path}: ambiguous, it holds more than one set of heads: {names}. "
            f"Pass --layout {{{','.join(name for name, _ in found)}}} to say which to read."
        )
    if not found:
        raise UserError(
            f"{path}: no Medusa heads found. Expected one of: "
            + "; ".join(LAYOUTS.values())
            + f". The folder holds: {sorted(p.name for p in path.iterdir())[:10]}"
        )
    return found[0]


def read_heads(
    path: str | Path,
    base_model: str | None = None,
    layout: str | None = None,
    check_base: bool = True,
    num_heads: int | None = None,
) -> LoadedHeads:
    """Read heads in any known layout (detected unless `layout` is given) into canonical names, checked.

    `num_heads` overrides the config's head count (some published configs are wrong, e.g. 2 for 4 heads) and
    keeps the first `num_heads` heads, as TGI does with --speculate."""
    path = Path(path)
    if layout is None:
        layout, weights = detect_layout(path)
    else:
        if layout not in LAYOUTS:
            raise UserError(f"--layout {layout}: choose one of {', '.join(LAYOUTS)}")
        weights = path
        if path.is_dir():
            weights = {"medusa": path / WEIGHTS_NAME, "medusa-pt": path / ORIGINAL_PT_NAME}.get(layout, path)
        if not weights.exists():
            raise UserError(f"--layout {layout}: {weights} does not exist")
    folder = path if path.is_dir() else path.parent
    raw = _folder_config(folder)
    notes: list[str] = []
    draft_vocab = (raw or {}).get("draft_vocab_size")  # ours: heads trained to propose ids < N only
    where = str(weights)
    if layout in ("medusa", "medusa-pt"):
        state = _read_medusa(weights)
        keys = ("medusa_num_heads", "medusa_num_layers")
    elif layout == "vllm":
        files = [weights] if weights.is_file() else _weight_files(weights)
        state, draft_vocab = _read_vllm(folder, raw, files, notes)
        keys = ("num_heads", "num_hidden_layers")
        if raw is not None and "num_heads" not in raw and "medusa_num_heads" in raw:
            keys = ("medusa_num_heads", "medusa_num_layers")
    else:
        files = [weights] if weights.is_file() else _weight_files(weights)
        state = _read_full(folder, files)
        keys = ("medusa_num_heads", "medusa_num_layers")
        if base_model is None and raw is not None:
            # Medusa-2 trains the base too: the checkpoint itself is the base model the heads belong to.
            base_model = str(folder.resolve())
            notes.append(f"base model = the checkpoint itself ({base_model}); pass --base-model to name another")
    shape = check_canonical(state, where)
    if num_heads is not None:
        if not 1 <= num_heads <= shape.num_heads:
            raise UserError(f"--num-heads {num_heads}: {where} holds {shape.num_heads} heads")
        if raw is not None and raw.get(keys[0]) not in (None, num_heads):
            notes.append(f"{keys[0]} {raw[keys[0]]} in {CONFIG_NAME} overridden by --num-heads {num_heads}")
        raw = {k: v for k, v in (raw or {}).items() if k != keys[0]} if raw is not None else None
        state = {k: v for k, v in state.items() if int(k.split(".", 1)[0]) < num_heads}
        shape = check_canonical(state, where)
    if raw is not None:
        check_config_counts(raw, shape, str(folder / CONFIG_NAME), keys)
    elif layout != "vllm":
        notes.append(f"no {CONFIG_NAME} next to the weights: counts taken from the tensors")
    if raw is None and layout in ("medusa", "medusa-pt") and base_model is None:
        raise UserError(f"{folder}: {CONFIG_NAME} is missing, so the base model is unknown; pass --base-model")
    base = _base_reference(raw, base_model, folder)
    if not shape.has_projections:
        state = _materialise_projections(state, shape, base)
        notes.append(f"version 2 (no per-head projections): each head's projection copied from {base}'s lm_head")
        shape = check_canonical(state, where)
    elif check_base:
        notes.append(check_against_base(shape, base, where, required=base_model is not None))
    if draft_vocab is not None and not (isinstance(draft_vocab, int) and 0 < draft_vocab <= shape.vocab_size):
        raise UserError(f"{folder / CONFIG_NAME}: draft_vocab_size {draft_vocab!r} must be 1..{shape.vocab_size}")
    config = MedusaConfig(
        shape.num_heads, shape.num_layers, shape.hidden_size, shape.vocab_size, base, draft_vocab_size=draft_vocab
    )
    return LoadedHeads(state, config, layout, path, notes)


def _materialise_projections(state: dict[str, torch.Tensor], shape: HeadsShape, base: str) -> dict[str, torch.Tensor]:
    """Version 2 heads reuse the base lm_head; our layout stores it per head, as TGI's V1 loader needs."""
    from medusa_forge.modeling import load_base_model

    model = load_base_model(base, dtype=shape.dtype)
    lm_head = model.get_output_embeddings()
    if lm_head is None or getattr(lm_head, "weight", None) is None:
        raise UserError(f"base model {base} has no lm_head to copy into the version 2 heads")
    weight = lm_head.weight.detach()
    if weight.shape[1] != shape.hidden_size:
        raise UserError(
            f"version 2 heads have hidden size {shape.hidden_size}, but base model {base}'s lm_head is "
            f"{tuple(weight.shape)}; pass the right base with --base-model"
        )
    out = dict(state)
    for i in range(shape.num_heads):
        out[f"{i}.{shape.num_layers}.weight"] = weight.clone().contiguous()
    return out


# -- writing ----------------------------------------------------------------------------------------------
def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors safetensors accepts: contiguous, each owning its storage. The original trainer's shared blocks
    (and version 2's copied lm_head) share storage, so only those are copied; the rest is written as it is."""
    out, seen = {}, set()
    for key, tensor in state.items():
        tensor = tensor.detach().to("cpu")
        storage = tensor.untyped_storage()
        if (
            storage.data_ptr() in seen
            or not tensor.is_contiguous()
            or tensor.storage_offset() != 0
            or storage.nbytes() != tensor.nbytes
        ):
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def to_vllm(state: dict[str, torch.Tensor], config: MedusaConfig) -> dict[str, torch.Tensor]:
    """Canonical -> vLLM names, every lm_heads.{i} with all vocabulary rows and no token_map: vLLM 0.11-0.32
    size each lm_head from `vocab_size` and assert the row count after cutting rows by a token_map, so a draft
    vocabulary cannot be expressed there (vllm/model_executor/models/medusa.py). The heads then propose from the
    whole vocabulary; rows >= draft_vocab_size are the base lm_head's, as training initialised them."""
    out = {}
    num_layers = config.medusa_num_layers
    for i in range(config.medusa_num_heads):
        for j in range(num_layers):
            out[f"blocks.{i}.layers.{j}.weight"] = state[f"{i}.{j}.linear.weight"]
            out[f"blocks.{i}.layers.{j}.bias"] = state[f"{i}.{j}.linear.bias"]
        out[f"lm_heads.{i}.weight"] = state[f"{i}.{num_layers}.weight"]
    return out


def vllm_config(config: MedusaConfig, dtype: torch.dtype) -> dict:
    """The keys vLLM's MedusaConfig and Medusa model read. medusa_fc_bias must be true, or vLLM builds the
    blocks without bias and silently drops ours. truncated_vocab_size = vocab_size (see `to_vllm`); our
    draft_vocab_size rides along (vLLM keeps unknown keys as attributes and never reads it) so that an import
    of this folder gives the heads back as they were trained."""
    raw = {
        "model_type": "medusa",
        "architectures": ["MedusaModel"],
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "truncated_vocab_size": config.vocab_size,
        "num_heads": config.medusa_num_heads,
        "num_hidden_layers": config.medusa_num_layers,
        "medusa_fc_bias": True,
        "max_paths": 64,
        "topk": 10,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "base_model_name_or_path": config.base_model_name_or_path,
    }
    if config.draft_vocab_size:
        raw["draft_vocab_size"] = config.draft_vocab_size
    return raw


def check_no_other_weights(output_dir: Path, writing: str) -> None:
    """Refuse a folder that already holds other weights: an engine would read those (TensorRT-LLM prefers
    medusa_lm_head.pt; vLLM reads every *.safetensors) and a later import would find two sets of heads."""
    if not output_dir.is_dir():
        return
    stale = [p.name for p in output_dir.iterdir() if p.suffix in (".safetensors", ".pt", ".bin") and p.name != writing]
    if stale:
        raise UserError(
            f"--output-dir {output_dir} already holds other weights ({', '.join(sorted(stale))}) that an engine "
            "would also read; choose an empty or new folder"
        )


def write_medusa(loaded: LoadedHeads, output_dir: Path) -> list[Path]:
    """Our layout (= TGI / TensorRT-LLM): config.json without `architectures` + medusa_lm_head.safetensors."""
    check_no_other_weights(output_dir, WEIGHTS_NAME)
    output_dir.mkdir(parents=True, exist_ok=True)
    loaded.config.save(output_dir)
    save_file(_contiguous(loaded.state), str(output_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    return [output_dir / CONFIG_NAME, output_dir / WEIGHTS_NAME]


def write_vllm(loaded: LoadedHeads, output_dir: Path) -> list[Path]:
    check_no_other_weights(output_dir, VLLM_WEIGHTS_NAME)
    output_dir.mkdir(parents=True, exist_ok=True)
    dtype = next(iter(loaded.state.values())).dtype
    (output_dir / CONFIG_NAME).write_text(json.dumps(vllm_config(loaded.config, dtype), indent=2) + "\n")
    weights = _contiguous(to_vllm(loaded.state, loaded.config))
    save_file(weights, str(output_dir / VLLM_WEIGHTS_NAME), metadata={"format": "pt"})
    return [output_dir / CONFIG_NAME, output_dir / VLLM_WEIGHTS_NAME]


def copy_sidecars(source: Path, output_dir: Path, names: tuple[str, ...]) -> list[Path]:
    """Copy the named files that exist next to the source heads (tokenizer, tree, card inputs)."""
    folder = source if source.is_dir() else source.parent
    copied = []
    for name in names:
        if (folder / name).is_file() and (folder / name).resolve() != (output_dir / name).resolve():
            shutil.copyfile(folder / name, output_dir / name)
            copied.append(output_dir / name)
    return copied


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bit-exact equality of two state dicts (names, dtypes, shapes, values)."""
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def describe(loaded: LoadedHeads) -> dict:
    dtype = str(next(iter(loaded.state.values())).dtype).removeprefix("torch.")
    return {**asdict(loaded.config), "dtype": dtype, "layout": loaded.layout}
