"""`medusa-forge pipeline` and `medusa-forge quickstart`: distil -> train -> evaluate (choose the tree) -> export
-> push (only when asked) -> report, every stage's inputs and outputs in one work folder.

Each stage is one function that calls the existing command (distill, train, eval, export, push) as a library.
A stage is skipped when its fingerprint (a hash of its config section and of the content of its input files)
matches the last finished run and its recorded outputs still hash to what was written. A stage that was started
and not finished, or whose only change is a larger budget (more conversations, steps or epochs), is resumed
natively (distill skips conversations already written, train restarts from its last checkpoint-*); any other
change starts that stage over. State: WORKDIR/pipeline-state.json; every stage event: WORKDIR/pipeline-log.jsonl.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import logging
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import yaml

from medusa_forge.errors import UserError
from medusa_forge.results import EVAL_REPORT_FILE, TRAINING_METRICS_FILE, EvalReport

logger = logging.getLogger("medusa_forge.pipeline")

# ---------------------------------------------------------------------------------------------------------------
# The quickstart's sizes, all in one place. Chosen by measurement on a 2-core CPU (BENCHMARKS.md, "Quickstart"):
# change them here. Training flags not named here take the train command's own defaults.
QUICKSTART: dict = {
    "model": "smollm2",
    "data": "sharegpt",
    # No generation: on a CPU, ShareGPT's own text with soft labels trains better heads per minute than
    # self-distilled replies (BENCHMARKS.md, "Quickstart"). With a GPU server, distil (pipeline.example.yaml).
    "distill": {"enabled": False},
    "train": {
        "max_samples": 500,
        "num_train_epochs": 3,
        "learning_rate": 3e-3,
        "medusa_soft_labels": True,
        "per_device_train_batch_size": 4,
        "model_max_length": 384,
        "logging_steps": 10,
        "save_steps": 100,
        "disable_tqdm": False,
    },
    "eval": {
        "max_prompts": 5,
        "max_new_tokens": 96,
        "calibration_prompts": 3,
        "max_conversations": 10,
        "max_length": 512,
        "tree_sizes": "4,8,16,32",
    },
    "export": {"formats": ["tgi", "vllm"]},
}
QUICKSTART_WORKDIR = "runs/quickstart"
# ---------------------------------------------------------------------------------------------------------------

STAGES = ("distill", "train", "evaluate", "export", "push", "report")
STATE_FILE = "pipeline-state.json"
LOG_FILE = "pipeline-log.jsonl"
CONFIG_COPY = "pipeline.yaml"
# Keys whose growth extends the work already done instead of invalidating it (the stage resumes).
EXTENDABLE = {
    "distill": ("max_samples",),
    "train": ("max_steps", "num_train_epochs", "max_samples"),
}
# Keys that do not change a stage's result (progress display, logging), left out of its fingerprint.
COSMETIC = {
    "distill": ("no_progress", "concurrency", "timeout", "max_retries", "retry_base"),
    "train": ("logging_steps", "disable_tqdm", "report_to", "save_steps", "save_total_limit", "save_strategy"),
    "evaluate": (),
}
# Set by the pipeline itself; not allowed in the config sections.
OWNED = {
    "distill": ("input_filename", "output_filename", "model", "url", "resume", "overwrite"),
    "train": ("model_name_or_path", "data_path", "output_dir", "resume_from_checkpoint", "auto_resume"),
    "evaluate": ("heads", "model", "data", "output_dir", "no_save_tree"),
}


@dataclass
class DistillSection:
    """Self-distillation (`medusa-forge distill`)."""

    enabled: bool = True  # false: train on `data` as it is
    urls: list[str] = field(default_factory=list)  # OpenAI-compatible servers; empty: the model runs in-process
    flags: dict = field(default_factory=dict)  # any other `medusa-forge distill` flag, dashes as underscores


@dataclass
class ExportSection:
    formats: list[str] = field(default_factory=lambda: ["tgi", "vllm"])  # tgi, vllm, tensorrt-llm
    base_model_id: str | None = None  # Hub id written into the exported configs instead of a local base path


@dataclass
class PushSection:
    repo: str | None = None  # USER/NAME: push the heads folder there (nothing is pushed while this is empty)
    private: bool = False
    revision: str | None = None
    dry_run: bool = False  # list what would be uploaded, send nothing
    base_model_id: str | None = None


@dataclass
class PipelineConfig:
    """The whole pipeline; pipeline.example.yaml documents every key."""

    model: str = "smollm2"  # base model: local folder, Hub id, or the offline alias smollm2
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


# --- config: YAML + overrides -> validated PipelineConfig ---------------------------------------------------------


def _check_keys(where: str, given: dict, valid: list[str]) -> None:
    unknown = sorted(set(given) - set(valid))
    if unknown:
        import difflib

        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, valid, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise UserError(f"{where}: unknown keys {', '.join(hints)}; valid keys: {', '.join(sorted(valid))}")


def _command_config(name: str) -> type:
    """The config dataclass of the command a section configures (imported when first needed: torch comes with it)."""
    if name == "distill":
        from medusa_forge.distill.cli import DistillConfig

        return DistillConfig
    if name == "train":
        from medusa_forge.train.args import TrainConfig

        return TrainConfig
    from medusa_forge.evaluate.cli import EvalConfig

    return EvalConfig


def _section_keys(name: str) -> list[str]:
    from medusa_forge.flags import config_keys

    return config_keys(_command_config(name), OWNED[name])


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

    distill_raw = dict(raw["distill"])
    enabled = distill_raw.pop("enabled", True)
    urls = distill_raw.pop("urls", []) or []
    urls = [urls] if isinstance(urls, str) else list(urls)
    _check_keys(f"{source}: distill", distill_raw, ["enabled", "urls", *_section_keys("distill")])
    _check_keys(f"{source}: train", raw["train"], _section_keys("train"))
    _check_keys(f"{source}: eval", raw["eval"], _section_keys("evaluate"))
    _check_keys(f"{source}: export", raw["export"], [f.name for f in fields(ExportSection)])
    _check_keys(f"{source}: push", raw["push"], [f.name for f in fields(PushSection)])
    config = PipelineConfig(
        model=raw.get("model") or "smollm2",
        data=raw.get("data") or "sharegpt",
        eval_data=raw.get("eval_data"),
        train_launcher=raw.get("train_launcher"),
        distill=DistillSection(enabled=bool(enabled), urls=urls, flags=distill_raw),
        train=raw["train"],
        eval=raw["eval"],
        export=ExportSection(**raw["export"]),
        push=PushSection(**raw["push"]),
    )
    _validate(config, source)
    return config


def _validate(config: PipelineConfig, source: str) -> None:
    """Everything that can be checked before hours of work: flags parse, formats exist, eval data is named."""
    from medusa_forge.formats.layouts import FORMATS

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
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise UserError(f"{source}: export.formats {bad}: choose from {', '.join(FORMATS)}")


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
            loaded = yaml.safe_load(file.read_text()) or {}
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
        "data": config.data,
        "eval_data": config.eval_data,
        "train_launcher": config.train_launcher,
        "distill": distill,
        "train": config.train,
        "eval": config.eval,
        "export": {"formats": config.export.formats, "base_model_id": config.export.base_model_id},
        "push": {f.name: getattr(config.push, f.name) for f in fields(PushSection)},
    }


# --- fingerprints ---------------------------------------------------------------------------------------------


_DIGESTS: dict[tuple, str] = {}


def file_digest(path: Path) -> str:
    """sha256 of a file's content (memoised per process by path, size and mtime: one read per run)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def source_identity(ref: str) -> dict:
    """What a data or model reference stands for: file content hashes where it is local, else the name itself.

    A model folder: content hashes of its small files (config, tokenizer) and the size of each weight file;
    weights are not re-read (many GB), so replacing weights with same-sized ones goes unnoticed."""
    from medusa_forge.data.conversations import DATA_ALIASES
    from medusa_forge.defaults import MODEL_ALIAS, sharegpt_path, smollm2_gguf_path

    if ref in DATA_ALIASES:
        return {"alias": ref, "file": file_digest(sharegpt_path())}
    if ref == MODEL_ALIAS:
        return {"alias": ref, "gguf_bytes": smollm2_gguf_path().stat().st_size}
    path = Path(ref)
    if path.is_file():
        return {"file": file_digest(path)}
    if path.is_dir():
        out = {}
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            name = str(item.relative_to(path))
            big = item.stat().st_size > 50_000_000
            out[name] = f"{item.stat().st_size} bytes" if big else file_digest(item)
        return {"folder": out}
    return {"name": ref}


def digest_of(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def outputs_digest(paths: list[Path], root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): file_digest(p) for p in paths}


def outputs_verify(recorded: dict[str, str], root: Path) -> str | None:
    """None when every recorded output exists with the recorded content, else what is wrong."""
    if not recorded:
        return "no outputs recorded"
    for name, digest in recorded.items():
        path = root / name
        if not path.is_file():
            return f"{name} is missing"
        if file_digest(path) != digest:
            return f"{name} changed since it was written"
    return None


# --- the run: context, state, stage loop ------------------------------------------------------------------------


@dataclass
class Plan:
    """What a stage needs before it runs: its fingerprint parts."""

    config: dict  # the stage's settings (fingerprinted)
    inputs: dict  # input identities (fingerprinted)
    extend: dict = field(default_factory=dict)  # budget keys that may grow and still resume
    cosmetic: dict = field(default_factory=dict)  # settings that do not change the result

    @property
    def fingerprint(self) -> str:
        return digest_of({"config": self.config, "extend": self.extend, "inputs": self.inputs})

    @property
    def resume_key(self) -> str:
        return digest_of({"config": self.config, "inputs": self.inputs})


@dataclass
class Context:
    config: PipelineConfig
    workdir: Path
    resume_command: str
    state: dict = field(default_factory=dict)
    fresh: bool = False  # set per stage: start over instead of resuming
    details: dict = field(default_factory=dict)  # per-stage facts for the report (counts, commands)

    @property
    def distilled(self) -> Path:
        return self.workdir / "distill" / "conversations.jsonl"

    @property
    def train_data(self) -> str:
        return str(self.distilled) if self.config.distill.enabled else self.config.data

    @property
    def heads(self) -> Path:
        return self.workdir / "heads"

    @property
    def eval_dir(self) -> Path:
        return self.heads / "eval"

    def export_dir(self, fmt: str) -> Path:
        return self.workdir / "export" / fmt

    def log(self, stage: str, event: str, **details) -> None:
        entry = {"time": _now(), "stage": stage, "event": event, **details}
        with (self.workdir / LOG_FILE).open("a") as handle:
            handle.write(json.dumps(entry) + "\n")

    def save_state(self) -> None:
        path = self.workdir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2) + "\n")
        tmp.replace(path)


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


class StageFailed(Exception):
    def __init__(self, stage: str, reason: str):
        super().__init__(reason)
        self.stage = stage
        self.reason = reason


def _exit_ok(stage: str, code: int, what: str) -> None:
    if code != 0:
        raise StageFailed(stage, f"`medusa-forge {what}` exited with status {code} (its message is above)")


# --- stages: plan (fingerprint inputs) + run (returns output files) -------------------------------------------


def _split(section: dict, stage: str) -> tuple[dict, dict, dict]:
    extend = {k: v for k, v in section.items() if k in EXTENDABLE.get(stage, ())}
    cosmetic = {k: v for k, v in section.items() if k in COSMETIC.get(stage, ())}
    rest = {k: v for k, v in section.items() if k not in extend and k not in cosmetic}
    return rest, extend, cosmetic


def _stage_config(name: str, section: dict, where: str, **owned):
    """The command config a stage runs with: its section's values plus the ones the pipeline sets."""
    from medusa_forge.flags import config_from_values

    try:
        return config_from_values(_command_config(name), section, **owned)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None


def distill_config(config: PipelineConfig, output: Path, fresh: bool, where: str = "distill"):
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


def train_config(config: PipelineConfig, data: str, heads: Path, where: str = "train"):
    # auto_resume: training restarts from the last checkpoint-* in the heads folder
    return _stage_config(
        "train", config.train, where, model_name_or_path=config.model, data_path=data, output_dir=str(heads),
        auto_resume=True,
    )  # fmt: skip


def eval_config(config: PipelineConfig, heads: Path, output_dir: Path, where: str = "eval"):
    return _stage_config(
        "evaluate", config.eval, where, heads=str(heads), data=config.held_out, output_dir=str(output_dir)
    )


def distill_flags(config: PipelineConfig) -> dict:
    """The distill section, plus training's model_max_length as the in-process context: a reply that training
    would cut away is not worth generating."""
    flags = dict(config.distill.flags)
    length = config.train.get("model_max_length")
    new_tokens = flags.get("max_new_tokens") or _command_config("distill").max_new_tokens
    if not config.distill.urls and flags.get("max_context") is None and length and length > new_tokens:
        flags["max_context"] = length
    return flags


def plan_distill(ctx: Context) -> Plan | None:
    if not ctx.config.distill.enabled:
        return None
    rest, extend, cosmetic = _split(distill_flags(ctx.config), "distill")
    inputs = {"data": source_identity(ctx.config.data), "model": source_identity(ctx.config.model)}
    return Plan({**rest, "urls": ctx.config.distill.urls}, inputs, extend, cosmetic)


def run_distill(ctx: Context) -> list[Path]:
    from medusa_forge.distill.cli import distill

    ctx.distilled.parent.mkdir(parents=True, exist_ok=True)
    summary = distill(distill_config(ctx.config, ctx.distilled, ctx.fresh))
    for line in summary.lines():
        print(line, file=sys.stderr)
    if summary.fatal:
        raise StageFailed("distill", summary.stopped_early)
    if summary.failed or summary.not_attempted:
        raise StageFailed("distill", "some conversations failed or were not attempted (listed above); run the same "
                          "command again to retry only those")  # fmt: skip
    records = sum(1 for line in ctx.distilled.open() if line.strip())
    if records == 0:
        raise StageFailed("distill", f"{ctx.distilled} holds no conversation: check 'data' and distill.max_samples")
    ctx.details["distill"] = {"conversations": records}
    return [ctx.distilled]


def plan_train(ctx: Context) -> Plan:
    rest, extend, cosmetic = _split(ctx.config.train, "train")
    inputs = {"data": source_identity(ctx.train_data), "model": source_identity(ctx.config.model)}
    return Plan(rest, inputs, extend, cosmetic)


def launcher_argv(ctx: Context) -> list[str]:
    """The train command's flags for the train stage, for a launcher's own processes (`-m medusa_forge.train`).
    Every flag of the train command takes a value, so each key becomes `--key VALUE...`."""
    owned = {"model_name_or_path": ctx.config.model, "data_path": ctx.train_data, "output_dir": str(ctx.heads)}
    argv: list[str] = []
    for key, value in {**ctx.config.train, **owned, "auto_resume": True}.items():
        if value is not None:
            argv += [f"--{key}", *(str(v) for v in (value if isinstance(value, list) else [value]))]
    return argv


def run_train(ctx: Context) -> list[Path]:
    from medusa_forge.train.run import train

    if ctx.fresh and ctx.heads.exists():
        shutil.rmtree(ctx.heads)  # another configuration's checkpoints must not be resumed
    checkpoints = sorted(ctx.heads.glob("checkpoint-*")) if ctx.heads.is_dir() else []
    if checkpoints:
        print(f"pipeline: train resumes from {checkpoints[-1].name}", file=sys.stderr)
        ctx.details["train"] = {"resumed_from": checkpoints[-1].name}
    if ctx.config.train_launcher:  # e.g. torchrun over several GPUs: training in its own processes
        command = [*shlex.split(ctx.config.train_launcher), "-m", "medusa_forge.train", *launcher_argv(ctx)]
        print(f"pipeline: {shlex.join(command)}", file=sys.stderr)
        _exit_ok("train", subprocess.run(command).returncode, "train (under train_launcher)")
        out = ctx.heads
    else:
        out = train(train_config(ctx.config, ctx.train_data, ctx.heads))
    return [out / "config.json", out / "medusa_lm_head.safetensors", out / TRAINING_METRICS_FILE]


def _heads_inputs(ctx: Context) -> dict:
    names = ("config.json", "medusa_lm_head.safetensors")
    return {name: file_digest(ctx.heads / name) for name in names if (ctx.heads / name).is_file()}


def plan_evaluate(ctx: Context) -> Plan:
    inputs = {"heads": _heads_inputs(ctx), "data": source_identity(ctx.config.held_out)}
    return Plan(dict(ctx.config.eval), inputs)


def run_evaluate(ctx: Context) -> list[Path]:
    from medusa_forge.evaluate.cli import evaluate
    from medusa_forge.formats.tree_file import TREE_FILE

    config = eval_config(ctx.config, ctx.heads, ctx.eval_dir)
    (ctx.heads / TREE_FILE).unlink(missing_ok=True)  # a tree from an earlier evaluation must not survive
    evaluate(config)
    outputs = [ctx.eval_dir / EVAL_REPORT_FILE]
    if (ctx.heads / TREE_FILE).is_file():
        outputs.append(ctx.heads / TREE_FILE)
    return outputs


def plan_export(ctx: Context) -> Plan:
    from medusa_forge.formats.tree_file import TREE_FILE

    heads = _heads_inputs(ctx)
    if (ctx.heads / TREE_FILE).is_file():
        heads[TREE_FILE] = file_digest(ctx.heads / TREE_FILE)
    settings = {"formats": ctx.config.export.formats, "base_model_id": ctx.config.export.base_model_id}
    return Plan(settings, {"heads": heads})


def run_export(ctx: Context) -> list[Path]:
    from medusa_forge.export import export_heads

    outputs: list[Path] = []
    commands: dict[str, list[str]] = {}
    for fmt in ctx.config.export.formats:
        folder = ctx.export_dir(fmt)
        if folder.exists():
            shutil.rmtree(folder)  # ours: an export refuses a folder holding other weights
        result = export_heads(ctx.heads, fmt, folder, base_model_id=ctx.config.export.base_model_id)
        for note in result.notes:
            print(f"pipeline: export {fmt}: {note}", file=sys.stderr)
        commands[fmt] = result.serve_commands
        outputs += sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "README.md")
    path = ctx.workdir / "export" / "serve_commands.json"
    path.write_text(json.dumps(commands, indent=2) + "\n")
    return [path, *outputs]


def plan_push(ctx: Context) -> Plan | None:
    push = ctx.config.push
    if not push.repo:
        return None
    settings = {f.name: getattr(push, f.name) for f in fields(PushSection)}
    return Plan(settings, {"heads": _heads_inputs(ctx), "eval": file_digest(ctx.eval_dir / EVAL_REPORT_FILE)})


def run_push(ctx: Context) -> list[Path]:
    from medusa_forge.hub import push

    config = ctx.config.push
    result = push(ctx.heads, config.repo, config.private, config.revision, config.dry_run, config.base_model_id)
    for note in result.notes:
        print(f"pipeline: push: {note}", file=sys.stderr)
    record = ctx.workdir / "push.json"
    record.write_text(
        json.dumps({"repo": config.repo, "dry_run": config.dry_run, "files": result.files, "url": result.url}) + "\n"
    )
    return [record]


def plan_report(ctx: Context) -> Plan:
    inputs = {}
    for path in _report_inputs(ctx):
        inputs[str(path.relative_to(ctx.workdir))] = file_digest(path)
    times = {name: record.get("seconds") for name, record in ctx.state.get("stages", {}).items() if name != "report"}
    return Plan({"stage_seconds": times}, inputs)


def _report_inputs(ctx: Context) -> list[Path]:
    candidates = [
        ctx.heads / TRAINING_METRICS_FILE,
        ctx.heads / "training_curves.png",
        ctx.eval_dir / EVAL_REPORT_FILE,
        ctx.workdir / "export" / "serve_commands.json",
        ctx.workdir / "push.json",
    ]
    return [p for p in candidates if p.is_file()]


def run_report(ctx: Context) -> list[Path]:
    from medusa_forge.pipeline.report import write_pipeline_report

    return write_pipeline_report(ctx)


@dataclass
class Stage:
    name: str
    title: str
    plan: Callable[[Context], Plan | None]
    run: Callable[[Context], list[Path]]


PIPELINE = [
    Stage("distill", "self-distil: replay conversations against the model", plan_distill, run_distill),
    Stage("train", "train the heads on the frozen model", plan_train, run_train),
    Stage("evaluate", "choose the tree, measure acceptance and speed", plan_evaluate, run_evaluate),
    Stage("export", "write the TGI / vLLM folders", plan_export, run_export),
    Stage("push", "upload to the Hub", plan_push, run_push),
    Stage("report", "write report.md", plan_report, run_report),
]


# --- ETA: a rough cost model for the embedded model on a 2-core CPU, corrected by what this run measured ------

ETA_RATES = {
    "distill_tokens_per_s": 75.0,  # batched in-process greedy generation (the quickstart's distill, idle machine)
    "cache_tokens_per_s": 500.0,  # frozen base forward building the hidden-state cache
    "heads_tokens_per_s": 1300.0,  # head training from the cache, per token per epoch (draft vocabulary)
    "decode_tokens_per_s": 10.0,  # batch-1 greedy decoding
}


def estimate_seconds(ctx: Context, stage: str) -> float | None:
    """Model estimate of a stage's seconds from the config's sizes; None when the sizes are unknown."""
    config = ctx.config
    distill = config.distill.flags
    samples = distill.get("max_samples") or config.train.get("max_samples")
    if stage == "distill":
        if not config.distill.enabled or not samples:
            return None
        turns = distill.get("max_turns") or 2
        return samples * turns * 0.6 * distill.get("max_new_tokens", 1024) / ETA_RATES["distill_tokens_per_s"]
    if stage == "train":
        if not samples:
            return None
        per_conversation = min(config.train.get("model_max_length", 2048), 150 + distill.get("max_new_tokens", 400))
        epochs = config.train.get("num_train_epochs", 3)
        if config.train.get("max_steps", -1) and config.train.get("max_steps", -1) > 0:
            epochs = min(
                epochs, config.train["max_steps"] * config.train.get("per_device_train_batch_size", 8) / samples
            )
        tokens = samples * per_conversation
        return 30 + tokens / ETA_RATES["cache_tokens_per_s"] + tokens * epochs / ETA_RATES["heads_tokens_per_s"]
    if stage == "evaluate":
        evalc = config.eval
        new = evalc.get("max_new_tokens", 128)
        prompts = evalc.get("max_prompts", 10)
        calib = evalc.get("calibration_prompts", 4)
        return 40 + (prompts * 2.2 + calib) * new / ETA_RATES["decode_tokens_per_s"]
    return {"export": 10.0, "push": 20.0, "report": 5.0}.get(stage)


# --- the driver ---------------------------------------------------------------------------------------------------


def _fmt_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def run_pipeline(
    config: PipelineConfig, workdir: str | Path, resume_command: str, force_from: str | None = None
) -> Context:
    """Run every stage in order (skipping finished ones); returns the context with the state and details."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    state_path = workdir / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    state.setdefault("stages", {})
    ctx = Context(config, workdir, resume_command, state)
    (workdir / CONFIG_COPY).write_text(
        "# the effective configuration of the last run (file + --set overrides)\n"
        + yaml.safe_dump(config_to_dict(config), sort_keys=False)
    )
    if force_from is not None and force_from not in STAGES:
        raise UserError(f"--from {force_from}: choose one of {', '.join(STAGES)}")
    forced = set(STAGES[STAGES.index(force_from) :]) if force_from else set()
    started = time.perf_counter()
    speed = []  # (estimated, actual) of stages run now: corrects later estimates for this machine
    total = len(PIPELINE)
    ctx.log("pipeline", "start", workdir=str(workdir))
    for index, stage in enumerate(PIPELINE, 1):
        header = f"[{index}/{total}] {stage.name}"
        try:
            plan = stage.plan(ctx)
        except UserError as err:
            raise StageFailed(stage.name, str(err)) from None
        record = state["stages"].get(stage.name)
        if plan is None:
            state["stages"].pop(stage.name, None)
            ctx.log(stage.name, "not-configured")
            print(f"pipeline {header}: not configured, nothing to do", file=sys.stderr)
            continue
        problem = None
        if record and record.get("status") == "done" and record.get("fingerprint") == plan.fingerprint:
            problem = outputs_verify(record.get("outputs", {}), workdir)
            if problem is None and stage.name not in forced:
                ctx.log(stage.name, "skip", fingerprint=plan.fingerprint)
                print(f"pipeline {header}: up to date, skipped ({_fmt_seconds(record['seconds'])} "
                      "when it ran)", file=sys.stderr)  # fmt: skip
                continue
        resumable = (
            record is not None
            and record.get("resume_key") == plan.resume_key
            and _grows(record.get("extend", {}), plan.extend)
            and problem is None
            and stage.name not in forced
        )
        ctx.fresh = not resumable
        previous_seconds = record.get("seconds", 0.0) if resumable and record else 0.0
        event = "resume" if resumable else "start"
        reason = problem or ("forced by --from" if stage.name in forced else None)
        ctx.log(stage.name, event, fingerprint=plan.fingerprint, **({"reason": reason} if reason else {}))
        state["stages"][stage.name] = {
            "status": "running",
            "fingerprint": plan.fingerprint,
            "resume_key": plan.resume_key,
            "extend": plan.extend,
            "seconds": previous_seconds,
            "started": _now(),
        }
        ctx.save_state()
        _print_eta(ctx, index, header, stage, event, started, speed)
        stage_start = time.perf_counter()
        try:
            outputs = stage.run(ctx)
        except KeyboardInterrupt:
            state["stages"][stage.name]["seconds"] = previous_seconds + time.perf_counter() - stage_start
            ctx.save_state()
            ctx.log(stage.name, "interrupted")
            raise
        except (StageFailed, UserError, Exception) as err:
            state["stages"][stage.name].update(
                status="failed", seconds=previous_seconds + time.perf_counter() - stage_start
            )
            ctx.save_state()
            reason = err.reason if isinstance(err, StageFailed) else str(err) or type(err).__name__
            ctx.log(stage.name, "fail", reason=reason)
            if not isinstance(err, StageFailed | UserError):
                traceback.print_exc()
            raise StageFailed(stage.name, reason) from err
        seconds = time.perf_counter() - stage_start
        estimate = estimate_seconds(ctx, stage.name)
        if estimate:
            speed.append((estimate, seconds))
        # A later stage may read our outputs' details; refresh the memo of digests before recording them.
        state["stages"][stage.name].update(
            status="done",
            seconds=previous_seconds + seconds,
            finished=_now(),
            outputs=outputs_digest(outputs, workdir),
            details=ctx.details.get(stage.name, {}),
        )
        # The report's own inputs include the other stages' times: plan report after they are final.
        ctx.save_state()
        ctx.log(stage.name, "done", seconds=round(seconds, 2))
        print(f"pipeline {header}: done in {_fmt_seconds(seconds)}", file=sys.stderr)
    ctx.log("pipeline", "done", seconds=round(time.perf_counter() - started, 2))
    return ctx


def _grows(old: dict, new: dict) -> bool:
    """Budget keys may only stay or grow for a resume (None = the command's default, treated as unlimited)."""
    for key in set(old) | set(new):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if a is None or b is None:  # unlimited on one side only: cannot compare budgets
            return b is None and key != "max_steps"
        try:
            if float(b) < float(a):
                return False
        except (TypeError, ValueError):
            return False
    return True


def _print_eta(ctx: Context, index: int, header: str, stage: Stage, event: str, started, speed) -> None:
    factor = sum(a for _, a in speed) / sum(e for e, _ in speed) if speed else 1.0
    remaining = []
    for later in PIPELINE[index - 1 :]:
        if later.name == "push" and not ctx.config.push.repo:
            continue
        estimate = estimate_seconds(ctx, later.name)
        remaining.append(None if estimate is None else estimate * factor)
    elapsed = time.perf_counter() - started
    if None in remaining:
        eta = "ETA unknown until the sizes are known (set distill.max_samples)"
    else:
        left = sum(remaining)
        finish = (datetime.datetime.now() + datetime.timedelta(seconds=left)).strftime("%H:%M")
        eta = f"ETA ~{_fmt_seconds(left)} for the remaining stages (done around {finish})"
    verb = "resuming" if event == "resume" else "running"
    print(f"\npipeline {header}: {verb}: {stage.title}; elapsed {_fmt_seconds(elapsed)}; {eta}", file=sys.stderr)


# --- CLI ----------------------------------------------------------------------------------------------------------


@dataclass
class QuickstartConfig:
    """The embedded default end to end (SmolLM2 + ShareGPT), sized for ~15 minutes on a 2-core CPU: re-runs skip
    finished stages and resume an interrupted one."""

    COMMAND: ClassVar[str] = "quickstart"

    workdir: str = field(
        default=QUICKSTART_WORKDIR, metadata={"help": "Folder for every stage's inputs, outputs, state and the report."}
    )
    overrides: list[str] = field(
        default_factory=list,
        metadata={
            "flag": "--set",
            "metavar": "KEY=VALUE",
            "help": "Override a config key (value read as YAML), e.g. --set train.num_train_epochs=2 "
            "--set eval.max_prompts=3",
        },
    )
    force_from: str | None = field(
        default=None,
        metadata={"flag": "--from", "choices": STAGES, "help": "Run this stage and all later ones again."},
    )

    def __post_init__(self) -> None:
        if self.force_from is not None and self.force_from not in STAGES:
            raise UserError(f"--from {self.force_from}: choose one of {', '.join(STAGES)}")

    @property
    def command_line(self) -> str:
        """The command that runs this again (and resumes where it stopped)."""
        argv = ["medusa-forge", self.COMMAND]
        if getattr(self, "config", None):
            argv += ["--config", self.config]
        argv += ["--workdir", self.workdir]
        for override in self.overrides:
            argv += ["--set", override]
        if self.force_from:
            argv += ["--from", self.force_from]
        return shlex.join(argv)


@dataclass
class PipelineRunConfig(QuickstartConfig):
    """Distil -> train -> evaluate (choose the tree) -> export -> push (if asked) -> report, re-runs skip finished
    stages and resume an interrupted one."""

    COMMAND: ClassVar[str] = "pipeline"

    workdir: str = field(
        default="runs/pipeline", metadata={"help": "Folder for every stage's inputs, outputs, state and the report."}
    )
    config: str | None = field(
        default=None, metadata={"help": "YAML config (see pipeline.example.yaml); default: all defaults."}
    )


def _summary(ctx: Context) -> list[str]:
    lines = [f"report: {ctx.workdir / 'report.md'}"]
    eval_json = ctx.eval_dir / EVAL_REPORT_FILE
    if eval_json.is_file():
        report = EvalReport.load(eval_json)
        speed = report.speed
        lines.insert(
            0,
            f"mean accepted tokens per step {report.acceptance.mean_accept_length:.2f}; Medusa "
            f"{speed.tokens_per_second['medusa']:.1f} tokens/s vs greedy {speed.tokens_per_second['greedy']:.1f}"
            f" ({speed.speedup['medusa']:.2f}x); outputs equal to greedy: {speed.outputs_equal}",
        )
    total = sum(r.get("seconds", 0.0) for r in ctx.state["stages"].values())
    lines.append(f"time in stages (all runs): {_fmt_seconds(total)}")
    commands = ctx.workdir / "export" / "serve_commands.json"
    if commands.is_file():
        for fmt, cmds in json.loads(commands.read_text()).items():
            lines.append(f"serve with {fmt}: {cmds[0]}")
    return lines


def _run(options: QuickstartConfig, path: str | None, base: dict | None) -> int:
    """Load the config, run the stages, print the summary; a failed stage exits 1, Ctrl-C 130 (both say how to
    resume)."""
    resume = options.command_line
    try:
        ctx = run_pipeline(load_config(path, options.overrides, base), options.workdir, resume, options.force_from)
    except StageFailed as err:
        print(f"error: stage {err.stage} failed: {err.reason}", file=sys.stderr)
        print(f"finished stages are kept; after fixing it, resume with:\n  {resume}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished stages are kept and this one resumes; continue with:\n  {resume}",
              file=sys.stderr)  # fmt: skip
        return 130
    print("\n".join(_summary(ctx)))
    return 0


def run_pipeline_command(config: PipelineRunConfig) -> int:
    return _run(config, config.config, None)


def run_quickstart(config: QuickstartConfig) -> int:
    return _run(config, None, QUICKSTART)
