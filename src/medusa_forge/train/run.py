"""The training command: from a TrainConfig, build data + model, train with MedusaTrainer, write the draft folder
(Medusa heads, or an EAGLE-3 draft with --draft_kind eagle3)."""

from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from medusa_forge.data.conversations import load_conversations
from medusa_forge.data.tokenize import IGNORE_INDEX, ensure_chat_template
from medusa_forge.defaults import cache_dir, resolve_model
from medusa_forge.eagle3 import CONFIG_NAME as EAGLE3_CONFIG_NAME
from medusa_forge.eagle3 import (
    ENGINE_MIN_TARGET_LAYERS,
    Eagle3Config,
    Eagle3Draft,
    draft_vocab_ids,
    draft_vocabulary,
)
from medusa_forge.errors import UserError
from medusa_forge.formats.files import read_json
from medusa_forge.heads import MedusaHeads
from medusa_forge.model_card import hub_base_id, write_model_card
from medusa_forge.modeling import load_base_model, load_tokenizer
from medusa_forge.outputs import OutputLock, check_writable_folder
from medusa_forge.train.args import TrainConfig
from medusa_forge.train.dataset import ConversationDataset, PadCollator
from medusa_forge.train.eagle3_model import Eagle3ForTraining, step_weights
from medusa_forge.train.hidden_cache import (
    CachedHiddenDataset,
    CacheTooLarge,
    RunOutputs,
    build_hidden_cache,
    check_output_space,
    run_outputs,
)
from medusa_forge.train.model import MedusaForTraining, head_weights
from medusa_forge.train.report import plot_history, training_metrics
from medusa_forge.train.trainer import MedusaTrainer

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


def _cached(base, train_set, eval_set, config: TrainConfig, outputs: RunOutputs):
    """Swap token datasets for hidden-state datasets; the main process of each node builds, others wait.
    An EAGLE-3 run whose cache does not fit on the disk keeps the token dataset: the draft's features are then
    computed per batch (the frozen pass runs every epoch)."""
    root = Path(config.medusa_hidden_cache_dir or cache_dir() / "hidden")
    out = []
    for dataset in (train_set, eval_set):
        if dataset is None:
            out.append(None)
            continue
        items = dataset.all_items()
        try:
            with config.main_process_first(desc="hidden-state cache"):
                cache = build_hidden_cache(base, items, root, kind=config.draft_kind, outputs=outputs)
        except CacheTooLarge as err:
            if config.draft_kind == "medusa":
                raise
            logger.warning("%s\ncomputing the target's features per batch instead of caching them", err)
            out.append(dataset)
            continue
        out.append(CachedHiddenDataset(items, cache))
    return out


def assistant_token_counts(items: list[dict[str, list[int]]], vocab_size: int) -> torch.Tensor:
    """[V] how often each token id is a labelled (assistant) token: what the draft vocabulary is chosen from."""
    labels = torch.tensor([t for item in items for t in item["labels"] if t != IGNORE_INDEX], dtype=torch.long)
    if len(labels) and int(labels.max()) >= vocab_size:
        raise UserError(f"the data holds token id {int(labels.max())}, beyond the model's vocabulary {vocab_size}")
    return torch.bincount(labels, minlength=vocab_size)


def eagle3_model(base, train_set: ConversationDataset, config: TrainConfig, base_path: str) -> Eagle3ForTraining:
    """A fresh EAGLE-3 draft for `base` (draft vocabulary from the training data's assistant tokens) + its loss."""
    layers = base.config.get_text_config().num_hidden_layers
    if layers < ENGINE_MIN_TARGET_LAYERS:
        logger.warning(
            "the target has %d layers (< %d): the draft reads layers vLLM and SGLang cannot give it, so it can be "
            "trained and used by medusa-forge's decoder but not exported to an engine",
            layers,
            ENGINE_MIN_TARGET_LAYERS,
        )
    vocab = base.config.get_text_config().vocab_size
    size = min(config.eagle3_draft_vocab_size or vocab, vocab)
    ids = None
    if size < vocab:
        d2t, _ = draft_vocabulary(assistant_token_counts(train_set.all_items(), vocab), size)
        ids = draft_vocab_ids(d2t)
    set_seed(config.seed)  # the draft's random initial weights are the same on every rank and every run
    draft = Eagle3Draft.for_target(base, ids, base_path, config.eagle3_intermediate_size).to(base.device)
    weights = step_weights(config.eagle3_ttt_steps, config.eagle3_step_decay)
    return Eagle3ForTraining(base, draft, weights, chunk_size=config.medusa_loss_chunk_size)


def medusa_model(base, config: TrainConfig, base_path: str) -> MedusaForTraining:
    heads = MedusaHeads.for_base_model(base, config.medusa_num_heads, config.medusa_num_layers, base_path)
    draft_vocab = config.medusa_draft_vocab_size or None
    if draft_vocab is not None and draft_vocab >= base.get_output_embeddings().weight.shape[0]:
        draft_vocab = None  # the whole vocabulary anyway
    heads.config.draft_vocab_size = draft_vocab
    if config.medusa_freeze_projection:
        for head in heads:
            head[-1].weight.requires_grad_(False)
    return MedusaForTraining(
        base,
        heads,
        head_weights(config.medusa_num_heads, config.medusa_decay_coefficient),
        soft_labels=config.medusa_soft_labels,
        chunk_size=config.medusa_loss_chunk_size,
        draft_vocab_size=draft_vocab,
    )


def train(config: TrainConfig) -> Path:
    """Train the draft (heads or EAGLE-3) as `config` says; returns the draft folder. The output folder is checked
    and locked first (one run per folder), before anything slow happens."""
    if config.process_index != 0:
        return _train(config)
    check_writable_folder(config.output_dir, f"--output_dir {config.output_dir}")
    with OutputLock(config.output_dir, "train", "--output_dir"):
        if config.overwrite_output_dir:
            remove_checkpoints(Path(config.output_dir), "(--overwrite_output_dir: starting over)")
        return _train(config)


def _train(config: TrainConfig) -> Path:
    is_main = config.process_index == 0
    if is_main and config.world_size > 1:
        logger.warning("training on %d processes (%s)", config.world_size, config.parallel_mode.value)
    # The data is read (and checked) before the model: a bad file is found in seconds.
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

    base = load_base_model(base_path, dtype=_base_dtype(config)).to(config.device)
    eagle3 = config.draft_kind == "eagle3"
    # The draft vocabulary is chosen from the token data before the cache replaces it; the draft is built before
    # the cache so that the disk check counts its checkpoints. In config.json: aliases become the folder a
    # server can load.
    model = eagle3_model(base, train_set, config, base_path) if eagle3 else medusa_model(base, config, base_path)
    draft = getattr(model, model.draft_attribute)
    outputs = run_outputs(draft, Path(config.output_dir), config.save_strategy, config.save_total_limit)
    check_output_space(outputs)
    cache_seconds = time.perf_counter()
    if config.medusa_hidden_cache:
        train_set, eval_set = _cached(base, train_set, eval_set, config, outputs)
    cache_seconds = time.perf_counter() - cache_seconds
    trainer = MedusaTrainer(
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
        if not config.keep_checkpoints:
            remove_checkpoints(output, "of the completed run (--keep_checkpoints True keeps them)")
        metrics = training_metrics(trainer.state.log_history, final, name=model.metric_name)
        metrics.save(output)
        plot_history(output, metrics, label="step" if eagle3 else "head")
        facts = {
            "Training data": f"`{config.data_path}` ({len(train_set)} conversations)",
            "Epochs / max length": f"{config.num_train_epochs:g} / {config.model_max_length}",
        }
        layers = None
        if eagle3:
            layers = base.config.get_text_config().num_hidden_layers
            facts["Training-time test"] = (
                f"{config.eagle3_ttt_steps} steps, step j's loss weighted {config.eagle3_step_decay:g}**j"
            )
            facts["Learning rate"] = f"{config.learning_rate:g}"
        # The config as saved (its torch_dtype is the saved weights'), for an EAGLE-3 draft.
        saved = output / EAGLE3_CONFIG_NAME
        draft_config = Eagle3Config.from_json(read_json(saved), str(saved)) if eagle3 else model.heads.config
        card_metrics = metrics.held_out_head_metrics(model.metric_name)
        base_id = hub_base_id(config.model_name_or_path) or base_path
        write_model_card(output, draft_config, base_id, facts, card_metrics, target_num_layers=layers)
        logger.warning("%s written to %s", "EAGLE-3 draft" if eagle3 else "heads", output)
    return output


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
