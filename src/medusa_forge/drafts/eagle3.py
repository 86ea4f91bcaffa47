"""An EAGLE-3 draft as a kind of draft: one decoder layer over three of the target's hidden states (`eagle3.py`),
in the folder layout vLLM and SGLang load."""

from __future__ import annotations

from pathlib import Path

from medusa_forge import eagle3
from medusa_forge.drafts.kind import DraftKind
from medusa_forge.engine_commands import EAGLE3_ENGINES


class Eagle3Kind(DraftKind):
    name = "eagle3"
    label = "EAGLE-3 draft"
    title = "EAGLE-3"
    config_name = eagle3.CONFIG_NAME
    weights_name = eagle3.WEIGHTS_NAME
    metric_name = "eagle3_step"  # eagle3_step{j}_loss: step j of the training-time test
    metric_label = "step"
    formats = EAGLE3_ENGINES  # the same folder loads in both (docs/eagle3-reference.md §0)
    default_formats = EAGLE3_ENGINES
    expected_files = f"{eagle3.CONFIG_NAME} naming {eagle3.ARCHITECTURE} + {eagle3.WEIGHTS_NAME}"

    def recognises(self, folder: Path) -> bool:
        return eagle3.is_eagle3_folder(folder)


EAGLE3 = Eagle3Kind()
