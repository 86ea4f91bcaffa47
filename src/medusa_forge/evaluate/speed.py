"""Speed on this machine: the tree size chosen by measured step latency, and plain greedy (float32 and bfloat16),
the draft and prompt lookup timed back to back per prompt (the draft's output checked against greedy's)."""

from __future__ import annotations

import functools
import logging
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from medusa_forge.decode.step_latency import DecoderFactory, measure_plain_and_trees
from medusa_forge.errors import UserError
from medusa_forge.generation.text import encode_chat
from medusa_forge.results import DRAFT_RUN, Acceptance, SpeedComparison, TreeSearch, greedy_run

logger = logging.getLogger("medusa_forge.eval")


def choose_tree(
    make_decoders: dict[str, DecoderFactory],
    rank_accuracy: list[list[float]],
    sizes: list[int],
    prefix_length: int = 256,
    repeats: int = 5,
) -> dict[str, TreeSearch]:
    """Per dtype of `make_decoders` ({dtype: the decoder factory of a tree}, see `time_step_parts`): the best tree
    per node budget from the rank accuracies, its step latency measured on this machine, and the budget with the
    most expected tokens per second. Every dtype's plain step and trees are timed in one round-robin, so the
    machine's drift between them cannot decide the dtype."""
    from medusa_forge.decode.tree import expected_accept_length
    from medusa_forge.formats.tree_file import build_tree

    trees = [build_tree(rank_accuracy, n) for n in sizes]
    expected = [expected_accept_length(t, rank_accuracy) for t in trees]
    searches = {}
    for dtype, (plain, steps) in measure_plain_and_trees(make_decoders, trees, prefix_length, repeats).items():
        best = max(range(len(sizes)), key=lambda i: expected[i] / steps[i])
        searches[dtype] = TreeSearch([len(t) for t in trees], expected, steps, plain, len(trees[best]), trees[best])
    return searches


def choose_chain(
    make_decoder: DecoderFactory,
    rank_accuracy: list[list[float]],
    lengths: list[int],
    prefix_length: int = 256,
    repeats: int = 5,
) -> TreeSearch:
    """The engines' chain (vLLM's num_speculative_tokens) with the most expected tokens per second on this machine,
    chosen as `choose_tree` chooses a tree: per length, the expected accepted tokens from the rank accuracies and
    one step of that chain timed here (drafted and verified by our decoder, as the engines draft it)."""
    from medusa_forge.decode.tree import expected_accept_length
    from medusa_forge.evaluate.engines import chain_choices

    chains = [chain_choices(n) for n in lengths]
    expected = [expected_accept_length(chain, rank_accuracy) for chain in chains]
    ((plain, steps),) = measure_plain_and_trees({"chain": make_decoder}, chains, prefix_length, repeats).values()
    best = max(range(len(lengths)), key=lambda i: expected[i] / steps[i])
    return TreeSearch(list(lengths), expected, steps, plain, lengths[best], chains[best])


def first_prompts(tokenizer, conversations, count: int, max_prompt_tokens: int) -> list[list[int]]:
    """The first user turn of each conversation (with any system turn before it), chat template applied."""
    prompts = []
    for conversation in conversations:
        messages = []
        for message in conversation.messages:
            messages.append(message)
            if message["role"] == "user":
                break
        if not messages or messages[-1]["role"] != "user":
            continue
        ids = encode_chat(tokenizer, messages)
        if len(ids) <= max_prompt_tokens:
            prompts.append(ids)
        if len(prompts) == count:
            break
    if not prompts:
        raise UserError(f"no held-out conversation starts with a user turn of at most {max_prompt_tokens} tokens")
    return prompts


@dataclass
class SpeedRun:
    name: str
    tokens: int = 0
    seconds: float = 0.0
    per_prompt_tokens_per_second: list[float] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds
        self.per_prompt_tokens_per_second.append(tokens / seconds if seconds else 0.0)


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_speed(
    bases: dict[str, Any],
    decoder,
    dtype: str,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos: set[int],
    pad_id: int,
    prompt_lookup_tokens: int | None,
) -> tuple[dict[str, SpeedRun], dict[str, list[list[int]]], list[int]]:
    """Per prompt, back to back: plain greedy with each of `bases` ({dtype: base model}), the speculative `decoder`
    (Medusa or EAGLE-3, decoding in `dtype`), prompt lookup with `bases[dtype]`. Returns the runs, each run's
    output per prompt (cut after the first EOS) and every draft step's accepted length."""
    eos_list = sorted(eos)

    def hf(base, ids: list[int], n: int, **extra) -> list[int]:
        device = next(base.parameters()).device
        out = base.generate(
            torch.tensor([ids], device=device),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=eos_list,
            pad_token_id=pad_id,
            **extra,
        )
        # generate() may pad after an EOS; keep up to the first EOS like the other decoders
        return cut_at_eos(out[0, len(ids) :].tolist(), eos)

    lookup = {"prompt_lookup_num_tokens": prompt_lookup_tokens} if prompt_lookup_tokens else None
    # Each takes a prompt's ids; greedy and prompt lookup give the new ids, the draft its DecodeResult.
    generators: dict[str, Callable[[list[int]], Any]] = {
        greedy_run(d): functools.partial(hf, base, n=max_new_tokens) for d, base in bases.items()
    }
    generators[DRAFT_RUN] = lambda ids: decoder.generate(ids, max_new_tokens, eos_token_ids=eos)
    if lookup:
        generators["prompt_lookup"] = functools.partial(hf, bases[dtype], n=max_new_tokens, **lookup)
    with torch.no_grad():  # warm-up, excluded: first calls pay allocation and kernel selection
        for base in bases.values():
            hf(base, prompts[0], 8)
        decoder.generate(prompts[0], 8, eos_token_ids=eos)
        if lookup:
            hf(bases[dtype], prompts[0], 8, **lookup)
    runs = {name: SpeedRun(name) for name in generators}
    outputs: dict[str, list[list[int]]] = {name: [] for name in generators}
    accept_lengths: list[int] = []
    for ids in tqdm(prompts, desc=" / ".join(generators)):
        for name, generate in generators.items():
            with torch.no_grad():
                result, seconds = _timed(lambda ids=ids, generate=generate: generate(ids))
            if name == DRAFT_RUN:
                accept_lengths.extend(result.accept_lengths)
                result = result.tokens
            runs[name].add(len(result), seconds)
            outputs[name].append(result)
    return runs, outputs, accept_lengths


def cut_at_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """`tokens` up to their first end-of-sequence token, which is kept."""
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[: i + 1]
    return tokens


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _agreement(outputs: list[list[int]], references: list[list[int]]) -> float:
    """Share of the reference tokens reproduced before the first divergence, over all prompts."""
    total = sum(len(r) for r in references)
    return sum(_common_prefix(o, r) for o, r in zip(outputs, references, strict=True)) / total if total else 1.0


def speed_comparison(
    runs: dict[str, SpeedRun], outputs: dict[str, list[list[int]]], dtype: str, max_new_tokens: int
) -> SpeedComparison:
    """The runs' totals; every run's speed-up over the fastest plain greedy run; the draft's output against plain
    greedy in its own dtype (equal on every prompt? where it first diverged, and the share that agrees) and, when
    it decoded in another dtype, against float32 greedy."""
    greedy = [name for name in runs if name.startswith(greedy_run(""))]
    reference = max(greedy, key=lambda name: runs[name].tokens_per_second)
    reference_tps = runs[reference].tokens_per_second
    draft, same = outputs[DRAFT_RUN], outputs[greedy_run(dtype)]
    mismatches = [i for i, (o, r) in enumerate(zip(draft, same, strict=True)) if o != r]
    for name in outputs:
        if name not in (DRAFT_RUN, *greedy) and outputs[name] != same:
            logger.warning("%s's output differed from plain greedy in %s", name, dtype)
    float32 = outputs.get(greedy_run("float32"))
    return SpeedComparison(
        prompts=len(draft),
        max_new_tokens=max_new_tokens,
        tokens={name: run.tokens for name, run in runs.items()},
        seconds={name: run.seconds for name, run in runs.items()},
        tokens_per_second={name: run.tokens_per_second for name, run in runs.items()},
        speedup={name: run.tokens_per_second / reference_tps if reference_tps else 0.0 for name, run in runs.items()},
        median_per_prompt_speedup=statistics.median(
            d / g
            for d, g in zip(
                runs[DRAFT_RUN].per_prompt_tokens_per_second,
                runs[reference].per_prompt_tokens_per_second,
                strict=True,
            )
            if g
        ),
        outputs_equal=not mismatches,
        mismatched_prompts=mismatches,
        reference=reference,
        dtype=dtype,
        first_divergence=[_common_prefix(draft[i], same[i]) for i in mismatches],
        agreement=_agreement(draft, same),
        agreement_float32=_agreement(draft, float32) if float32 is not None and dtype != "float32" else None,
    )


def acceptance(accept_lengths: list[int], expected_accept_length: float) -> Acceptance:
    histogram = Counter(accept_lengths)
    return Acceptance(
        mean_accept_length=sum(accept_lengths) / len(accept_lengths) if accept_lengths else 0.0,
        expected_accept_length=expected_accept_length,
        steps=len(accept_lengths),
        histogram={k: histogram[k] for k in sorted(histogram)},
    )


def machine_description() -> str:
    import os
    import platform

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"
