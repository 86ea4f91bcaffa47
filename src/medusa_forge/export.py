"""`medusa-forge export`: write a draft in the layout an engine loads as-is, check the result by reading it back,
and print the commands that serve it. The draft's kind writes it (`DraftKind.export`: Medusa heads for TGI, vLLM,
TensorRT-LLM; an EAGLE-3 draft for vLLM and SGLang); export adds what a later `push` needs for the model card.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from medusa_forge.drafts import format_choices, kind_of, kinds, layout_choices
from medusa_forge.drafts.card import CARD_INPUTS_NAME
from medusa_forge.drafts.kind import ExportResult
from medusa_forge.errors import UserError
from medusa_forge.formats.files import copy_sidecars
from medusa_forge.outputs import check_writable_folder, removed_if_failed_empty
from medusa_forge.results import TRAINING_METRICS_FILE


def export_draft(
    draft: str | Path,
    fmt: str,
    output_dir: str | Path,
    base_model_id: str | None = None,
    tokenizer: str | None = None,
    layout: str | None = None,
) -> ExportResult:
    """Write the draft in `draft` (its kind detected) for engine `fmt` into `output_dir`, then read it back and
    compare."""
    if fmt not in format_choices():
        raise UserError(f"--format {fmt}: choose one of {', '.join(format_choices())}")
    source, output_dir = Path(draft), Path(output_dir)
    if output_dir.exists() and source.exists() and output_dir.resolve() == source.resolve():
        raise UserError("--output-dir must differ from --draft (export writes a new folder)")
    with removed_if_failed_empty(output_dir):
        check_writable_folder(output_dir, f"--output-dir {output_dir}")  # before the draft is read and checked
        result = kind_of(source).export(source, fmt, output_dir, base_model_id, tokenizer, layout)
        # What a later `push` of this folder needs for its model card.
        result.files += copy_sidecars(source, output_dir, (CARD_INPUTS_NAME, TRAINING_METRICS_FILE))
    return result


@dataclass
class ExportConfig:
    """Write a draft in the layout an inference engine loads."""

    draft: str = field(
        metadata={
            "help": "Draft folder: Medusa heads (written by `medusa-forge train`, or any layout) or an EAGLE-3 draft.",
            "aliases": ["--heads"],
        }
    )
    format: str = field(
        metadata={
            "help": "Target engine ("
            + "; ".join(f"{kind.title}: {', '.join(kind.formats)}" for kind in kinds())
            + ").",
            "choices": format_choices(),
        }
    )
    output_dir: str = field(metadata={"help": "New folder to write."})
    base_model_id: str | None = field(
        default=None,
        metadata={
            "help": "Write this base model name (e.g. a Hub id) into the exported config instead of the draft's own."
        },
    )
    tokenizer: str | None = field(
        default=None, metadata={"help": "TGI only: the tokenizer's folder (default: the draft folder, then the base)."}
    )
    layout: str | None = field(
        default=None, metadata={"help": "Layout of --draft when detection is ambiguous.", "choices": layout_choices()}
    )

    def __post_init__(self) -> None:
        if self.format not in format_choices():
            raise UserError(f"--format {self.format}: choose from {', '.join(format_choices())}")
        if self.layout is not None and self.layout not in layout_choices():
            raise UserError(f"--layout {self.layout}: choose from {', '.join(layout_choices())}")


def run_export(config: ExportConfig) -> int:
    result = export_draft(
        config.draft, config.format, config.output_dir, config.base_model_id, config.tokenizer, config.layout
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
