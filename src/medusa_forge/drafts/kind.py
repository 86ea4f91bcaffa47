"""What a kind of draft is: everything the rest of the code may ask about one (Medusa heads, an EAGLE-3 draft, the
next kind), so that no other module branches on a kind's name. Each kind is one module of this package that
registers one `DraftKind`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path


class DraftKind(ABC):
    """One kind of draft. Subclasses set the names below and implement the methods."""

    name: str  # the `draft_kind` value: train's --draft_kind, the pipeline's key, eval.json's field
    label: str  # what messages and reports call one draft of the kind ("Medusa heads")
    title: str  # the kind's short name in headings ("Medusa")
    config_name: str = "config.json"  # the draft folder's config file
    weights_name: str  # the draft folder's weights file (what later pipeline stages fingerprint)
    metric_name: str  # training logs name metric i of the draft `{metric_name}{i}_loss`, `_top1`, ...
    metric_label: str  # what one of those i is called in log lines and plots ("head", "step")
    formats: tuple[str, ...]  # the engines `export` writes the kind for
    default_formats: tuple[str, ...]  # the pipeline's export formats when its configuration names none
    expected_files: str  # what its folder holds, for the error that finds no kind in a folder

    @abstractmethod
    def recognises(self, folder: Path) -> bool:
        """Whether `folder` (an existing folder) holds a draft of this kind; cheap, reads no weights."""
