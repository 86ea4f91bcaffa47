"""The draft folder's README.md: a Hub model card with metadata, what the draft was trained on, how well it
predicts, what an evaluation measured (accepted tokens per step, speed-up), and copy-paste serving snippets. The
draft's kind renders it (`DraftKind.render_card`, from the parts every card shares in `drafts/card.py`).

Training writes the card and keeps its inputs in `model_card.json`; `medusa-forge push` renders it again
with whatever `medusa-forge eval` measured since (eval.json), unless the user edited the card by hand.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from medusa_forge.drafts import kind_for_config
from medusa_forge.drafts.card import CARD_INPUTS_NAME, CARD_MARKER, README_NAME, load_eval
from medusa_forge.errors import UserError
from medusa_forge.results import TRAINING_METRICS_FILE, EvalReport, TrainingMetrics

logger = logging.getLogger("medusa_forge")

# The keys of model_card.json every kind has; the others are the kind's own card options.
_COMMON_INPUTS = ("base_model_id", "facts", "metrics")


def render_model_card(
    config: Any,
    base_model_id: str,
    facts: dict[str, str] | None = None,
    metrics: dict[str, float] | None = None,
    evaluation: EvalReport | None = None,
    repo_id: str | None = None,
    **options: Any,
) -> str:
    """Markdown with a YAML header, rendered by the kind whose config `config` is. `facts`: extra rows (training
    data and size); `metrics`: held-out accuracies from training (`{metric_name}{i}_top1`, `_top5`); `evaluation`:
    the report eval wrote; `options`: the kind's own (Medusa heads: `layout`, the folder's, which decides which
    engine reads it as-is; EAGLE-3: `target_num_layers`, to name the feature layers)."""
    kind = kind_for_config(config)
    return kind.render_card(config, base_model_id, facts or {}, metrics or {}, evaluation, repo_id, options)


def write_model_card(
    folder: str | Path,
    config: Any,
    base_model_id: str,
    facts: dict[str, str] | None = None,
    metrics: dict[str, float] | None = None,
    **options: Any,
) -> Path:
    """Write README.md, and keep the card's inputs in model_card.json so a later push can add eval results.
    `options`: the kind's own card options (`DraftKind.card_options`), kept with the inputs."""
    folder = Path(folder)
    inputs = {"base_model_id": base_model_id, "facts": facts or {}, "metrics": metrics or {}, **options}
    (folder / CARD_INPUTS_NAME).write_text(json.dumps(inputs, indent=2) + "\n")
    path = folder / README_NAME
    path.write_text(render_model_card(config, base_model_id, facts, metrics, load_eval(folder), **options))
    return path


def _training_metrics(folder: Path, name: str) -> dict[str, float]:
    """Held-out per-predictor metrics from training_metrics.json, for a folder whose card inputs were lost."""
    path = folder / TRAINING_METRICS_FILE
    if not path.is_file():
        return {}
    try:
        return TrainingMetrics.load(path).held_out_draft_metrics(name)
    except UserError as err:
        logger.warning("model card without training metrics: %s", err)
        return {}


def refreshed_model_card(
    folder: str | Path,
    config: Any,
    repo_id: str | None = None,
    base_model_id: str | None = None,
    **options: Any,
) -> str | None:
    """The card push should upload, or None to keep the folder's README.md (written by hand). `options`: the kind's
    card options known now (None: unknown), over those training recorded."""
    folder = Path(folder)
    readme = folder / README_NAME
    if readme.is_file() and CARD_MARKER not in readme.read_text(errors="replace"):
        return None
    try:
        inputs = json.loads((folder / CARD_INPUTS_NAME).read_text())
    except (OSError, ValueError):
        inputs = {}
    inputs = inputs if isinstance(inputs, dict) else {}
    base = base_model_id or inputs.get("base_model_id") or config.base_model_name_or_path
    facts = inputs.get("facts") if isinstance(inputs.get("facts"), dict) else {}
    name = kind_for_config(config).metric_name
    metrics = inputs.get("metrics") if isinstance(inputs.get("metrics"), dict) else _training_metrics(folder, name)
    recorded = {key: value for key, value in inputs.items() if key not in _COMMON_INPUTS}
    known = {key: value for key, value in options.items() if value is not None}
    return render_model_card(config, base, facts, metrics, load_eval(folder), repo_id, **{**recorded, **known})
