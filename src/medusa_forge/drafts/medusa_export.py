"""Medusa heads out to the engines (`MEDUSA.export`) and the Hub (`MEDUSA.check_for_push`): written in the layout
an engine loads as-is (TGI, vLLM, TensorRT-LLM), read back and compared, with the commands that serve them.

TGI and TensorRT-LLM read our own layout (config.json + medusa_lm_head.safetensors); vLLM needs its own names
and config keys. Layouts: README, "Export, import and push", and medusa_forge/formats/.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from medusa_forge.drafts.kind import ExportResult, PushCheck
from medusa_forge.drafts.medusa_checks import check_against_base
from medusa_forge.drafts.medusa_format import write_medusa
from medusa_forge.drafts.medusa_layouts import FORMATS, LAYOUTS, LoadedHeads
from medusa_forge.drafts.medusa_read import read_heads
from medusa_forge.drafts.medusa_vllm import write_vllm
from medusa_forge.engine_commands import vllm_cpu_command, vllm_medusa_command
from medusa_forge.engine_versions import EAGLE3_ONLY, TENSORRT_LLM_MEDUSA_RELEASE, TGI_IMAGE, VLLM_MEDUSA_RELEASE
from medusa_forge.errors import UserError
from medusa_forge.formats.files import copy_sidecars, same_tensors
from medusa_forge.formats.tree_file import TREE_FILE, Choices, default_choices, load_tree
from medusa_forge.tokenizer_files import copy_tokenizer, save_tokenizer


def _is_local_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or Path(name).exists()


def _ship_tokenizer(
    loaded: LoadedHeads, output_dir: Path, tokenizer: str | None, trained_base: str
) -> tuple[list[Path], str]:
    """TGI's router reads the tokenizer from --model-id (the heads folder), with transformers 4.x."""
    if tokenizer is None:
        copied = copy_tokenizer(loaded.source, output_dir)
        if copied:
            return copied, "tokenizer files copied from the heads folder (readable by TGI's transformers 4.x)"
        tokenizer = trained_base
    from medusa_forge.data.tokenize import ensure_chat_template
    from medusa_forge.modeling import load_tokenizer

    # The chat template training used (a base without one trained with the documented fallback).
    written = save_tokenizer(ensure_chat_template(load_tokenizer(tokenizer)), output_dir)
    return written, f"tokenizer files written from {tokenizer} (readable by TGI's transformers 4.x)"


def _tree(loaded: LoadedHeads) -> Choices:
    folder = loaded.source if loaded.source.is_dir() else loaded.source.parent
    return load_tree(folder) or default_choices(16, loaded.config.medusa_num_heads)


def serve_commands(fmt: str, output_dir: Path, loaded: LoadedHeads) -> list[str]:
    """Copy-paste commands that serve the exported folder, pinned to an engine release that loads Medusa."""
    k = loaded.config.medusa_num_heads
    base = loaded.config.base_model_name_or_path
    out = shlex.quote(str(output_dir))
    if fmt == "tgi":
        # TGI loads the base from config.json's base_model_name_or_path: a local base is mounted at that same path.
        mounts = f"-v {shlex.quote(str(output_dir.resolve()))}:/data/heads"
        if _is_local_path(base):
            mounts += f" -v {shlex.quote(base)}:{shlex.quote(base)}:ro"
        return [
            f"text-generation-launcher --model-id {out} --speculate {k}",
            f"docker run --gpus all --shm-size 1g -p 8080:80 {mounts} {TGI_IMAGE} --model-id /data/heads "
            f"--speculate {k}",
        ]
    if fmt == "vllm":
        return [vllm_medusa_command(base, str(output_dir), k), vllm_cpu_command(base, str(output_dir), "medusa", k)]
    choices = json.dumps(_tree(loaded), separators=(",", ":"))
    release = TENSORRT_LLM_MEDUSA_RELEASE
    return [
        f"python examples/medusa/convert_checkpoint.py --model_dir {shlex.quote(base)} --medusa_model_dir {out} "
        f"--output_dir tllm_checkpoint_medusa --dtype float16 --num_medusa_heads {k}  # TensorRT-LLM {release}: "
        f"pip install tensorrt_llm=={release}, examples/ from its v{release} source tree (main has no Medusa)",
        "trtllm-build --checkpoint_dir tllm_checkpoint_medusa --output_dir trt_engines_medusa "
        "--gemm_plugin float16 --speculative_decoding_mode medusa --max_batch_size 8",
        f"python examples/run.py --engine_dir trt_engines_medusa --tokenizer_dir {shlex.quote(base)} "
        f"--medusa_choices={shlex.quote(choices)} --use_py_session --temperature 0.0 --input_text 'Hello'",
    ]


def export_heads(
    source: Path, fmt: str, output_dir: Path, base_model_id: str | None, tokenizer: str | None, layout: str | None
) -> ExportResult:
    """Heads in any known layout (`layout`: when detection is ambiguous) written for engine `fmt` (one of
    `medusa_layouts.FORMATS`) into `output_dir`, then read back and compared. `tokenizer`: TGI's, when not the
    heads folder's or the base's."""
    if fmt not in FORMATS:
        why = "SGLang never served Medusa heads" if fmt == "sglang" else f"{fmt} does not load Medusa heads"
        raise UserError(f"--format {fmt}: {why}; choose one of {', '.join(FORMATS)}")
    # The base the engine will load is checked: --base-model-id when given, else the one the heads record.
    loaded = read_heads(source, layout=layout, check_base=not base_model_id)
    notes = list(loaded.notes)
    trained_base = loaded.config.base_model_name_or_path  # the base the heads were trained on (often local)
    if base_model_id:
        hidden, vocab = loaded.config.hidden_size, loaded.config.vocab_size
        notes.append(check_against_base(hidden, vocab, base_model_id, str(source), False, "--base-model-id"))
        loaded.config.base_model_name_or_path = base_model_id
    base = loaded.config.base_model_name_or_path
    if fmt != "vllm" and _is_local_path(base):
        # The engine loads the base from this path: make it absolute, so it means the same from any folder.
        base = loaded.config.base_model_name_or_path = str(Path(base).expanduser().resolve())
        notes.append(
            f"base_model_name_or_path is the local path {base!r}: the engine loads the base from it, so it must "
            "exist where the engine runs (the docker command mounts it; pass --base-model-id HUB_ID to name a "
            "Hub model instead)"
        )
    draft = loaded.config.draft_vocab_size
    if draft:
        notes.append(
            f"{fmt} has no usable draft vocabulary: the heads (trained on ids < {draft}) propose from all "
            f"{loaded.config.vocab_size} ids there (rows >= {draft} are the base lm_head's); medusa-forge's own "
            f"decoder keeps to ids < {draft}"
        )
    files = write_vllm(loaded, output_dir) if fmt == "vllm" else write_medusa(loaded, output_dir)
    files += copy_sidecars(loaded.source, output_dir, (TREE_FILE,))  # for the engines that take a tree
    if fmt == "tgi":
        shipped, note = _ship_tokenizer(loaded, output_dir, tokenizer, trained_base)
        files += shipped
        notes.append(note)
    # The proof that an engine reads what we meant: our own reader, on the written folder, gives the same tensors.
    written = read_heads(output_dir, layout="vllm" if fmt == "vllm" else "medusa", check_base=False)
    if not same_tensors(written.state, loaded.state) or written.config != loaded.config:
        raise UserError(f"{output_dir}: the written heads differ from the source; please report this")
    if fmt == "vllm":
        notes.append("vLLM reads the tokenizer from the base model; medusa_fc_bias is true so biases are loaded")
    notes.append(
        f"Medusa heads load in TGI's last release, vLLM <= {VLLM_MEDUSA_RELEASE} and TensorRT-LLM "
        f"{TENSORRT_LLM_MEDUSA_RELEASE}; {EAGLE3_ONLY}"
    )
    return ExportResult(output_dir, files, serve_commands(fmt, output_dir, loaded), notes)


def check_for_push(folder: Path) -> PushCheck:
    """Heads: validated (names, shapes and counts, and sizes against the base model where it is available), in
    this project's (= TGI's) layout or vLLM's."""
    loaded = read_heads(folder)
    if loaded.layout not in ("medusa", "vllm"):
        raise UserError(
            f"{folder} holds {LAYOUTS[loaded.layout]}; push uploads this project's (= TGI's) layout or a vLLM "
            f"export. Convert first: medusa-forge import --from {folder} --output-dir HEADS"
        )
    readers = "TGI and everyone who downloads these heads"
    message = "Upload Medusa heads with medusa-forge"
    return PushCheck(loaded.config, list(loaded.notes), readers, {"layout": loaded.layout}, None, message)
