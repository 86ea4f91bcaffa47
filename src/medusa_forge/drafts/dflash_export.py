"""A DFlash draft out to the engines (`DFLASH.export`) and the Hub (`DFLASH.check_for_push`): vLLM 0.32.0 and SGLang
0.5.23 load our folder's layout as it is (docs/dflash-reference.md §0), so export checks the draft against its
target, writes it, reads it back and compares, with the commands that serve it.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from medusa_forge.drafts.dflash_config import DFlashConfig, chain_origin, served_chain
from medusa_forge.drafts.dflash_model import DFlashDraft
from medusa_forge.drafts.kind import ExportResult, PushCheck
from medusa_forge.drafts.model_folder import CONFIG_NAME, WEIGHTS_NAME, write_for_engines
from medusa_forge.engine_commands import DFLASH_ENGINES, dflash_serve_command, vllm_cpu_command
from medusa_forge.engine_versions import SGLANG_DFLASH_RELEASE, VLLM_DFLASH_RELEASE
from medusa_forge.errors import UserError
from medusa_forge.pairing import check_fits, local_shape, not_checked


def check_servable(config: DFlashConfig, where: str, target: str | None = None, flag: str = "--model") -> int | None:
    """Refuse a draft the engines cannot serve with its target (`target`: the base the engines will load, default the
    draft's own): another hidden size or vocabulary, another number of layers than it was trained on, or a feature
    layer the engines cannot capture (t = L-1 would be HF hs[L], which exists only after the final norm; vLLM and
    SGLang capture the residual entering layer t+1, §2.1). Returns the target's layer count; None when its config
    is not on this machine (not checked; nothing is downloaded)."""
    name = target or config.base_model_name_or_path
    shape = local_shape(name)
    if shape is None or shape.num_layers is None:
        return None
    check_fits("DFlash draft", config.hidden_size, config.vocab_size, shape, name, where, flag)
    if shape.num_layers != config.num_target_layers:
        raise UserError(f"{where}: the draft was trained on a {config.num_target_layers}-layer target; {name} has "
                        f"{shape.num_layers} layers")  # fmt: skip
    if max(config.target_layer_ids) > shape.num_layers - 2:
        raise UserError(
            f"{where}: the draft reads target layer {max(config.target_layer_ids)} of {shape.num_layers}, the last "
            "one, whose output vLLM and SGLang cannot capture; a target of >= 4 layers gets servable layers"
        )
    return shape.num_layers


def export_draft(source: Path, fmt: str, output_dir: Path, base_model_id: str | None) -> ExportResult:
    """A DFlash draft as vLLM and SGLang load it: checked against its target, written, read back and compared."""
    if fmt not in DFLASH_ENGINES:
        raise UserError(f"--format {fmt}: {source} is a DFlash draft, which {fmt} does not load here; choose one of "
                        f"{', '.join(DFLASH_ENGINES)}")  # fmt: skip
    draft = DFlashDraft.load(source)
    config = draft.config
    notes = []
    if check_servable(config, str(source), base_model_id, "--base-model-id") is None:
        notes.append(not_checked(base_model_id or config.base_model_name_or_path))
    if base_model_id:
        config.base_model_name_or_path = base_model_id
    files = write_for_engines(draft, source, output_dir)
    notes.append(
        f"DFlash drafts load in vLLM (pinned: {VLLM_DFLASH_RELEASE}) and SGLang (pinned: {SGLANG_DFLASH_RELEASE}; "
        "CUDA, NPU or XPU only); both use the target's tokenizer, embedding and lm_head, and the block's mask token "
        f"{config.mask_token_id} (dflash_config.mask_token_id)"
    )
    base, size, chain = config.base_model_name_or_path, config.block_size, served_chain(source, config)
    commands = [dflash_serve_command(fmt, str(output_dir), base, size, chain)]
    if fmt == "vllm":
        commands.append(vllm_cpu_command(base, str(output_dir), "dflash", chain))
    drafts = f"vLLM drafts a chain of {chain} tokens per step ({chain_origin(chain, size)}; block size {size})"
    if fmt == "sglang":
        drafts = f"SGLang drafts the whole block of {size} ({size - 1} tokens per step)"
    notes.append(
        f"{drafts}: `medusa-forge eval --draft {shlex.quote(str(source))} --engine vllm` measures what vLLM "
        "accepts, next to our decoder"
    )
    return ExportResult(output_dir, files, commands, notes)


def check_for_push(folder: Path) -> PushCheck:
    """A draft: loaded and checked (tensor names, shapes, dtype, config), and against its target where the target's
    config is here (the rule `export` applies), so no draft goes up that the engines misread."""
    config = DFlashDraft.load(folder).config
    notes = []
    if check_servable(config, str(folder)) is None:
        notes.append(not_checked(config.base_model_name_or_path))
    readers = "`medusa-forge generate/serve` and the model card's vLLM and SGLang commands"
    return PushCheck(config, notes, readers, {}, (CONFIG_NAME, WEIGHTS_NAME), "Upload DFlash draft with medusa-forge")
