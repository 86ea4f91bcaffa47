"""Medusa heads as a kind of draft: K heads over the base model's final hidden state (`heads.py`), stored in
TGI's layout or any other Medusa layout (`formats/`)."""

from __future__ import annotations

from pathlib import Path

from medusa_forge import heads
from medusa_forge.drafts.kind import DraftKind
from medusa_forge.formats.layouts import FORMATS, LAYOUTS
from medusa_forge.formats.read import folder_layouts


class MedusaKind(DraftKind):
    name = "medusa"
    label = "Medusa heads"
    title = "Medusa"
    config_name = heads.CONFIG_NAME
    weights_name = heads.WEIGHTS_NAME
    metric_name = "medusa"  # logged as medusa{i}_loss, medusa{i}_top1, ... (the original trainer's names)
    metric_label = "head"
    formats = FORMATS
    default_formats = ("tgi", "vllm")
    expected_files = "; ".join(LAYOUTS.values())

    def recognises(self, folder: Path) -> bool:
        return bool(folder_layouts(folder))


MEDUSA = MedusaKind()
