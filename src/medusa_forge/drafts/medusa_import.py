"""`medusa-forge import` (Medusa heads only, so it lives with the kind): read Medusa heads in any known layout
(original `.pt`, "version 2", vLLM, full checkpoints with `medusa_head.` weights, ours) and write them in our
layout, which every command here and TGI / TensorRT-LLM load. Says which layout it found; refuses ambiguous or
inconsistent input."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from medusa_forge.drafts.medusa_format import write_medusa
from medusa_forge.drafts.medusa_heads import WEIGHTS_NAME
from medusa_forge.drafts.medusa_layouts import LAYOUTS, OUR_LAYOUT, LoadedHeads, describe
from medusa_forge.drafts.medusa_read import read_heads
from medusa_forge.errors import UserError
from medusa_forge.formats.files import copy_sidecars, same_tensors
from medusa_forge.formats.tree_file import TREE_FILE
from medusa_forge.outputs import check_writable_folder, removed_if_failed_empty
from medusa_forge.tokenizer_files import copy_tokenizer


def import_heads(
    source: str | Path,
    output_dir: str | Path,
    base_model: str | None = None,
    layout: str | None = None,
    num_heads: int | None = None,
) -> tuple[LoadedHeads, list[Path]]:
    """Convert `source` into our layout in `output_dir`; returns what was read and the files written."""
    source, output_dir = Path(source), Path(output_dir)
    if output_dir.exists() and source.exists() and output_dir.resolve() == source.resolve():
        raise UserError("--output-dir must differ from --from (import writes a new folder)")
    with removed_if_failed_empty(output_dir):
        check_writable_folder(output_dir, f"--output-dir {output_dir}")  # before the heads are read and checked
        loaded = read_heads(source, base_model=base_model, layout=layout, num_heads=num_heads)
        if (output_dir / WEIGHTS_NAME).exists():
            loaded.notes.append(f"replaced the heads already in {output_dir}")
        files = write_medusa(loaded, output_dir)
        files += copy_tokenizer(source, output_dir) + copy_sidecars(source, output_dir, (TREE_FILE,))
        written = read_heads(output_dir, layout=OUR_LAYOUT, check_base=False)
        if not same_tensors(written.state, loaded.state):
            raise UserError(f"{output_dir}: the written heads differ from the source; please report this")
    return loaded, files


@dataclass
class ImportConfig:
    """Convert Medusa heads from any known layout into this project's (= TGI's) layout."""

    source: str = field(metadata={"flag": "--from", "help": "Heads folder or weights file to read."})
    output_dir: str = field(metadata={"help": "Folder to write (config.json + medusa_lm_head.safetensors)."})
    base_model: str | None = field(
        default=None,
        metadata={
            "help": "Base model (Hub id or folder) when the source does not name it, or to check sizes against another."
        },
    )
    layout: str | None = field(
        default=None, metadata={"help": "Read this layout instead of detecting it.", "choices": list(LAYOUTS)}
    )
    num_heads: int | None = field(
        default=None,
        metadata={"help": "Trust the weights, not the config, for the head count (keeps the first N heads)."},
    )

    def __post_init__(self) -> None:
        if self.layout is not None and self.layout not in LAYOUTS:
            raise UserError(f"--layout {self.layout}: choose from {', '.join(LAYOUTS)}")


def run_import(config: ImportConfig) -> int:
    loaded, files = import_heads(config.source, config.output_dir, config.base_model, config.layout, config.num_heads)
    info = describe(loaded)
    print(f"found: {loaded.description}")
    print(
        f"heads: {info['medusa_num_heads']}, blocks per head: {info['medusa_num_layers']}, hidden "
        f"{info['hidden_size']}, vocabulary {info['vocab_size']}, {info['dtype']}, "
        f"base {info['base_model_name_or_path']}"
    )
    for note in loaded.notes:
        print(f"note: {note}")
    print(f"wrote {config.output_dir}: " + ", ".join(p.name for p in files))
    return 0
