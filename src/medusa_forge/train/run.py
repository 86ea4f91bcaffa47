"""The training command: from a TrainConfig, build data + model, train with MedusaTrainer, write the heads folder."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from medusa_forge.data.conversations import load_conversations
from medusa_forge.data.tokenize import ensure_chat_template
from medusa_forge.defaults import cache_dir, resolve_model
from medusa_forge.errors import UserError
from medusa_forge.heads import MedusaHeads
from medusa_forge.model_card import hub_base_id, write_model_card
from medusa_forge.modeling import load_base_model, load_tokenizer
from medusa_forge.train.args import TrainConfig
from medusa_forge.train.dataset import ConversationDataset, PadCollator
from medusa_forge.train.hidden_cache import CachedHiddenDataset, build_hidden_cache
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
    if config.auto_resume and Path(config.output_dir).is_dir():
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


def _cached(base, train_set, eval_set, config: TrainConfig):
    """Swap token datasets for hidden-state datasets; the main process of each node builds, others wait."""
    root = Path(config.medusa_hidden_cache_dir or cache_dir() / "hidden")
    out = []
    for dataset in (train_set, eval_set):
        if dataset is None:
            out.append(None)
            continue
        items = dataset.all_items()
        with config.main_process_first(desc="hidden-state cache"):
            cache = build_hidden_cache(base, items, root)
        out.append(CachedHiddenDataset(items, cache))
    return out


def train(config: TrainConfig) -> Path:
    """Train the heads as `config` says; returns the heads folder."""
    is_main = config.process_index == 0
    if is_main and config.world_size > 1:
        logger.warning("training on %d processes (%s)", config.world_size, config.parallel_mode.value)
    base_path = resolve_model(config.model_name_or_path)  # rank-safe: converts the alias once, with a lock
    tokenizer = ensure_chat_template(load_tokenizer(base_path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.convert_ids_to_tokens(0)

    conversations = load_conversations(config.data_path, config.max_samples)
    train_set = ConversationDataset(
        conversations, tokenizer, config.model_max_length, config.lazy_preprocess, config.data_path
    )
    eval_path = config.eval_data_path or ("sharegpt-heldout" if config.data_path == "sharegpt" else None)
    eval_set = None
    if config.eval_strategy != "no":
        if eval_path is None:
            raise UserError("--eval_strategy is not 'no': pass --eval_data_path with held-out conversations")
        eval_set = ConversationDataset(
            load_conversations(eval_path, config.max_eval_samples),
            tokenizer,
            config.model_max_length,
            config.lazy_preprocess,
            eval_path,
        )

    base = load_base_model(base_path, dtype=_base_dtype(config)).to(config.device)
    cache_seconds = time.perf_counter()
    if config.medusa_hidden_cache:
        train_set, eval_set = _cached(base, train_set, eval_set, config)
    cache_seconds = time.perf_counter() - cache_seconds
    # In config.json: what the user passed, but aliases become the folder a server can load.
    heads = MedusaHeads.for_base_model(base, config.medusa_num_heads, config.medusa_num_layers, base_path)
    draft_vocab = config.medusa_draft_vocab_size or None
    if draft_vocab is not None and draft_vocab >= base.get_output_embeddings().weight.shape[0]:
        draft_vocab = None  # the whole vocabulary anyway
    heads.config.draft_vocab_size = draft_vocab
    if config.medusa_freeze_projection:
        for head in heads:
            head[-1].weight.requires_grad_(False)
    model = MedusaForTraining(
        base,
        heads,
        head_weights(config.medusa_num_heads, config.medusa_decay_coefficient),
        soft_labels=config.medusa_soft_labels,
        chunk_size=config.medusa_loss_chunk_size,
        draft_vocab_size=draft_vocab,
    )
    trainer = MedusaTrainer(
        model=model,
        args=config,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=PadCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
    )
    result = trainer.train(resume_from_checkpoint=_resume_checkpoint(config))
    final = {**result.metrics, "hidden_cache_seconds": cache_seconds}
    if eval_set is not None:
        final.update(trainer.evaluate())
    trainer.save_model(config.output_dir)
    output = Path(config.output_dir)
    if is_main:
        metrics = training_metrics(trainer.state.log_history, final)
        metrics.save(output)
        plot_history(output, metrics)
        card_metrics = metrics.held_out_head_metrics()
        facts = {
            "Training data": f"`{config.data_path}` ({len(train_set)} conversations)",
            "Epochs / max length": f"{config.num_train_epochs:g} / {config.model_max_length}",
        }
        write_model_card(
            output, heads.config, hub_base_id(config.model_name_or_path) or base_path, facts, card_metrics
        )
        logger.warning("heads written to %s", output)
    return output


def run_train(config: TrainConfig) -> int:
    try:
        train(config)
    finally:
        # Under torchrun: leave the process group cleanly, or gloo may abort a rank at interpreter exit.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0
