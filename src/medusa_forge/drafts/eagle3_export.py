"""An EAGLE-3 draft out to the engines (`EAGLE3.export`) and the Hub (`EAGLE3.check_for_push`): vLLM and SGLang
load our folder's layout as it is, so export checks the draft against its target, writes it, reads it back and
compares, with the commands that serve it.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from medusa_forge.drafts.eagle3_config import check_servable
from medusa_forge.drafts.eagle3_model import Eagle3Draft
from medusa_forge.drafts.kind import ExportResult, PushCheck
from medusa_forge.drafts.model_folder import CONFIG_NAME, WEIGHTS_NAME, write_for_engines
from medusa_forge.engine_commands import (
    EAGLE3_ENGINES,
    EAGLE3_SPECULATIVE_TOKENS,
    eagle3_serve_command,
    vllm_cpu_command,
)
from medusa_forge.engine_versions import SGLANG_EAGLE3_RELEASE, VLLM_EAGLE3_RELEASE
from medusa_forge.errors import UserError
from medusa_forge.pairing import not_checked


def export_draft(source: Path, fmt: str, output_dir: Path, base_model_id: str | None) -> ExportResult:
    """An EAGLE-3 draft as vLLM and SGLang load it (our folder already is that layout): checked against its target,
    written, read back and compared."""
    if fmt not in EAGLE3_ENGINES:  # the same folder loads in both (docs/eagle3-reference.md §0)
        raise UserError(
            f"--format {fmt}: {source} is an EAGLE-3 draft, which {fmt} does not load here; "
            f"choose one of {', '.join(EAGLE3_ENGINES)}"
        )
    draft = Eagle3Draft.load(source)
    config = draft.config
    notes = []
    # The target the engines will load is checked: --base-model-id when given, else the one the draft records.
    if check_servable(config, str(source), base_model_id, "--base-model-id") is None:
        notes.append(not_checked(base_model_id or config.base_model_name_or_path))
    if base_model_id:
        config.base_model_name_or_path = base_model_id
    files = write_for_engines(draft, source, output_dir)
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


def check_for_push(folder: Path) -> PushCheck:
    """A draft: loaded and checked (tensor names, shapes, dtypes, vocabulary maps), and against its target where
    the target's config is here (the rule `export` applies), so no draft goes up that the engines misread."""
    config = Eagle3Draft.load(folder).config
    notes = []
    layers = check_servable(config, str(folder))
    if layers is None:
        notes.append(not_checked(config.base_model_name_or_path))
    readers = "`medusa-forge generate/serve` and the model card's vLLM and SGLang commands"
    uploads = (CONFIG_NAME, WEIGHTS_NAME)  # the engines' two files; not whatever else the folder holds
    message = "Upload EAGLE-3 draft with medusa-forge"
    return PushCheck(config, notes, readers, {"target_num_layers": layers}, uploads, message)
