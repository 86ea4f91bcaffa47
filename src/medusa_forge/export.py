"""`medusa-forge export`: write trained heads in the layout an engine loads as-is (TGI, vLLM, TensorRT-LLM),
check the result by reading it back, and print the command that serves it.

TGI and TensorRT-LLM read our own layout (config.json + medusa_lm_head.safetensors); vLLM needs its own names
and config keys. Layouts: README, "Export, import and push", and medusa_forge/formats/.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from medusa_forge.eagle3 import Eagle3Draft, check_servable, is_eagle3_folder
from medusa_forge.engine_commands import (
    EAGLE3_ENGINES,
    EAGLE3_SPECULATIVE_TOKENS,
    eagle3_serve_command,
    vllm_cpu_command,
    vllm_medusa_command,
)
from medusa_forge.engine_versions import (
    EAGLE3_ONLY,
    SGLANG_EAGLE3_RELEASE,
    TENSORRT_LLM_MEDUSA_RELEASE,
    TGI_IMAGE,
    VLLM_EAGLE3_RELEASE,
    VLLM_MEDUSA_RELEASE,
)
from medusa_forge.errors import UserError
from medusa_forge.formats.files import copy_sidecars, same_tensors
from medusa_forge.formats.layouts import FORMATS, LAYOUTS, LoadedHeads
from medusa_forge.formats.medusa import write_medusa
from medusa_forge.formats.read import read_heads
from medusa_forge.formats.tree_file import TREE_FILE, Choices, default_choices, load_tree
from medusa_forge.formats.vllm import write_vllm
from medusa_forge.model_card import CARD_INPUTS_NAME
from medusa_forge.results import TRAINING_METRICS_FILE
from medusa_forge.tokenizer_files import copy_tokenizer, save_tokenizer


@dataclass
class ExportResult:
    output_dir: Path
    files: list[Path]
    serve_commands: list[str]
    notes: list[str] = field(default_factory=list)


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
    heads: str | Path,
    fmt: str,
    output_dir: str | Path,
    base_model_id: str | None = None,
    tokenizer: str | None = None,
    layout: str | None = None,
) -> ExportResult:
    """Write `heads` (Medusa heads in any known layout, or an EAGLE-3 draft) for engine `fmt` into `output_dir`,
    then read it back and compare."""
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"--format {fmt}: choose one of {', '.join(EXPORT_FORMATS)}")
    output_dir = Path(output_dir)
    if output_dir.exists() and Path(heads).exists() and output_dir.resolve() == Path(heads).resolve():
        raise UserError("--output-dir must differ from --heads (export writes a new folder)")
    if Path(heads).is_dir() and is_eagle3_folder(heads):
        return export_eagle3(Path(heads), fmt, output_dir, base_model_id)
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: SGLang never served Medusa heads; choose one of {', '.join(FORMATS)}")
    loaded = read_heads(heads, layout=layout)
    notes = list(loaded.notes)
    trained_base = loaded.config.base_model_name_or_path  # the base the heads were trained on (often local)
    if base_model_id:
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
    # The tree for engines that take one, and what a later `push` of this folder needs for its model card.
    files += copy_sidecars(loaded.source, output_dir, (TREE_FILE, CARD_INPUTS_NAME, TRAINING_METRICS_FILE))
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
    notes.append(f"Medusa heads load in TGI's last release, vLLM <= {VLLM_MEDUSA_RELEASE} and TensorRT-LLM "
                 f"{TENSORRT_LLM_MEDUSA_RELEASE}; {EAGLE3_ONLY}")
    return ExportResult(output_dir, files, serve_commands(fmt, output_dir, loaded), notes)


EAGLE3_FORMATS = EAGLE3_ENGINES  # the same folder loads in both (docs/eagle3-reference.md §0)
EXPORT_FORMATS = (*FORMATS, "sglang")


def export_eagle3(source: Path, fmt: str, output_dir: Path, base_model_id: str | None = None) -> ExportResult:
    """An EAGLE-3 draft as vLLM and SGLang load it (our folder already is that layout): checked against its target,
    written, read back and compared."""
    if fmt not in EAGLE3_FORMATS:
        raise UserError(
            f"--format {fmt}: {source} is an EAGLE-3 draft, which {fmt} does not load here; "
            f"choose one of {', '.join(EAGLE3_FORMATS)}"
        )
    draft = Eagle3Draft.load(source)
    config = draft.config
    notes = []
    if check_servable(config, str(source)) is None:
        notes.append(f"not checked against the target {config.base_model_name_or_path!r} (no local config.json)")
    if base_model_id:
        config.base_model_name_or_path = base_model_id
    if output_dir.is_dir() and any(p.suffix in (".safetensors", ".pt", ".bin") for p in output_dir.iterdir()):
        raise UserError(f"--output-dir {output_dir} already holds weights that an engine would also read")
    draft.save(output_dir)
    files = [output_dir / "config.json", output_dir / "model.safetensors"]
    files += copy_tokenizer(source, output_dir)
    # What a later `push` of this folder needs for its model card.
    files += copy_sidecars(source, output_dir, (CARD_INPUTS_NAME, TRAINING_METRICS_FILE))
    written = Eagle3Draft.load(output_dir)
    if not same_tensors(written.state_dict(), draft.state_dict()) or written.config != config:
        raise UserError(f"{output_dir}: the written draft differs from the source; please report this")
    notes.append(
        f"EAGLE-3 drafts load in vLLM >= 0.32 (pinned: {VLLM_EAGLE3_RELEASE}) and SGLang (pinned: "
        f"{SGLANG_EAGLE3_RELEASE}); both read the tokenizer and the frozen embeddings from the target"
    )
    base = config.base_model_name_or_path
    commands = [eagle3_serve_command(fmt, str(output_dir), base)]
    if fmt == "vllm":
        commands.append(vllm_cpu_command(base, str(output_dir), "eagle3", EAGLE3_SPECULATIVE_TOKENS))
    notes.append(
        f"the engines draft a chain of the printed num_speculative_tokens, not medusa-forge's tree: `medusa-forge "
        f"eval --draft {shlex.quote(str(source))} --engine vllm` measures what vLLM accepts, next to our decoder"
    )
    return ExportResult(output_dir, files, commands, notes)


@dataclass
class ExportConfig:
    """Write a draft (Medusa heads or an EAGLE-3 draft) in the layout an inference engine loads."""

    heads: str = field(
        metadata={
            "help": "Draft folder: Medusa heads (written by `medusa-forge train`, or any layout) or an EAGLE-3 draft.",
            "aliases": ["--draft"],
        }
    )
    format: str = field(
        metadata={"help": "Target engine (Medusa: tgi, vllm, tensorrt-llm; EAGLE-3: vllm, sglang).",
                  "choices": EXPORT_FORMATS}
    )
    output_dir: str = field(metadata={"help": "New folder to write."})
    base_model_id: str | None = field(
        default=None,
        metadata={
            "help": "Write this base model name (e.g. a Hub id) into the exported config instead of the heads' own."
        },
    )
    tokenizer: str | None = field(
        default=None, metadata={"help": "TGI only: take the tokenizer from here (default: heads folder, then base)."}
    )
    layout: str | None = field(
        default=None, metadata={"help": "Layout of --heads when detection is ambiguous.", "choices": list(LAYOUTS)}
    )

    def __post_init__(self) -> None:
        if self.format not in EXPORT_FORMATS:
            raise UserError(f"--format {self.format}: choose from {', '.join(EXPORT_FORMATS)}")
        if self.layout is not None and self.layout not in LAYOUTS:
            raise UserError(f"--layout {self.layout}: choose from {', '.join(LAYOUTS)}")


def run_export(config: ExportConfig) -> int:
    result = export_heads(
        config.heads, config.format, config.output_dir, config.base_model_id, config.tokenizer, config.layout
    )
    print(f"wrote {config.format} layout to {result.output_dir}:")
    for path in result.files:
        print(f"  {path.name}")
    for note in result.notes:
        print(f"note: {note}")
    print("serve it with:")
    for command in result.serve_commands:
        print(f"  {command}")
    return 0
