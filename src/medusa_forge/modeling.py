"""Load a base causal LM and its tokenizer by path, Hub id or alias, with errors a user can act on."""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from accelerate.utils import compute_module_sizes, infer_auto_device_map
from accelerate.utils.modeling import convert_file_size_to_int, get_max_memory
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from medusa_forge.defaults import MODEL_ALIAS, resolve_model
from medusa_forge.errors import UserError
from medusa_forge.grouped_attention import use_grouped_attention


def _load_error(name: str, err: Exception) -> UserError:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserError(
        f"could not load model {name!r}: {first_line}\n"
        f"If this is a Hub id, this machine may have no network or the repo may be private/gated "
        f"(log in with `hf auth login` or set HF_TOKEN). Otherwise pass a local folder holding a saved "
        f"Hugging Face model, or the offline alias {MODEL_ALIAS!r}."
    )


def _damaged(path: Path, what: str, err: Exception) -> UserError:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserError(
        f"{path}: not a readable {what} ({first_line}); the file is damaged or cut short (an interrupted download "
        "or copy): download or copy it again"
    )


def _damaged_weights(path: str, err: Exception) -> UserError:
    """A weights file of the base that does not read: named when the model is a folder here (its first unreadable
    *.safetensors), else the model."""
    from medusa_forge.formats.files import safetensors_keys

    for file in sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []:
        try:
            safetensors_keys(file)
        except UserError:
            return _damaged(file, "safetensors file", err)
    return _damaged(Path(path), "model (its weights)", err)


def _unreadable_tokenizer_file(path: str) -> Path | None:
    """The folder's tokenizer.json when the tokenizers library cannot read it (None: absent, or it reads)."""
    from tokenizers import Tokenizer

    file = Path(path, "tokenizer.json")
    if not file.is_file():
        return None
    try:
        Tokenizer.from_file(str(file))
    except Exception:  # noqa: BLE001 - the Rust library raises plain Exception
        return file
    return None


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    path = resolve_model(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as err:  # a damaged tokenizer.json fails deep inside (KeyError, ...): name the file
        damaged = _unreadable_tokenizer_file(path)
        if damaged is not None:
            raise _damaged(damaged, "tokenizer file", err) from None
        if isinstance(err, OSError | ValueError):
            raise _load_error(name_or_path, err) from err
        raise


# A target larger than one device: accelerate's dispatch (a device map over the devices of one process, then CPU
# memory, then disk), not transformers' tensor parallelism under torchrun. Both run here (TP over 2 gloo ranks gives
# the one-process features to 1e-6; checked with transformers 5.25, torch 2.13); dispatch was chosen because:
# - the frozen pass is inference only: no backward to overlap, and the ranks give the parallelism (each rank
#   computes its own share of the cache), so each rank's target only has to fit, not to be fast alone;
# - it composes with data parallelism as a user with two 8-GPU nodes and a 70B target needs it: torchrun
#   --nproc_per_node 4, each rank's target over 2 GPUs of its node, gradients of the draft reduced over all 8 ranks.
#   TP needs the ranks of a TP group to feed the same batch (the Trainer gives each rank its own) and all-reduces
#   at every layer (across nodes: over the network);
# - its features are bit-identical to the target's in one piece (each layer runs whole on one device; TP sums
#   partial products in another order), so a cache built either way is the same cache;
# - the decoder (tree attention masks, KV cache pruned with index_select) runs the model's own forward unchanged,
#   in one process: generate, serve and eval need no torchrun;
# - CPU and disk offload let a target that fits nowhere at once run at all (slowly), e.g. for a cache build.


@dataclass(frozen=True)
class TargetPlacement:
    """Where a dispatched target goes (train's --target_* flags): its layers fill `device`, then this process's other
    GPUs, then CPU memory, then disk (`offload_folder`), each up to `max_memory` (bytes by GPU index or "cpu")."""

    device: torch.device  # where inputs enter and the draft lives: the embeddings and lm_head are pinned here
    max_memory: dict[int | str, int] | None = None
    offload_folder: str | None = None


def parse_max_memory(text: str, flag: str) -> dict[int | str, int]:
    """`0=70GiB,1=70GiB,cpu=200GiB` -> {0: bytes, 1: bytes, "cpu": bytes}; a UserError naming `flag` otherwise."""
    budget: dict[int | str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, size = part.partition("=")
        key = key.strip()
        if not sep or not (key == "cpu" or key.isdigit()):
            raise UserError(
                f"{flag} {text}: expected DEVICE=SIZE pairs separated by commas, DEVICE a GPU index or 'cpu', "
                f"e.g. 0=70GiB,1=70GiB,cpu=200GiB"
            )
        try:
            size = size.strip()
            budget[int(key) if key.isdigit() else key] = int(size) if size.isdigit() else convert_file_size_to_int(size)
        except ValueError:
            raise UserError(f"{flag} {text}: {size!r} is not a size (e.g. 70GiB, 500MB or bytes)") from None
    if not budget:
        raise UserError(f"{flag}: empty; e.g. 0=70GiB,cpu=200GiB")
    return budget


# The --target_* flags of every command that loads a target (train, generate, eval, serve): one definition each.
def target_device_map_field() -> Any:
    return field(
        default=None,
        metadata={
            "help": "'auto': spread the target over this process's devices (its own GPU first, then under torchrun "
            "every LOCAL_WORLD_SIZE-th GPU after it), then CPU memory, then disk (--target_offload_folder), for a "
            "target larger than one device (accelerate's dispatch). Default: the whole target on the device."
        },
    )


def target_max_memory_field() -> Any:
    return field(
        default=None,
        metadata={
            "help": "With --target_device_map auto: the most each device may hold of the target, per process, e.g. "
            "0=70GiB,1=70GiB,cpu=200GiB (default: what is free)."
        },
    )


def target_offload_folder_field() -> Any:
    return field(
        default=None,
        metadata={
            "help": "With --target_device_map auto: where the target's layers that fit in no memory are kept and "
            "read from at every forward pass (slow; without it such a target is refused)."
        },
    )


def check_target_flags(config: Any) -> None:
    """A UserError for --target_* flags (fields of `config`, see above) that disagree or do not parse: before any
    loading."""
    if config.target_device_map not in (None, "auto"):
        raise UserError(
            f"--target_device_map {config.target_device_map}: the only value is 'auto' (leave it out to load the "
            "whole target on the device)"
        )
    for name in ("target_max_memory", "target_offload_folder"):
        if getattr(config, name) is not None and config.target_device_map is None:
            raise UserError(f"--{name} applies only with --target_device_map auto; add that flag")
    if config.target_max_memory is not None:
        parse_max_memory(config.target_max_memory, "--target_max_memory")


def target_placement(config: Any, device: torch.device) -> TargetPlacement | None:
    """Where `config`'s --target_* flags dispatch the target, `device` being the process's own; None: whole."""
    if config.target_device_map is None:
        return None
    text = config.target_max_memory
    return TargetPlacement(device, parse_max_memory(text, "--target_max_memory") if text else None,
                           config.target_offload_folder)  # fmt: skip


def rank_devices(device: torch.device) -> list[int]:
    """The GPUs this process's target spreads over: its own (`device`, the one torchrun gave it) first, then every
    LOCAL_WORLD_SIZE-th after it, so the ranks of a node share its GPUs out evenly (4 ranks on 8 GPUs: rank 1 gets
    1 and 5). Empty on a CPU."""
    if device.type != "cuda":
        return []
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return list(range(device.index or 0, torch.cuda.device_count(), ranks))


def _pinned_modules(model: PreTrainedModel) -> list[str]:
    """The input and output embeddings' module names: the draft reads their weights directly (its initial weights,
    its loss's soft targets and argmax, EAGLE-3's token embeddings), so they are never offloaded."""
    wanted = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    return [name for name, module in model.named_modules() if id(module) in wanted]


def _separate(device_map: dict[str, int | str], model: torch.nn.Module, name: str) -> None:
    """Split the entry of `device_map` that covers module `name` into its children's, until `name` has its own."""
    while name not in device_map:
        parent = next(k for k in device_map if k == "" or name.startswith(k + "."))
        device = device_map.pop(parent)
        module = model.get_submodule(parent)
        prefix = parent + "." if parent else ""
        for child, _ in module.named_children():
            device_map[prefix + child] = device
        for tensor, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            device_map[prefix + tensor] = device


def target_device_map(path: str, dtype: torch.dtype, placement: TargetPlacement) -> dict[str, int | str]:
    """accelerate's device map for the model at `path` under `placement`, the embeddings and lm_head on its
    device (their size taken from that device's budget first)."""
    config = AutoConfig.from_pretrained(path)
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, dtype=dtype)
    devices = rank_devices(placement.device)
    available = get_max_memory(dict(placement.max_memory) if placement.max_memory else None)
    budget = {key: value for key, value in available.items() if key in devices or not isinstance(key, int)}
    first: int | str = devices[0] if devices else "cpu"
    sizes = compute_module_sizes(empty, dtype=dtype)
    pinned = _pinned_modules(empty)
    pinned_bytes = sum(sizes[name] for name in dict.fromkeys(pinned))
    if id(empty.get_input_embeddings().weight) == id(empty.get_output_embeddings().weight):
        pinned_bytes = sizes[pinned[0]]  # tied: one matrix
    if budget.get(first, 0) < pinned_bytes:
        raise UserError(
            f"--target_max_memory: {first} must hold at least the target's embeddings and lm_head "
            f"({pinned_bytes / 2**30:.2f} GiB; the draft reads them there), it is given "
            f"{budget.get(first, 0) / 2**30:.2f} GiB (the flag's value, else what is free there)"
        )
    budget[first] -= pinned_bytes
    for name in pinned:  # placed below, already counted: out of the inference's way
        empty.set_submodule(name, torch.nn.Identity())
    no_split = list(getattr(empty, "_no_split_modules", None) or [])
    device_map = infer_auto_device_map(empty, max_memory=budget, no_split_module_classes=no_split, dtype=dtype)
    for name in pinned:
        _separate(device_map, empty, name)
        device_map[name] = first
    return device_map


def load_base_model(
    name_or_path: str, dtype: torch.dtype = torch.float32, placement: TargetPlacement | None = None
) -> PreTrainedModel:
    """Load the frozen base model in eval mode with gradients off, its SDPA attention grouped on a CPU
    (`grouped_attention`: the same outputs, no key/value copies in tree verification). With `placement` it is
    dispatched (see TargetPlacement) and must not be moved; its inputs go to `input_device`."""
    path = resolve_model(name_or_path)
    try:
        if placement is None:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        else:
            device_map = target_device_map(path, dtype, placement)
            if "disk" in device_map.values() and placement.offload_folder is None:
                on_disk = sum(1 for device in device_map.values() if device == "disk")
                raise UserError(
                    f"the target does not fit in the memory given to it (--target_max_memory, else all that is "
                    f"free): {on_disk} of its modules would be read from disk at every forward pass. Pass "
                    f"--target_offload_folder DIR to accept that (slow), or give it more devices or memory"
                )
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, device_map=device_map, offload_folder=placement.offload_folder
            )
    except (OSError, ValueError) as err:
        raise _load_error(name_or_path, err) from err
    except SafetensorError as err:  # a cut weights file: one error naming it, in every command that loads a base
        raise _damaged_weights(path, err) from None
    model.eval()
    model.requires_grad_(False)
    use_grouped_attention(model)
    return model


def input_device(model: PreTrainedModel) -> torch.device:
    """Where `model`'s inputs go: its embeddings' device (a dispatched model's first device)."""
    return model.get_input_embeddings().weight.device


# transformers renamed the KV cache a model's forward takes and returns from `past_key_values` to `cache` after 5.17
# (5.24 has the new name); code that passes or reads a cache goes through these two, so every transformers 5.x works.
CACHE_NAMES = ("cache", "past_key_values")


def cache_kwarg(module: torch.nn.Module) -> str:
    """The name under which `module.forward` takes its KV cache."""
    params = inspect.signature(module.forward).parameters
    for name in CACHE_NAMES:
        if name in params:
            return name
    raise UserError(
        f"{type(module).__name__}.forward takes no KV cache argument: speculative decoding and continuous batching "
        "need one"
    )


def returned_cache(output: Any) -> Any:
    """The KV cache a forward pass returned (None when it returned none)."""
    return next((cache for cache in (getattr(output, name, None) for name in CACHE_NAMES) if cache is not None), None)


def backbone(base: PreTrainedModel) -> torch.nn.Module:
    """The part of a causal LM that outputs the final (normed) hidden state that feeds the lm_head."""
    inner = base.base_model
    if inner is base:
        raise UserError(f"{type(base).__name__}: cannot find the backbone under its lm_head")
    return inner
