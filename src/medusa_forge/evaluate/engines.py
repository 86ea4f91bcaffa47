"""The figure an engine will give: the chain the engines' printed commands draft (`num_speculative_tokens` draft
tokens per step, topk 1), measured by our decoder on eval's prompts and, with `eval --engine vllm`, by vLLM itself
on the very same prompt ids. Both are greedy, so they agree to the token when the export is right (the engine
test checks it); a gap is a defect of the export, or of the engine."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from medusa_forge.decode.loading import LoadedDraft
from medusa_forge.evaluate.speed import cut_at_eos
from medusa_forge.evaluate.vllm_engine import VllmClient, VllmServer, find_vllm_python, vllm_version
from medusa_forge.results import ChainAcceptance

logger = logging.getLogger("medusa_forge.eval")

ENGINES = ("none", "vllm")


def same_replies(engine: list[list[int]], ours: list[list[int]], eos: set[int]) -> bool:
    """Token for token, up to each reply's end of sequence (which an engine may leave out of its token ids)."""

    def reply(tokens: list[int]) -> list[int]:
        tokens = cut_at_eos(tokens, eos)
        return tokens[:-1] if tokens and tokens[-1] in eos else tokens

    return list(map(reply, engine)) == list(map(reply, ours))


def chain_choices(draft_tokens: int) -> list[list[int]]:
    """The tree of a chain: each node the first guess after its parent."""
    return [[0] * depth for depth in range(1, draft_tokens + 1)]


def our_chain(
    loaded: LoadedDraft, prompts: list[list[int]], draft_tokens: int, max_new_tokens: int, eos: set[int]
) -> tuple[ChainAcceptance, list[list[int]]]:
    """Our decoder drafting the engines' chain on `prompts`; also its outputs."""
    decoder = loaded.engine_decoder(chain_choices(draft_tokens))
    per_position, steps, outputs = [0] * draft_tokens, 0, []
    for ids in prompts:
        result = decoder.generate(ids, max_new_tokens, eos_token_ids=eos)
        outputs.append(result.tokens)
        steps += len(result.accepted_drafts)
        for accepted in result.accepted_drafts:
            for position in range(accepted):
                per_position[position] += 1
    return ChainAcceptance("medusa-forge", draft_tokens, steps, per_position), outputs


def engine_chain(
    client: VllmClient, prompts: list[list[int]], draft_tokens: int, max_new_tokens: int, label: str
) -> tuple[ChainAcceptance, list[list[int]]]:
    """vLLM's counters over greedy completions of `prompts`, one at a time (as our decoder runs them)."""
    before = client.counters()
    outputs = [client.complete(ids, max_new_tokens).token_ids for ids in prompts]
    counters = client.counters() - before
    if counters.drafts and len(counters.accepted_per_position) != draft_tokens:
        logger.warning(
            "vLLM reports %d draft positions, not the %d asked: the server at hand drafts another chain",
            len(counters.accepted_per_position),
            draft_tokens,
        )
    return ChainAcceptance(label, draft_tokens, counters.drafts, list(counters.accepted_per_position)), outputs


def vllm_chain(
    loaded: LoadedDraft,
    prompts: list[list[int]],
    draft_tokens: int,
    max_new_tokens: int,
    url: str | None = None,
    python: str | None = None,
    log_path: Path | None = None,
) -> tuple[ChainAcceptance, list[list[int]]]:
    """vLLM serving the draft: the server at `url` (already serving this draft, whose chain it drafts), else one
    started here (float32, eager) from `python` or the vLLM found (see vllm_engine.find_vllm_python)."""
    if url:
        return engine_chain(VllmClient(url), prompts, draft_tokens, max_new_tokens, f"vLLM at {url}")
    vllm_python = find_vllm_python(python)
    longest = max(map(len, prompts)) + max_new_tokens + draft_tokens + 1
    with tempfile.TemporaryDirectory(prefix="medusa-forge-vllm-") as scratch:
        speculative = loaded.vllm_speculative_config(Path(scratch), draft_tokens)
        logger.warning("starting vLLM (%s) with %s; start-up takes a minute or two", vllm_python, speculative)
        with VllmServer(
            vllm_python, loaded.base.config.name_or_path, speculative, log_path, max_model_len=longest
        ) as client:
            label = f"vLLM {vllm_version(vllm_python)}"
            return engine_chain(client, prompts, draft_tokens, max_new_tokens, label)
