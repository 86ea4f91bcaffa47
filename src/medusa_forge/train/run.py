"""The training command: from a TrainConfig, build data + the draft kind's training module, train with DraftTrainer,
write the draft folder (Medusa heads, or another kind of draft with --draft_kind)."""

from __future__ import annotations

import gc
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from medusa_forge.data.conversations import load_conversations
from medusa_forge.data.tokenize import ensure_chat_template
from medusa_forge.defaults import cache_dir, resolve_model
from medusa_forge.drafts import DraftKind, get_kind
from medusa_forge.drafts.card import hub_base_id
from medusa_forge.errors import UserError
from medusa_forge.model_card import write_model_card
from medusa_forge.modeling import load_base_model, load_tokenizer
from medusa_forge.outputs import OutputLock, check_writable_folder, removed_if_failed_empty
from medusa_forge.train.args import TrainConfig
from medusa_forge.train.cache_group import CacheGroup, NodeShareSampler, balance, cache_group, everywhere
from medusa_forge.train.dataset import ConversationDataset, PadCollator
from medusa_forge.train.hidden_cache import (
    CachedHiddenDataset,
    CacheTooLarge,
    RunOutputs,
    build_hidden_cache,
    check_output_space,
    complete_cache,
    run_outputs,
)
from medusa_forge.train.report import plot_history, training_metrics
from medusa_forge.train.target_files import TargetFiles
from medusa_forge.train.trainer import DraftTrainer

logger = logging.getLogger("medusa_forge")


def _base_dtype(config: TrainConfig) -> torch.dtype:
    if config.bf16:
        return torch.bfloat16
    if config.fp16:
        return torch.float16
    return torch.float32


def _resume_checkpoint(config: TrainConfig) -> str | None:
    if config.resume_from_checkpoint:
        if not Path(config.resume_from_checkpoint).is_dir():
            raise UserError(f"--resume_from_checkpoint {config.resume_from_checkpoint}: no such folder")
        return config.resume_from_checkpoint
    if config.auto_resume and not config.overwrite_output_dir and Path(config.output_dir).is_dir():
        last = last_complete_checkpoint(Path(config.output_dir))
        if last:
            logger.warning("resuming from %s (pass --auto_resume False to start over)", last)
        return last
    return None


def last_complete_checkpoint(output_dir: Path) -> str | None:
    """The newest checkpoint-N whose save finished (trainer_state.json is written last): a run killed while
    saving leaves a partial folder, which is skipped rather than crashing the resume."""
    folders = [f for f in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if f.name.rsplit("-", 1)[-1].isdigit()]
    folders.sort(key=lambda f: int(f.name.rsplit("-", 1)[-1]), reverse=True)
    for folder in folders:
        if (folder / "trainer_state.json").is_file():
            return str(folder)
        logger.warning("skipping %s: saving it did not finish", folder)
    return None


def remove_checkpoints(output_dir: Path, why: str) -> None:
    """Remove the `checkpoint-N` folders in `output_dir` (~12 bytes per draft weight each): a completed run's are
    only for resuming, and --overwrite_output_dir starts over; `why` ends the log line."""
    folders = [f for f in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if f.name.rsplit("-", 1)[-1].isdigit()]
    for folder in folders:
        shutil.rmtree(folder)
    if folders:
        logger.warning("removed %d checkpoint(s) %s", len(folders), why)


def _target_files(base_path: str, dtype: torch.dtype, config: TrainConfig) -> TargetFiles:
    """The target's files (a Hub id's, fetched as from_pretrained would fetch them), fingerprinted once: by the first
    process, the others take its fingerprint (every process reading every weight file of a 70B target would cost
    minutes each)."""
    folder = base_path
    if not Path(base_path).is_dir():
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(base_path, allow_patterns=["*.json", "*.safetensors"])
        except Exception as err:  # offline, gated, no such repository: said as loading the model says it
            raise UserError(f"could not fetch model {base_path!r}: {str(err).splitlines()[0]}") from err
    target = TargetFiles(folder, dtype)
    fingerprint = [target.fingerprint if config.process_index == 0 else None]
    if config.world_size > 1:
        torch.distributed.broadcast_object_list(fingerprint, src=0)
    target.fingerprint = fingerprint[0]
    return target


@dataclass
class CachePlan:
    """Where this run's hidden-state caches live and which items each holds here."""

    target: TargetFiles
    root: Path
    group: CacheGroup
    precision: str  # how records are kept (--medusa_hidden_cache_precision)
    # With a folder per node: the training items of each node's share (what that node caches and trains on).
    shares: list[list[int]] | None

    def items(self, dataset: ConversationDataset, training: bool) -> list[dict[str, list[int]]]:
        items = dataset.all_items()
        if training and self.shares is not None:
            return [items[i] for i in self.shares[self.group.number]]
        return items  # the held-out set: whole on every node (each process evaluates its part of it)


def _plan_caches(base_path: str, dtype: torch.dtype, train_set: ConversationDataset, config: TrainConfig) -> CachePlan:
    root = Path(config.medusa_hidden_cache_dir or cache_dir() / "hidden")
    group = cache_group(root)
    shares = None
    if not group.shared:
        lengths = [len(item["input_ids"]) for item in train_set.all_items()]
        shares = balance(lengths, [len(ranks) for ranks in group.groups])
        if config.process_index == 0:
            logger.warning(
                "hidden-state cache: %s is not one folder shared by all nodes (process groups %s each see their "
                "own): each node caches and trains on its own share of the training conversations (balanced by "
                "tokens), so each conversation is trained on by one node only, and the held-out set is cached on "
                "every node. For every process to sample from all the data, point --medusa_hidden_cache_dir at a "
                "folder all nodes share",
                root,
                list(group.groups),
            )
    target = _target_files(base_path, dtype, config)
    return CachePlan(target, root, group, config.medusa_hidden_cache_precision, shares)


def _cached(base, plan: CachePlan, train_set, eval_set, config: TrainConfig, outputs: RunOutputs):
    """Swap token datasets for hidden-state datasets, every process computing its share of what is not cached yet.
    A run whose cache does not fit on the disk keeps the token dataset when its kind `trains_without_cache`: the
    records are then computed per batch (the frozen pass runs every epoch). Also returns the sampler training from
    a node's share needs (else None)."""
    out, sampler = [], None
    for dataset, training in ((train_set, True), (eval_set, False)):
        if dataset is None:
            out.append(None)
            continue
        items = plan.items(dataset, training)
        try:
            cache = build_hidden_cache(
                base,
                plan.target,
                items,
                plan.root,
                kind=config.draft_kind,
                outputs=outputs,
                group=plan.group,
                precision=plan.precision,
            )
        except CacheTooLarge as err:
            if not get_kind(config.draft_kind).trains_without_cache:
                raise
            logger.warning("%s\ncomputing the target's features per batch instead of caching them", err)
            out.append(dataset)
            continue
        out.append(CachedHiddenDataset(items, cache))
        if training and plan.shares is not None:
            sizes = [len(share) for share in plan.shares]
            sampler = NodeShareSampler(sizes, plan.group.groups, config.per_device_train_batch_size, config.seed)
    return (*out, sampler)


def train(config: TrainConfig) -> Path:
    """Train the draft (heads or EAGLE-3) as `config` says; returns the draft folder. The output folder is checked
    and locked first (one run per folder), before anything slow happens."""
    if config.process_index != 0:
        return _train(config)
    # A run that fails or is refused before writing anything leaves no empty folder (the default one is in the cwd).
    with removed_if_failed_empty(config.output_dir):
        check_writable_folder(config.output_dir, f"--output_dir {config.output_dir}")
        with OutputLock(config.output_dir, "train", "--output_dir"):
            if config.overwrite_output_dir:
                remove_checkpoints(Path(config.output_dir), "(--overwrite_output_dir: starting over)")
            return _train(config)


def _train(config: TrainConfig) -> Path:
    is_main = config.process_index == 0
    if is_main and config.world_size > 1:
        logger.warning("training on %d processes (%s)", config.world_size, config.parallel_mode.value)
    base_path, tokenizer, train_set, eval_set = _data(config)
    kind = get_kind(config.draft_kind)
    plan = _plan_caches(base_path, _base_dtype(config), train_set, config) if config.medusa_hidden_cache else None
    base, complete = _target(config, base_path, kind, plan, train_set, eval_set)
    # A draft vocabulary is chosen from the token data before the cache replaces it; the draft is built before
    # the cache so that the disk check counts its checkpoints. In config.json: aliases become the folder a
    # server can load.
    model = kind.training_module(base, config, base_path, train_set.all_items)
    draft = getattr(model, model.draft_attribute)
    outputs = run_outputs(draft, Path(config.output_dir), config.save_strategy, config.save_total_limit)
    check_output_space(outputs)
    cache_seconds = time.perf_counter()
    sampler = None
    if plan is not None:
        train_set, eval_set, sampler = _cached(base, plan, train_set, eval_set, config, outputs)
        cached = [isinstance(dataset, CachedHiddenDataset) for dataset in (train_set, eval_set) if dataset is not None]
        if not complete and all(cached):
            # Built: train on with the stand-in, and give the target's memory back.
            # Held as the training modules hold the target: an attribute, not a submodule (never trained, saved
            # or wrapped by DDP).
            object.__setattr__(model, "base", plan.target.stand_in(kind.records_need_token_ids).to(config.device))
            del base
            gc.collect()
            logger.warning("hidden-state cache built: the target is freed; training reads its embedding and lm_head")
    cache_seconds = time.perf_counter() - cache_seconds
    trainer = DraftTrainer(
        train_sampler=sampler,
        model=model,
        args=config,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=PadCollator(tokenizer.pad_token_id, config.model_max_length),
        processing_class=tokenizer,
    )
    result = trainer.train(resume_from_checkpoint=_resume_checkpoint(config))
    final = {**result.metrics, "hidden_cache_seconds": cache_seconds}
    if eval_set is not None:
        final.update(trainer.evaluate())
    trainer.save_model(config.output_dir)
    output = Path(config.output_dir)
    if is_main:
        _write_folder(output, config, kind, trainer, final, len(train_set), base_path, model.base)
    return output


def _data(config: TrainConfig) -> tuple[str, Any, ConversationDataset, ConversationDataset | None]:
    """(the base's path, its tokenizer, the training set, the held-out set or None), the data read and checked
    before any model: a bad file is found in seconds."""
    conversations = load_conversations(config.data_path, config.max_samples, config.recover_truncated_data)
    eval_path = config.eval_data_path or ("sharegpt-heldout" if config.data_path == "sharegpt" else None)
    eval_conversations = None
    if config.eval_strategy != "no":
        if eval_path is None:
            raise UserError("--eval_strategy is not 'no': pass --eval_data_path with held-out conversations")
        eval_conversations = load_conversations(eval_path, config.max_eval_samples, config.recover_truncated_data)

    base_path = resolve_model(config.model_name_or_path)  # rank-safe: converts the alias once, with a lock
    tokenizer = ensure_chat_template(load_tokenizer(base_path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.convert_ids_to_tokens(0)
    train_set = ConversationDataset(
        conversations, tokenizer, config.model_max_length, config.lazy_preprocess, config.data_path
    )
    eval_set = None
    if eval_conversations is not None:
        eval_set = ConversationDataset(
            eval_conversations, tokenizer, config.model_max_length, config.lazy_preprocess, eval_path
        )
    return base_path, tokenizer, train_set, eval_set


def _target(
    config: TrainConfig,
    base_path: str,
    kind: DraftKind,
    plan: CachePlan | None,
    train_set: ConversationDataset,
    eval_set: ConversationDataset | None,
) -> tuple[Any, bool]:
    """(the frozen target, or its stand-in when every record is cached; whether every record is). On every process
    alike (they must hold modules of one shape): a complete cache means the target's layers are never loaded."""
    complete = plan is not None and all(
        everywhere(
            complete_cache(
                plan.target, plan.items(dataset, dataset is train_set), plan.root, kind.name, plan.precision
            )
            for dataset in (train_set, eval_set)
            if dataset is not None
        )
    )
    if complete:
        logger.warning("hidden-state cache complete: reading only the target's embedding and lm_head, not its layers")
        return plan.target.stand_in(kind.records_need_token_ids).to(config.device), True
    placement = config.target_placement()
    base = load_base_model(base_path, dtype=_base_dtype(config), placement=placement)
    if placement is None:  # a dispatched target stays where its device map put it
        base = base.to(config.device)
    return base, False


def _write_folder(
    output: Path,
    config: TrainConfig,
    kind: DraftKind,
    trainer: DraftTrainer,
    final: dict,
    conversations: int,
    base_path: str,
    base: Any,
) -> None:
    """What the main process writes next to the saved draft: metrics, curves and the model card (and the completed
    run's checkpoints removed unless kept)."""
    if not config.keep_checkpoints:
        remove_checkpoints(output, "of the completed run (--keep_checkpoints True keeps them)")
    metrics = training_metrics(trainer.state.log_history, final, name=kind.metric_name)
    metrics.save(output)
    plot_history(output, metrics, label=kind.metric_label)
    facts = {
        "Training data": f"`{config.data_path}` ({conversations} conversations)",
        "Epochs / max length": f"{config.num_train_epochs:g} / {config.model_max_length}",
        **kind.training_facts(config),
    }
    card_metrics = metrics.held_out_draft_metrics(kind.metric_name)
    base_id = hub_base_id(config.model_name_or_path) or base_path
    write_model_card(output, kind.read_config(output), base_id, facts, card_metrics, **kind.card_options(base))
    logger.warning("%s written to %s", kind.label, output)


def run_train(config: TrainConfig) -> int:
    """Exit status: 0 done, 2 a user error (raised to the CLI), 130 interrupted (Ctrl-C)."""
    try:
        train(config)
    except KeyboardInterrupt:
        print("\ninterrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        # Under torchrun: leave the process group cleanly, or gloo may abort a rank at interpreter exit.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0
