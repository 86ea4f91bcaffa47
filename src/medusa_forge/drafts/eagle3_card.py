"""The model card of an EAGLE-3 draft (`EAGLE3.render_card`): what the draft is, how it was trained, what eval
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
from medusa_forge.drafts.eagle3_config import ENGINE_MIN_TARGET_LAYERS, Eagle3Config, target_layers
from medusa_forge.engine_commands import EAGLE3_SPECULATIVE_TOKENS, eagle3_serve_command
from medusa_forge.engine_versions import SGLANG_EAGLE3_RELEASE, VLLM_EAGLE3_RELEASE
from medusa_forge.results import EvalReport


def _feature_layers(target_num_layers: int | None) -> str:
    if target_num_layers is None:
        return "the target's hidden states 2, L//2 and L-3 (L = its number of layers), as vLLM and SGLang read them"
    low, mid, high = target_layers(target_num_layers)
    return (
        f"the target's hidden states {low}, {mid} and {high} of {target_num_layers} layers (`output_hidden_states` "
        "indices, 0 = the embeddings)"
    )


def render_card(
    config: Eagle3Config,
    base_model_id: str,
    facts: dict[str, str],
    metrics: dict[str, float],
    evaluation: EvalReport | None,
    repo_id: str | None,
    metric_label: str,
    metric_name: str,
    first_predictor: int,
    target_num_layers: int | None = None,
) -> str:
    """The card of an EAGLE-3 draft folder: what the draft is, how it was trained (`facts`, held-out per-step
    `metrics` `eagle3_step{j}_top1/top5`), what eval measured, and the vLLM, SGLang and medusa-forge commands
    that serve it (from `repo_id` when given)."""
    hub_id = hub_base_id(base_model_id)
    header = header_lines(("eagle3", "speculative-decoding", "medusa-forge"), hub_id)
    rows = _draft_rows(config, base_model_id, facts, target_num_layers)
    summary = evaluation_summary(evaluation)
    rows += headline_rows(summary)
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)

    title = "Draft accuracy per step (held-out, training-time test, at the end of training)"
    sections = accuracy_sections(title, metric_label, metric_name, metrics, summary, first_predictor)
    body = "\n\n".join(sections)

    return f"""{chr(10).join(header)}
{CARD_MARKER}

# EAGLE-3 draft for `{base_model_id}`

An EAGLE-3 draft trained with [medusa-forge](https://pypi.org/project/medusa-forge/) on the frozen target model.
From the target's hidden states and the token just chosen it drafts the next tokens one after the other, feeding
back its own state; the target verifies them in one forward pass, so generation is faster and greedy output is
unchanged.

| | |
|---|---|
{table}

{body}

{_serve_section(repo_id, base_model_id, hub_id, target_num_layers)}"""


def _draft_rows(
    config: Eagle3Config, base_model_id: str, facts: dict[str, str], target_num_layers: int | None
) -> list[tuple[str, str]]:
    """The card's table rows about the draft: its target, input, layer, vocabulary, weights and training facts."""
    h, v, vd = config.hidden_size, config.vocab_size, config.draft_vocab_size
    vocabulary = (
        f"{vd} of the target's {v} tokens, the training data's most frequent answer tokens (`d2t` maps draft ids "
        "to target ids, `t2d` marks them)"
        if vd < v
        else f"the target's whole vocabulary ({v} tokens)"
    )
    rows = [
        ("Target model", f"`{base_model_id}`"),
        ("Draft input", f"`fc` [{h} x {3 * h}] over {_feature_layers(target_num_layers)}"),
        (
            "Draft layer",
            f"one Llama decoder layer (hidden {h}, {config.num_attention_heads} attention / "
            f"{config.num_key_value_heads} KV heads of {config.head_dim}, MLP {config.intermediate_size}), norm, "
            "lm_head; token embeddings are the target's (frozen, not stored)",
        ),
        ("Draft vocabulary", vocabulary),
        *([("EAGLE 3.1", eagle31_switches(config))] if config.fc_norm or config.norm_output else []),
        ("Weights", f"`{config.torch_dtype}` (`model.safetensors`, the engines' names)"),
        *facts.items(),
    ]
    return rows


def _serve_section(repo_id: str | None, base_model_id: str, hub_id: str | None, target_num_layers: int | None) -> str:
    """The card's "Serve" section: the vLLM, SGLang and medusa-forge commands (from `repo_id` when given), or why no
    engine serves a draft for a target this shallow."""
    where = repo_id or "<this-repo-or-folder>"
    serve_base = hub_id or base_model_id
    base_flag = shlex.quote(serve_base)
    engines = (
        f"vLLM (>= 0.32; pinned: {VLLM_EAGLE3_RELEASE}) and SGLang (pinned: {SGLANG_EAGLE3_RELEASE}) load this folder "
        "as it is"
    )
    if target_num_layers is not None and target_num_layers < ENGINE_MIN_TARGET_LAYERS:
        engines = (
            f"**No engine serves this draft**: its target has {target_num_layers} layers, and vLLM and SGLang read "
            f"the target's hidden states 2, L//2 and L-3, which need at least {ENGINE_MIN_TARGET_LAYERS}. The commands "
            f"below are what a draft for a larger target runs; {engines}"
        )
    return f"""## Serve

{engines}; both take the tokenizer and the token embeddings from the target.
Each step drafts a chain of {EAGLE3_SPECULATIVE_TOKENS} tokens (vLLM: `num_speculative_tokens`; SGLang:
`--speculative-num-steps` with `--speculative-eagle-topk 1`, verifying steps + 1 tokens).

**vLLM**:

```bash
{eagle3_serve_command("vllm", where, serve_base)}
```

**SGLang**:

```bash
{eagle3_serve_command("sglang", where, serve_base)}
```

**medusa-forge** (tree drafting, as `medusa-forge eval` measured it; CPU or GPU):

```bash
hf download {where} --local-dir draft
medusa-forge generate --draft draft --model {base_flag} --prompt "Explain KV caches in two sentences."
medusa-forge serve --draft draft --model {base_flag}
```
"""


def eagle31_switches(config: Eagle3Config) -> str:
    """What EAGLE 3.1's switches (config.json `fc_norm`, `norm_output`) make the draft do, for cards and reports."""
    parts = []
    if config.fc_norm:
        parts.append("`fc_norm`: each feature layer RMS-normalised before `fc`")
    if config.norm_output:
        parts.append("`norm_output`: each step feeds the next its post-norm state")
    return "; ".join(parts) or "off"
