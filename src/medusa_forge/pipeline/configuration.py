"""The pipeline's configuration: PipelineConfig and its sections, the YAML file, `--set` overrides, validation
before any work starts, and the command config (DistillConfig, TrainConfig, EvalConfig) each stage runs with."""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from medusa_forge.drafts import default_kind, get_kind, kind_names
from medusa_forge.errors import UserError

if TYPE_CHECKING:
    from medusa_forge.distill.cli import DistillConfig
    from medusa_forge.evaluate.cli import EvalConfig
    from medusa_forge.train.args import TrainConfig

# Set by the pipeline itself; not allowed in the config sections.
OWNED = {
    "distill": ("input_filename", "output_filename", "model", "url", "resume", "overwrite"),
    "train": ("model_name_or_path", "data_path", "output_dir", "resume_from_checkpoint", "auto_resume", "draft_kind"),
    "evaluate": ("draft", "model", "data", "output_dir", "no_save_tree"),
}
# Where an owned key comes from instead, for the error that refuses it in a section.
OWNED_BY = {"draft_kind": f"the top-level key `draft_kind` ({' or '.join(kind_names())})"}


@dataclass
class DistillSection:
    """Self-distillation (`medusa-forge distill`)."""

    enabled: bool = True  # false: train on `data` as it is
    urls: list[str] = field(default_factory=list)  # OpenAI-compatible servers; empty: the model runs in-process
    flags: dict = field(default_factory=dict)  # any other `medusa-forge distill` flag, dashes as underscores


@dataclass
class ExportSection:
    # Any of the draft kind's formats (Medusa: tgi, vllm, tensorrt-llm; EAGLE-3: vllm, sglang). Left out (null):
    # the kind's default_formats.
    formats: list[str] = field(default_factory=list)
    base_model_id: str | None = None  # Hub id written into the exported configs instead of a local base path


@dataclass
class PushSection:
    repo: str | None = None  # USER/NAME: push the draft folder there (nothing is pushed while this is empty)
    private: bool = False
    revision: str | None = None
    dry_run: bool = False  # list what would be uploaded, send nothing
    base_model_id: str | None = None


@dataclass
class PipelineConfig:
    """The whole pipeline; pipeline.example.yaml documents every key."""

    model: str = "smollm2"  # base model: local folder, Hub id, or the offline alias smollm2
    # What the train stage trains: a name of the drafts registry (medusa: heads, eagle3: an EAGLE-3 draft, dflash: a
    # DFlash block draft).
    draft_kind: str = field(default_factory=lambda: default_kind().name)
    data: str = "sharegpt"  # conversations to replay (ShareGPT or role/content JSON/JSONL) or the alias sharegpt
    eval_data: str | None = None  # held-out conversations; default sharegpt-heldout when data is sharegpt
    train_launcher: str | None = None  # e.g. "torchrun --nproc_per_node=4": the train stage runs under it
    distill: DistillSection = field(default_factory=DistillSection)
    train: dict = field(default_factory=dict)  # any `medusa-forge train` flag, without the dashes
    eval: dict = field(default_factory=dict)  # any `medusa-forge eval` flag, dashes as underscores
    export: ExportSection = field(default_factory=ExportSection)
    push: PushSection = field(default_factory=PushSection)

    @property
    def held_out(self) -> str:
        return self.eval_data or "sharegpt-heldout"


# --- YAML + overrides -> validated PipelineConfig -----------------------------------------------------------------


def _check_keys(where: str, given: dict, valid: list[str]) -> None:
    unknown = sorted(set(given) - set(valid))
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, valid, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise UserError(f"{where}: unknown keys {', '.join(hints)}; valid keys: {', '.join(sorted(valid))}")


def command_config(stage: str) -> type:
    """The config dataclass of the command a stage runs (imported when first needed: torch comes with it)."""
    if stage == "distill":
        from medusa_forge.distill.cli import DistillConfig

        return DistillConfig
    if stage == "train":
        from medusa_forge.train.args import TrainConfig

        return TrainConfig
    from medusa_forge.evaluate.cli import EvalConfig

    return EvalConfig


def command_default(stage: str, key: str) -> Any:
    """The default of one setting of the command a stage runs, from that command's config dataclass."""
    return next(f.default for f in fields(command_config(stage)) if f.name == key)


def _section_keys(stage: str) -> list[str]:
    from medusa_forge.flags import config_keys

    return config_keys(command_config(stage), OWNED[stage])


def config_from_dict(raw: dict, source: str) -> PipelineConfig:
    """Validate a plain dict (from YAML + overrides) into a PipelineConfig; errors name the key and the valid ones."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of keys (model, data, distill, train, ...) at the top level")
    top = [f.name for f in fields(PipelineConfig)]
    _check_keys(source, raw, top)
    raw = copy.deepcopy(raw)
    for section in ("distill", "train", "eval", "export", "push"):
        if raw.get(section) is None:
            raw[section] = {}
        if not isinstance(raw[section], dict):
            raise UserError(f"{source}: '{section}' must be a mapping of keys, not {raw[section]!r}")
    for key in ("model", "data", "eval_data", "train_launcher"):
        if key in raw and raw[key] is not None and not isinstance(raw[key], str):
            raise UserError(f"{source}: '{key}' must be a string (a path, Hub id or alias)")
    kind = raw.get("draft_kind") or default_kind().name
    if not isinstance(kind, str) or kind not in kind_names():
        raise UserError(f"{source}: draft_kind {kind!r}: choose one of {', '.join(kind_names())}")

    distill_raw = dict(raw["distill"])
    enabled = distill_raw.pop("enabled", True)
    urls = distill_raw.pop("urls", []) or []
    urls = [urls] if isinstance(urls, str) else list(urls)
    for section, given in (("distill", distill_raw), ("train", raw["train"]), ("evaluate", raw["eval"])):
        _check_owned(f"{source}: {'eval' if section == 'evaluate' else section}", section, given)
    _check_keys(f"{source}: distill", distill_raw, ["enabled", "urls", *_section_keys("distill")])
    _check_keys(f"{source}: train", raw["train"], _section_keys("train"))
    _check_keys(f"{source}: eval", raw["eval"], _section_keys("evaluate"))
    _check_keys(f"{source}: export", raw["export"], [f.name for f in fields(ExportSection)])
    _check_keys(f"{source}: push", raw["push"], [f.name for f in fields(PushSection)])
    export = dict(raw["export"])
    if export.get("formats") is None:
        export["formats"] = list(get_kind(kind).default_formats)
    config = PipelineConfig(
        model=raw.get("model") or "smollm2",
        draft_kind=kind,
        data=raw.get("data") or "sharegpt",
        eval_data=raw.get("eval_data"),
        train_launcher=raw.get("train_launcher"),
        distill=DistillSection(enabled=bool(enabled), urls=urls, flags=distill_raw),
        train=raw["train"],
        eval=raw["eval"],
        export=ExportSection(**export),
        push=PushSection(**raw["push"]),
    )
    _validate(config, source)
    return config


def _check_owned(where: str, stage: str, given: dict) -> None:
    """A key the pipeline sets itself, given in a section: say where it comes from instead."""
    for key in given:
        if key in OWNED[stage]:
            source = OWNED_BY.get(key, "the pipeline (from model, data and the work folder)")
            raise UserError(f"{where}: {key!r} is not a key of this section: it is set by {source}")


def _validate(config: PipelineConfig, source: str) -> None:
    """Everything that can be checked before hours of work: flags parse, formats exist, eval data is named."""
    if config.eval_data is None and config.data != "sharegpt":
        raise UserError(
            f"{source}: set 'eval_data' to held-out conversations (a file that training does not see); "
            "the default sharegpt-heldout only fits data: sharegpt"
        )
    distill_config(config, Path("distill.jsonl"), fresh=False, where=f"{source}: distill")
    train_config(config, config.data, Path("heads"), where=f"{source}: train")
    eval_config(config, Path("heads"), Path("eval"), where=f"{source}: eval")
    formats = config.export.formats
    if isinstance(formats, str):
        config.export.formats = formats = [formats]
    kind = get_kind(config.draft_kind)
    bad = [f for f in formats if f not in kind.formats]
    if bad:
        raise UserError(
            f"{source}: export.formats {bad}: with draft_kind {kind.name} ({kind.label}) "
            f"choose from {', '.join(kind.formats)}"
        )


def parse_override(text: str) -> tuple[list[str], object]:
    """`train.num_train_epochs=2` -> (["train", "num_train_epochs"], 2); the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.num_train_epochs=2")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as err:
        raise UserError(f"--set {text!r}: the value is not valid YAML ({err})") from None
    return key.strip().split("."), parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"--set {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return raw


def load_config(path: str | None, overrides: list[str], base: dict | None = None) -> PipelineConfig:
    """Config from `base` (the quickstart's), then the YAML file, then `--set` overrides."""
    raw: dict = copy.deepcopy(base) if base else {}
    source = "built-in quickstart config" if base else "pipeline config"
    if path:
        file = Path(path)
        if not file.is_file():
            raise UserError(f"--config {path}: no such file (start from pipeline.example.yaml)")
        try:
            loaded = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as err:
            raise UserError(f"{path}: not UTF-8 text (byte {err.start}); save the config as UTF-8") from None
        except yaml.YAMLError as err:
            raise UserError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(loaded, dict):
            raise UserError(f"{path}: expected a mapping of keys at the top level")
        raw = _merge(raw, loaded)
        source = str(path)
    if overrides:
        raw = apply_overrides(raw, overrides)
    return config_from_dict(raw, source)


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def config_to_dict(config: PipelineConfig) -> dict:
    distill = {"enabled": config.distill.enabled, "urls": config.distill.urls, **config.distill.flags}
    return {
        "model": config.model,
        "draft_kind": config.draft_kind,
        "data": config.data,
        "eval_data": config.eval_data,
        "train_launcher": config.train_launcher,
        "distill": distill,
        "train": config.train,
        "eval": config.eval,
        "export": {"formats": config.export.formats, "base_model_id": config.export.base_model_id},
        "push": {f.name: getattr(config.push, f.name) for f in fields(PushSection)},
    }


# --- the command config each stage runs with ---------------------------------------------------------------------


def _stage_config(name: str, section: dict, where: str, **owned: Any) -> Any:
    """The command config a stage runs with: its section's values plus the ones the pipeline sets."""
    from medusa_forge.flags import config_from_values

    try:
        return config_from_values(command_config(name), section, **owned)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None


def distill_config(config: PipelineConfig, output: Path, fresh: bool, where: str = "distill") -> DistillConfig:
    """fresh: start over (overwrite the output) instead of resuming where the output file stops."""
    return _stage_config(
        "distill",
        distill_flags(config),
        where,
        input_filename=config.data,
        output_filename=str(output),
        model=config.model,
        url=list(config.distill.urls),
        resume=not fresh,
        overwrite=fresh,
    )


def train_owned(config: PipelineConfig, data: str, draft: Path) -> dict:
    """The train command's settings the pipeline sets itself (in-process and under a launcher alike)."""
    # auto_resume: training restarts from the last checkpoint-* in the draft folder
    return {
        "model_name_or_path": config.model, "data_path": data, "output_dir": str(draft), "auto_resume": True,
        "draft_kind": config.draft_kind,
    }  # fmt: skip


def train_config(config: PipelineConfig, data: str, draft: Path, where: str = "train") -> TrainConfig:
    return _stage_config("train", config.train, where, **train_owned(config, data, draft))


def eval_config(config: PipelineConfig, draft: Path, output_dir: Path, where: str = "eval") -> EvalConfig:
    return _stage_config(
        "evaluate", config.eval, where, draft=str(draft), data=config.held_out, output_dir=str(output_dir)
    )


def distill_flags(config: PipelineConfig) -> dict:
    """The distill section, plus training's model_max_length as the in-process context: a reply that training
    would cut away is not worth generating."""
    flags = dict(config.distill.flags)
    length = config.train.get("model_max_length")
    new_tokens = flags.get("max_new_tokens") or command_default("distill", "max_new_tokens")
    if not config.distill.urls and flags.get("max_context") is None and length and length > new_tokens:
        flags["max_context"] = length
    return flags
