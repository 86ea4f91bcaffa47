"""The training command's config: the original Medusa trainer's flags plus every HF
TrainingArguments flag, in one TrainConfig. `--evaluation_strategy` (transformers 4.x) is accepted as
`--eval_strategy`, `--warmup_ratio` as `--warmup_steps`.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
from dataclasses import dataclass, field, fields

import torch
from transformers import HfArgumentParser, TrainingArguments

from medusa_forge.drafts import default_kind, get_kind, kind_choices, kinds
from medusa_forge.drafts.fused_ce import TOPK
from medusa_forge.errors import UserError
from medusa_forge.generation.device import cpu_has_native_bfloat16
from medusa_forge.modeling import (
    TargetPlacement,
    check_target_flags,
    target_device_map_field,
    target_max_memory_field,
    target_offload_folder_field,
    target_placement,
)
from medusa_forge.train.cache_records import PRECISIONS

logger = logging.getLogger(__name__)

@dataclass
class TrainConfig(TrainingArguments):
    """HF TrainingArguments plus the original Medusa trainer's flags (model, data, heads, `model_max_length`), with
    defaults fit for heads. Without a GPU, fp16/tf32 cannot apply and bf16 applies only on a CPU with native
    bfloat16 (AVX512-BF16/AMX: CPU autocast, several times faster there); otherwise they are dropped with a warning
    (training in float32, faster on such CPUs), and use_cpu is set so accelerate runs torchrun processes as real
    multi-CPU DDP (gloo)."""

    model_name_or_path: str = field(
        default="smollm2", metadata={"help": "Base model: local folder, Hub id, or the offline alias 'smollm2'."}
    )
    data_path: str = field(
        default="sharegpt",
        metadata={"help": "Training conversations (JSON list or JSONL; ShareGPT or role/content), or 'sharegpt'."},
    )
    eval_data_path: str | None = field(
        default=None,
        metadata={"help": "Evaluation conversations. Default with --data_path sharegpt: 'sharegpt-heldout'."},
    )
    lazy_preprocess: bool = field(
        default=False, metadata={"help": "Tokenise each conversation when first used instead of all up front."}
    )
    max_samples: int | None = field(default=None, metadata={"help": "Use at most this many conversations."})
    max_eval_samples: int | None = field(default=200, metadata={"help": "Use at most this many eval conversations."})
    draft_kind: str = field(
        default=default_kind().name,
        metadata={
            "help": "What to train: "
            + "; ".join(f"'{kind.name}' {kind.label} (for {', '.join(kind.formats)})" for kind in kinds())
            + ". A kind's own flags carry its name (medusa_*: heads, eagle3_*, dflash_*); the data, cache "
            "(--medusa_hidden_cache*, named before other kinds) and Trainer flags apply to every kind.",
            "choices": kind_choices(),
        },
    )
    medusa_num_heads: int = field(default=3, metadata={"help": "Number of heads K (head i predicts token t+2+i)."})
    medusa_num_layers: int = field(default=1, metadata={"help": "Residual blocks per head."})
    medusa_decay_coefficient: float = field(
        default=1.0, metadata={"help": "Head i's loss weight is c**i (the Medusa paper uses 0.8)."}
    )
    medusa_hidden_cache: bool = field(
        default=True,
        # Named for the tutorial's Medusa flags (its spelling stays), but every kind trains from the cache: it holds
        # the records the kind asks for (`DraftKind.record_layers`).
        metadata={
            "help": "Run the frozen base once, cache its hidden states on disk, train every epoch from them (every "
            "draft kind, despite the medusa_ prefix: each caches the states it reads)."
        },
    )
    medusa_hidden_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where the hidden-state cache lives, any kind (default: ~/.cache/medusa-forge/hidden)."},
    )
    medusa_hidden_cache_precision: str = field(
        default="float16",
        metadata={
            "help": "How the cache keeps a token's record: float16, or float8 (e4m3 with a float16 scale per token "
            "and record part: half the disk; held-out top-1/top-5 unchanged within 0.002, BENCHMARKS.md). Part of "
            "the cache's key: a cache of the other precision is not reused.",
            "choices": list(PRECISIONS),
        },
    )
    medusa_soft_labels: bool = field(
        default=False, metadata={"help": "Teach head i the base model's own distribution for token t+2+i."}
    )
    medusa_freeze_projection: bool = field(
        default=False,
        metadata={"help": "Keep each head's vocabulary projection at the base lm_head; train only the blocks."},
    )
    medusa_draft_vocab_size: int = field(
        default=8192,
        metadata={
            "help": "Heads learn only token ids < N: N/V of the vocabulary projection's cost. 0 = the whole "
            "vocabulary. Rows >= N stay at the base lm_head; medusa-forge's decoder proposes from ids < N, the "
            "engines (TGI, vLLM, TensorRT-LLM) from the whole vocabulary."
        },
    )
    medusa_loss_chunk_size: int = field(
        default=1024, metadata={"help": "Tokens per chunk of the vocabulary projection + loss (bounds memory)."}
    )
    eagle3_ttt_steps: int = field(
        default=7,
        metadata={
            "help": "Training-time-test steps: the draft is unrolled this many times on its own states; step j "
            "predicts token t+2+j (EAGLE-3's reference uses 7)."
        },
    )
    eagle3_step_decay: float = field(default=0.8, metadata={"help": "Step j's loss weight is d**j (reference: 0.8)."})
    eagle3_draft_vocab_size: int = field(
        default=8192,
        metadata={
            "help": "The draft proposes from the N target tokens most frequent in the training data's assistant "
            "turns (d2t/t2d maps in the draft folder; the engines read them). 0 = the whole vocabulary."
        },
    )
    eagle3_fc_norm: bool = field(
        default=False,
        metadata={
            "help": "EAGLE 3.1: an RMSNorm per target feature layer before fc (config.json fc_norm; vLLM reads it)."
        },
    )
    eagle3_norm_output: bool = field(
        default=False,
        metadata={
            "help": "EAGLE 3.1: each draft step feeds the next its post-norm state (config.json norm_output; vLLM "
            "reads it)."
        },
    )
    eagle3_intermediate_size: int | None = field(
        default=None, metadata={"help": "The draft layer's MLP width (default: the target's)."}
    )
    dflash_block_size: int = field(
        default=16,
        metadata={
            "help": "DFlash block B: the last token + B-1 masks drafted in one pass, so B-1 draft tokens per step "
            "(SpecForge's and SGLang's default 16)."
        },
    )
    dflash_num_layers: int = field(
        default=1, metadata={"help": "DFlash draft layers (SpecForge's generated default 1; its Qwen3-8B draft has 5)."}
    )
    dflash_num_anchors: int = field(
        default=64,
        metadata={
            "help": "DFlash blocks trained per sequence, at random supervised positions. SpecForge uses 512 at "
            "3072 tokens (one per 6); 64 keeps that ratio at 384 tokens and bounds memory (N x B queries)."
        },
    )
    dflash_loss_gamma: float = field(
        default=7.0,
        metadata={
            "help": "DFlash slot k's loss weight is exp(-(k-1)/gamma); 0 = no decay (SpecForge's B=16 example: 7)."
        },
    )
    dflash_mask_token_id: int | None = field(
        default=None,
        metadata={
            "help": "The token whose frozen embedding fills the DFlash block's masked slots. Default: the tokenizer's "
            "mask token, else a spare embedding row, else pad, else eos (SpecForge's order)."
        },
    )
    target_device_map: str | None = target_device_map_field()
    target_max_memory: str | None = target_max_memory_field()
    target_offload_folder: str | None = target_offload_folder_field()
    model_max_length: int = field(default=2048, metadata={"help": "Truncate conversations to this many tokens."})
    output_dir: str = field(default="medusa-heads", metadata={"help": "Where the heads folder is written."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate (heads only)."})
    save_strategy: str = field(default="steps", metadata={"help": "Checkpoint strategy: no, steps, epoch."})
    save_steps: float = field(default=500, metadata={"help": "Checkpoint every N steps."})
    save_total_limit: int | None = field(
        default=1, metadata={"help": "Keep at most N checkpoints while training (resume needs only the last)."}
    )
    keep_checkpoints: bool = field(
        default=False, metadata={"help": "Keep the checkpoints once training completes (default: removed then)."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log head metrics every N steps."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False: inputs are already ids."})
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "Kept False: every head is in every step's graph (saves a graph walk)."}
    )
    auto_resume: bool = field(
        default=True, metadata={"help": "Resume from the last checkpoint-* in --output_dir when there is one."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start over: delete the checkpoint-* folders in --output_dir instead of resuming from them."},
    )
    recover_truncated_data: bool = field(
        default=False,
        metadata={
            "help": "Train on the complete records of a data file that ends in the middle of a record (a cut copy) "
            "instead of refusing it. The embedded 'sharegpt' file is always recovered."
        },
    )

    def __post_init__(self) -> None:
        try:
            kind = get_kind(self.draft_kind)
        except UserError as err:
            raise UserError(f"--draft_kind: {err}") from None
        # Another kind's own flag, set to other than its default, would be silently ignored: refused instead.
        defaults = {f.name: f.default for f in fields(TrainConfig)}
        for other in (k for k in kinds() if k is not kind):
            for flag in other.train_flags:
                if getattr(self, flag) != defaults[flag]:
                    raise UserError(
                        f"--{flag} {getattr(self, flag)}: applies to {other.label} (--draft_kind {other.name}); this "
                        f"run trains {kind.label} (--draft_kind {kind.name}), which would ignore it"
                    )
        if self.model_max_length < 2:
            raise UserError(f"--model_max_length {self.model_max_length}: must be at least 2 (a token and the next)")
        if self.eagle3_ttt_steps < 1:
            raise UserError("--eagle3_ttt_steps must be >= 1 (1 = no training-time test)")
        if not self.eagle3_step_decay > 0:
            raise UserError("--eagle3_step_decay must be > 0")
        if self.eagle3_draft_vocab_size != 0 and self.eagle3_draft_vocab_size < max(TOPK):
            raise UserError(f"--eagle3_draft_vocab_size must be 0 (whole vocabulary) or >= {max(TOPK)} (top-k metrics)")
        if self.eagle3_intermediate_size is not None and self.eagle3_intermediate_size < 1:
            raise UserError("--eagle3_intermediate_size must be >= 1")
        if self.dflash_block_size < 2 or self.dflash_num_layers < 1 or self.dflash_num_anchors < 1:
            raise UserError("--dflash_block_size must be >= 2, --dflash_num_layers and --dflash_num_anchors >= 1")
        if self.dflash_loss_gamma < 0:
            raise UserError("--dflash_loss_gamma must be >= 0 (0 = no decay)")
        if self.medusa_num_heads < 1 or self.medusa_num_layers < 0:
            raise UserError("--medusa_num_heads must be >= 1 and --medusa_num_layers >= 0")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} {getattr(self, name)}: must be at least 1")
        if self.medusa_draft_vocab_size < 0:
            raise UserError("--medusa_draft_vocab_size must be >= 0 (0 = the whole vocabulary)")
        check_target_flags(self)  # a bad value fails before any loading
        if self.deepspeed:
            if importlib.util.find_spec("deepspeed") is None:
                raise UserError("--deepspeed needs the deepspeed package: `pip install deepspeed` (on a CUDA machine)")
            if isinstance(self.deepspeed, str) and not os.path.isfile(self.deepspeed):
                raise UserError(f"--deepspeed {self.deepspeed}: file not found")
        if not (torch.cuda.is_available() or torch.backends.mps.is_available()):
            self.use_cpu = True
            for name in ("bf16", "fp16", "tf32"):
                if name == "bf16" and self.bf16 and cpu_has_native_bfloat16():
                    logger.warning("--bf16: bfloat16 autocast on this CPU (it has native bfloat16: AVX512-BF16/AMX)")
                elif getattr(self, name):
                    logger.warning(
                        "--%s was requested but no CUDA GPU is available%s: ignoring it, training in float32",
                        name,
                        " and this CPU has no native bfloat16" if name == "bf16" else "",
                    )
                    setattr(self, name, None if name == "tf32" else False)
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False
        self.label_names = ["labels"]  # the only label input of MedusaForTraining and Eagle3ForTraining
        try:
            super().__post_init__()
        except (ValueError, ImportError) as err:
            raise UserError(f"invalid training arguments: {err}") from None
        self._plain_cpu()

    def _plain_cpu(self) -> None:
        """Under torchrun on a CPU, accelerate names this process's device `cpu:0`, and `Tensor.to(cpu:0)` copies a
        tensor that is on `cpu`. A target loaded from safetensors is the files' pages mapped into memory, shared by
        every rank and the page cache; moved to `cpu:0` (by train, and by the Trainer's accelerator) each rank copied
        it whole: an 8B-shaped target of 5.5 GiB peaked at 11.4 GiB of RSS per rank while loading and kept 5.5 GiB
        of its own (BENCHMARKS.md, "Scale"). The device is named plain `cpu` for both: the same device, no copies."""
        state = self.distributed_state
        if state is not None and state.device.type == "cpu" and state.device.index is not None:
            state.device = torch.device("cpu")  # accelerate's shared state: the Trainer's Accelerator copies it
            self.__dict__["_setup_devices"] = state.device  # TrainingArguments.device's cached value

    def target_placement(self) -> TargetPlacement | None:
        """Where the frozen target is dispatched (--target_* flags); None: whole, on the training device."""
        return target_placement(self, self.device)


# transformers 4.x names (the original trainer's era) -> 5.x names (warmup_steps < 1 is a ratio of total steps in 5.x)
_RENAMED = {"--evaluation_strategy": "--eval_strategy", "--warmup_ratio": "--warmup_steps"}


def _rename_flags(argv: list[str]) -> list[str]:
    out = []
    for token in argv:
        name, sep, value = token.partition("=")
        out.append(_RENAMED.get(name, name) + sep + value)
    return out


def valid_flags() -> list[str]:
    return sorted("--" + f.name for f in fields(TrainConfig) if f.init) + sorted(_RENAMED)


def parse_args(argv: list[str]) -> TrainConfig:
    """The train command's flags (the original trainer's spellings included) -> a validated TrainConfig."""
    parser = HfArgumentParser(TrainConfig)
    parser.allow_abbrev = False  # a typo like --medusa_num_head must fail, not match a prefix
    namespace, unknown = parser.parse_known_args(_rename_flags(argv))
    if unknown:
        flags = [u for u in unknown if u.startswith("-")] or unknown
        hints = []
        for flag in flags:
            close = difflib.get_close_matches(flag.split("=")[0], valid_flags(), n=2)
            hints.append(f"{flag} (did you mean {', '.join(close)}?)" if close else flag)
        raise UserError("unknown flags: " + "; ".join(hints) + "\nvalid flags: " + " ".join(valid_flags()))
    return TrainConfig(**vars(namespace))
