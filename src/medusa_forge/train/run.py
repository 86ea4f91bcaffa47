"""The training command: parse flags, build data + model, train with MedusaTrainer, write the heads folder."""

from __future__ import annotations

import logging
import os
import sys
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
from medusa_forge.train.args import parse_args
from medusa_forge.train.dataset import ConversationDataset, PadCollator
from medusa_forge.train.hidden_cache import CachedHiddenDataset, build_hidden_cache
from medusa_forge.train.model import MedusaForTraining, head_weights
from medusa_forge.train.report import plot_history, training_metrics
from medusa_forge.train.trainer import MedusaTrainer

logger = logging.getLogger("medusa_forge")


def _base_dtype(training_args) -> torch.dtype:
    if training_args.bf16:
        return torch.bfloat16
    if training_args.fp16:
        return torch.float16
    return torch.float32


def _resume_checkpoint(training_args) -> str | None:
    if training_args.resume_from_checkpoint:
        if not Path(training_args.resume_from_checkpoint).is_dir():
            raise UserError(f"--resume_from_checkpoint {training_args.resume_from_checkpoint}: no such folder")
        return training_args.resume_from_checkpoint
    if training_args.auto_resume and Path(training_args.output_dir).is_dir():
        last = last_complete_checkpoint(Path(training_args.output_dir))
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


def _cached(base, train_set, eval_set, medusa_args, training_args):
    """Swap token datasets for hidden-state datasets; the main process of each node builds, others wait."""
    root = Path(medusa_args.medusa_hidden_cache_dir or cache_dir() / "hidden")
    out = []
    for dataset in (train_set, eval_set):
        if dataset is None:
            out.append(None)
            continue
        items = dataset.all_items()
        with training_args.main_process_first(desc="hidden-state cache"):
            cache = build_hidden_cache(base, items, root)
        out.append(CachedHiddenDataset(items, cache))
    return out


def train(argv: list[str]) -> Path:
    """Run training from command-line flags; returns the heads folder."""
    model_args, data_args, medusa_args, training_args = parse_args(argv)
    is_main = training_args.process_index == 0
    if is_main and training_args.world_size > 1:
        logger.warning("training on %d processes (%s)", training_args.world_size, training_args.parallel_mode.value)
    base_path = resolve_model(model_args.model_name_or_path)  # rank-safe: converts the alias once, with a lock
    tokenizer = ensure_chat_template(load_tokenizer(base_path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.convert_ids_to_tokens(0)

    conversations = load_conversations(data_args.data_path, data_args.max_samples)
    train_set = ConversationDataset(
        conversations, tokenizer, training_args.model_max_length, data_args.lazy_preprocess, data_args.data_path
    )
    eval_path = data_args.eval_data_path or ("sharegpt-heldout" if data_args.data_path == "sharegpt" else None)
    eval_set = None
    if training_args.eval_strategy != "no":
        if eval_path is None:
            raise UserError("--eval_strategy is not 'no': pass --eval_data_path with held-out conversations")
        eval_set = ConversationDataset(
            load_conversations(eval_path, data_args.max_eval_samples),
            tokenizer,
            training_args.model_max_length,
            data_args.lazy_preprocess,
            eval_path,
        )

    base = load_base_model(base_path, dtype=_base_dtype(training_args)).to(training_args.device)
    cache_seconds = time.perf_counter()
    if medusa_args.medusa_hidden_cache:
        train_set, eval_set = _cached(base, train_set, eval_set, medusa_args, training_args)
    cache_seconds = time.perf_counter() - cache_seconds
    # In config.json: what the user passed, but aliases become the folder a server can load.
    heads = MedusaHeads.for_base_model(base, medusa_args.medusa_num_heads, medusa_args.medusa_num_layers, base_path)
    draft_vocab = medusa_args.medusa_draft_vocab_size or None
    if draft_vocab is not None and draft_vocab >= base.get_output_embeddings().weight.shape[0]:
        draft_vocab = None  # the whole vocabulary anyway
    heads.config.draft_vocab_size = draft_vocab
    if medusa_args.medusa_freeze_projection:
        for head in heads:
            head[-1].weight.requires_grad_(False)
    model = MedusaForTraining(
        base,
        heads,
        head_weights(medusa_args.medusa_num_heads, medusa_args.medusa_decay_coefficient),
        soft_labels=medusa_args.medusa_soft_labels,
        chunk_size=medusa_args.medusa_loss_chunk_size,
        draft_vocab_size=draft_vocab,
    )
    training_args.label_names = ["labels"]
    if not torch.cuda.is_available():
        training_args.dataloader_pin_memory = False
    trainer = MedusaTrainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=PadCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
    )
    result = trainer.train(resume_from_checkpoint=_resume_checkpoint(training_args))
    final = {**result.metrics, "hidden_cache_seconds": cache_seconds}
    if eval_set is not None:
        final.update(trainer.evaluate())
    trainer.save_model(training_args.output_dir)
    output = Path(training_args.output_dir)
    if is_main:
        metrics = training_metrics(trainer.state.log_history, final)
        metrics.save(output)
        plot_history(output, metrics)
        card_metrics = metrics.held_out_head_metrics()
        facts = {
            "Training data": f"`{data_args.data_path}` ({len(train_set)} conversations)",
            "Epochs / max length": f"{training_args.num_train_epochs:g} / {training_args.model_max_length}",
        }
        write_model_card(
            output, heads.config, hub_base_id(model_args.model_name_or_path) or base_path, facts, card_metrics
        )
        logger.warning("heads written to %s", output)
    return output


def cli_main(argv: list[str]) -> int:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        train(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        # Under torchrun: leave the process group cleanly, or gloo may abort a rank at interpreter exit.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0
