"""The model card of a DFlash draft (`DFLASH.render_card`): what the draft is, how it was trained, what eval
measured, and the vLLM, SGLang and medusa-forge commands that serve it."""

from __future__ import annotations

import shlex

from medusa_forge.drafts.card import (
    CARD_MARKER,
    accuracy_sections,
    evaluation_summary,
    header_lines,
    headline_rows,
    hub_base_id,
)
from medusa_forge.drafts.dflash_config import DFlashConfig, chain_origin, hidden_state_indices
from medusa_forge.engine_commands import dflash_serve_command
from medusa_forge.engine_versions import SGLANG_DFLASH_RELEASE, VLLM_DFLASH_RELEASE
from medusa_forge.results import EvalReport


def render_card(
    config: DFlashConfig,
    base_model_id: str,
    facts: dict[str, str],
    metrics: dict[str, float],
    evaluation: EvalReport | None,
    repo_id: str | None,
    metric_label: str,
    metric_name: str,
    first_predictor: int,
) -> str:
    """The card of a DFlash draft folder: what it is, how it was trained (`facts`, held-out per-position `metrics`
    `dflash_pos{i}_top1/top5`), what eval measured, and the commands that serve it (from `repo_id` when given)."""
    hub_id = hub_base_id(base_model_id)
    header = header_lines(("dflash", "speculative-decoding", "medusa-forge"), hub_id)
    summary = evaluation_summary(evaluation)
    rows = _draft_rows(config, base_model_id, facts) + headline_rows(summary)
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    title = "Draft accuracy per block position (held-out, at the end of training)"
    body = "\n\n".join(accuracy_sections(title, metric_label, metric_name, metrics, summary, first_predictor))
    return f"""{chr(10).join(header)}
{CARD_MARKER}

# DFlash draft for `{base_model_id}`

A DFlash block draft trained with [medusa-forge](https://pypi.org/project/medusa-forge/) on the frozen target model.
From the target's hidden states it drafts a whole block of {config.block_size - 1} tokens in one forward pass of
{config.num_hidden_layers} bidirectional layer(s); the target verifies them in one forward pass, so generation is
faster and greedy output is unchanged.

| | |
|---|---|
{table}

{body}

{_serve_section(config, repo_id, base_model_id, hub_id, _served_chain(config, evaluation))}"""


def _draft_rows(config: DFlashConfig, base_model_id: str, facts: dict[str, str]) -> list[tuple[str, str]]:
    h, k = config.hidden_size, len(config.target_layer_ids)
    layers = ", ".join(map(str, config.target_layer_ids))
    states = ", ".join(map(str, hidden_state_indices(config.target_layer_ids)))
    return [
        ("Target model", f"`{base_model_id}`"),
        ("Draft input", f"`fc` [{h} x {k * h}] over the outputs of target layers {layers} (`output_hidden_states` "
                        f"{states}), then `hidden_norm`: the context every draft layer attends to"),  # fmt: skip
        ("Block", f"{config.block_size} tokens: the target's last token, then {config.block_size - 1} masks (token "
                  f"{config.mask_token_id}); all drafted in one pass"),  # fmt: skip
        ("Draft layers", f"{config.num_hidden_layers} Qwen3 decoder layer(s), non-causal (hidden {h}, "
                         f"{config.num_attention_heads} attention / {config.num_key_value_heads} KV heads of "
                         f"{config.head_dim}, MLP {config.intermediate_size}); embedding and lm_head are the "
                         "target's (frozen, not stored)"),  # fmt: skip
        ("Weights", f"`{config.torch_dtype}` (`model.safetensors`, the engines' names)"),
        *facts.items(),
    ]


def _served_chain(config: DFlashConfig, evaluation: EvalReport | None) -> int:
    """The chain eval chose by measured latency (what export serves), else the whole block's B-1."""
    if evaluation is not None and evaluation.chain_search is not None:
        return evaluation.chain_search.chosen_size
    return config.block_size - 1


def _serve_section(
    config: DFlashConfig, repo_id: str | None, base_model_id: str, hub_id: str | None, chain: int
) -> str:
    where = repo_id or "<this-repo-or-folder>"
    serve_base = hub_id or base_model_id
    base_flag = shlex.quote(serve_base)
    size = config.block_size
    return f"""## Serve

vLLM (pinned: {VLLM_DFLASH_RELEASE}) and SGLang (pinned: {SGLANG_DFLASH_RELEASE}; CUDA, NPU or XPU) load this folder
as it is; both take the tokenizer, the token embeddings and the lm_head from the target. Each step drafts a chain:
vLLM of `num_speculative_tokens` = {chain} tokens ({chain_origin(chain, size)}), SGLang of the whole block
(`--speculative-num-draft-tokens` = {size}, the bonus token included).

**vLLM**:

```bash
{dflash_serve_command("vllm", where, serve_base, size, chain)}
```

**SGLang**:

```bash
{dflash_serve_command("sglang", where, serve_base, size)}
```

**medusa-forge** (a chain, or a tree of each position's top-k; CPU or GPU):

```bash
hf download {where} --local-dir draft
medusa-forge generate --draft draft --model {base_flag} --prompt "Explain KV caches in two sentences."
medusa-forge serve --draft draft --model {base_flag}
```
"""
