"""The ETA model: a rough cost of each stage from the config's sizes (for the embedded model on a 2-core CPU),
corrected by how fast the stages run so far in this run actually were. Sizes the config leaves out take the
command's own defaults, read from its config dataclass."""

from __future__ import annotations

import datetime
from pathlib import Path

from transformers import AutoConfig

from medusa_forge.defaults import cache_dir, resolve_model
from medusa_forge.drafts import get_kind
from medusa_forge.errors import UserError
from medusa_forge.generation.device import cpu_has_native_bfloat16
from medusa_forge.pipeline.configuration import PipelineConfig, command_default
from medusa_forge.train.cache_records import cache_plan

ETA_RATES = {
    "distill_tokens_per_s": 75.0,  # batched in-process greedy generation (the quickstart's distill, idle machine)
    "cache_tokens_per_s": 500.0,  # frozen base forward building the hidden-state cache, float32
    # ... in bfloat16 (--bf16) on a CPU that multiplies it natively: the quickstart's 160k tokens took 80 s
    "cache_bf16_tokens_per_s": 2000.0,
    "decode_tokens_per_s": 10.0,  # batch-1 greedy decoding
}


def estimate_seconds(config: PipelineConfig, stage: str) -> float | None:
    """Model estimate of a stage's seconds from the config's sizes; None when the sizes are unknown."""
    distill = config.distill.flags
    train = config.train
    samples = distill.get("max_samples") or train.get("max_samples")
    if stage == "distill":
        if not config.distill.enabled or not samples:
            return None
        turns = distill.get("max_turns") or 2  # unlimited turns: counted as two
        new_tokens = distill.get("max_new_tokens", command_default("distill", "max_new_tokens"))
        return samples * turns * 0.6 * new_tokens / ETA_RATES["distill_tokens_per_s"]
    if stage == "train":
        tokens = _training_tokens(config)
        if tokens is None:
            return None
        epochs = train.get("num_train_epochs", command_default("train", "num_train_epochs"))
        max_steps = train.get("max_steps", command_default("train", "max_steps"))
        if max_steps and max_steps > 0:
            batch = train.get("per_device_train_batch_size", command_default("train", "per_device_train_batch_size"))
            epochs = min(epochs, max_steps * batch / samples)
        kind = get_kind(config.draft_kind)
        passes = kind.training_passes(lambda flag: train.get(flag, command_default("train", flag)))
        training = tokens * epochs * passes / kind.training_tokens_per_s
        bf16 = train.get("bf16") and cpu_has_native_bfloat16()
        cache = tokens / ETA_RATES["cache_bf16_tokens_per_s" if bf16 else "cache_tokens_per_s"]
        return 30 + cache + training
    if stage == "evaluate":
        evalc = config.eval
        new = evalc.get("max_new_tokens", command_default("evaluate", "max_new_tokens"))
        prompts = evalc.get("max_prompts", command_default("evaluate", "max_prompts"))
        calib = evalc.get("calibration_prompts", command_default("evaluate", "calibration_prompts"))
        return 40 + (prompts * 2.2 + calib) * new / ETA_RATES["decode_tokens_per_s"]
    return {"export": 10.0, "push": 20.0, "report": 5.0}.get(stage)


def _training_tokens(config: PipelineConfig) -> int | None:
    """Estimated tokens of the training data (None until the number of conversations is set)."""
    samples = config.distill.flags.get("max_samples") or config.train.get("max_samples")
    if not samples:
        return None
    # A conversation: ~150 prompt tokens and a reply of up to distill's max_new_tokens (~400 when not set).
    max_length = config.train.get("model_max_length", command_default("train", "model_max_length"))
    return samples * min(max_length, 150 + config.distill.flags.get("max_new_tokens", 400))


def stage_plan(config: PipelineConfig, stage: str) -> str | None:
    """What a stage will put on disk, said before it starts: the train stage's hidden-state cache plan (as `train`
    prints it, from the estimated token count), when the cache is on and the sizes and the model's config are
    known."""
    if stage != "train" or not config.train.get("medusa_hidden_cache", True):
        return None
    tokens = _training_tokens(config)
    if tokens is None:
        return None
    try:
        model_config = AutoConfig.from_pretrained(resolve_model(config.model))
    except (OSError, ValueError, UserError):  # a Hub id offline: the train stage itself will say
        return None
    root = Path(config.train.get("medusa_hidden_cache_dir") or cache_dir() / "hidden")
    precision = config.train.get("medusa_hidden_cache_precision", "float16")
    return cache_plan(model_config, config.draft_kind, tokens, root, precision)


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def eta_text(config: PipelineConfig, stages: list[str], speed: list[tuple[float, float]]) -> str:
    """The time left for `stages` (this one and the later ones); speed: (estimated, actual) seconds of the stages
    run so far, which scale the estimates to this machine."""
    factor = sum(a for _, a in speed) / sum(e for e, _ in speed) if speed else 1.0
    remaining = []
    for name in stages:
        if name == "push" and not config.push.repo:
            continue
        estimate = estimate_seconds(config, name)
        remaining.append(None if estimate is None else estimate * factor)
    if None in remaining:
        return "ETA unknown until the sizes are known (set distill.max_samples)"
    left = sum(remaining)
    finish = (datetime.datetime.now() + datetime.timedelta(seconds=left)).strftime("%H:%M")
    return f"ETA ~{format_seconds(left)} for the remaining stages (done around {finish})"
