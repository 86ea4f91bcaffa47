"""Speed on this machine: the tree size chosen by measured step latency, and plain greedy, Medusa and prompt lookup
timed back to back per prompt (outputs checked equal)."""

from __future__ import annotations

import logging
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from medusa_forge.errors import UserError
from medusa_forge.generation.text import encode_chat
from medusa_forge.results import Acceptance, SpeedComparison, TreeSearch

logger = logging.getLogger("medusa_forge.eval")


def choose_tree(
    make_decoder, rank_accuracy: list[list[float]], sizes: list[int], prefix_length: int = 256, repeats: int = 5
) -> TreeSearch:
    """Best tree per node budget from the rank accuracies, its step latency measured on this machine, and the
    budget with the most expected tokens per second. `make_decoder`: the decoder of a tree (`time_step_parts`)."""
    from medusa_forge.decode.step_latency import measure_step_seconds
    from medusa_forge.decode.tree import expected_accept_length
    from medusa_forge.formats.tree_file import build_tree

    trees = [build_tree(rank_accuracy, n) for n in sizes]
    expected = [expected_accept_length(t, rank_accuracy) for t in trees]
    plain, *seconds = measure_step_seconds(make_decoder, [None, *trees], prefix_length, repeats)
    best = max(range(len(sizes)), key=lambda i: expected[i] / seconds[i])
    if expected[best] / seconds[best] <= 1 / plain:
        logger.warning(
            "no tree is expected to beat plain greedy here: best %.2f tokens/s (%d nodes) vs %.2f for a plain step; "
            "the draft's accuracy is too low for this machine's cost of verifying a tree",
            expected[best] / seconds[best],
            len(trees[best]),
            1 / plain,
        )
    return TreeSearch([len(t) for t in trees], expected, seconds, plain, len(trees[best]), trees[best])


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
    base,
    decoder,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos: set[int],
    pad_id: int,
    prompt_lookup_tokens: int | None,
) -> tuple[dict[str, SpeedRun], list[int], list[int]]:
    """Per prompt, back to back: plain greedy with `base` (the base model, or anything with a `.base`), the
    speculative `decoder` (Medusa or EAGLE-3: its run keeps the name "medusa", which eval.json readers know),
    prompt lookup. Returns the runs, every step's accepted length, and the indices of prompts whose speculative
    output differed from plain greedy (must be empty)."""
    base = getattr(base, "base", base)
    device = next(base.parameters()).device
    eos_list = sorted(eos)

    def hf(ids: list[int], n: int, **extra) -> list[int]:
        out = base.generate(
            torch.tensor([ids], device=device),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=eos_list,
            pad_token_id=pad_id,
            **extra,
        )
        return out[0, len(ids) :].tolist()

    lookup = {"prompt_lookup_num_tokens": prompt_lookup_tokens} if prompt_lookup_tokens else None
    with torch.no_grad():  # warm-up, excluded: first calls pay allocation and kernel selection
        hf(prompts[0], 8)
        decoder.generate(prompts[0], 8, eos_token_ids=eos)
        if lookup:
            hf(prompts[0], 8, **lookup)
    runs = {"greedy": SpeedRun("greedy"), "medusa": SpeedRun("medusa")}
    if lookup:
        runs["prompt_lookup"] = SpeedRun("prompt_lookup")
    accept_lengths: list[int] = []
    mismatches: list[int] = []
    for index, ids in enumerate(tqdm(prompts, desc="greedy / draft / prompt lookup")):
        with torch.no_grad():
            reference, seconds = _timed(lambda ids=ids: hf(ids, max_new_tokens))
            # generate() may pad after an EOS; keep up to the first EOS like the other decoders
            reference = _cut_at_eos(reference, eos)
            runs["greedy"].add(len(reference), seconds)
            result, seconds = _timed(lambda ids=ids: decoder.generate(ids, max_new_tokens, eos_token_ids=eos))
            runs["medusa"].add(len(result.tokens), seconds)
            accept_lengths.extend(result.accept_lengths)
            if result.tokens != reference:
                mismatches.append(index)
            if lookup:
                tokens, seconds = _timed(lambda ids=ids: _cut_at_eos(hf(ids, max_new_tokens, **lookup), eos))
                runs["prompt_lookup"].add(len(tokens), seconds)
                if tokens != reference:
                    logger.warning("prompt lookup's output differed from plain greedy on prompt %d", index)
    return runs, accept_lengths, mismatches


def _cut_at_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[: i + 1]
    return tokens


def speed_comparison(
    runs: dict[str, SpeedRun], prompts: int, max_new_tokens: int, mismatches: list[int]
) -> SpeedComparison:
    """The runs' totals, each decoder's speed-up over plain greedy, and whether Medusa's outputs matched it."""
    greedy_tps = runs["greedy"].tokens_per_second
    return SpeedComparison(
        prompts=prompts,
        max_new_tokens=max_new_tokens,
        tokens={name: run.tokens for name, run in runs.items()},
        seconds={name: run.seconds for name, run in runs.items()},
        tokens_per_second={name: run.tokens_per_second for name, run in runs.items()},
        speedup={name: run.tokens_per_second / greedy_tps if greedy_tps else 0.0 for name, run in runs.items()},
        median_per_prompt_speedup=statistics.median(
            m / g
            for m, g in zip(
                runs["medusa"].per_prompt_tokens_per_second,
                runs["greedy"].per_prompt_tokens_per_second,
                strict=True,
            )
            if g
        ),
        outputs_equal=not mismatches,
        mismatched_prompts=mismatches,
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
