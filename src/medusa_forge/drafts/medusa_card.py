"""The model card of Medusa heads (`MEDUSA.render_card`): what the heads are, how well they predict, and the TGI,
vLLM and TensorRT-LLM commands that serve them (built by engine_commands, as `export` prints them)."""

from __future__ import annotations

from medusa_forge.drafts.card import (
    CARD_MARKER,
    accuracy_sections,
    evaluation_summary,
    header_lines,
    headline_rows,
    hub_base_id,
)
from medusa_forge.drafts.medusa_heads import MedusaConfig
from medusa_forge.engine_commands import vllm_medusa_command
from medusa_forge.engine_versions import EAGLE3_ONLY, TENSORRT_LLM_MEDUSA_RELEASE, TGI_IMAGE, VLLM_MEDUSA_RELEASE
from medusa_forge.results import EvalReport


def render_card(
    config: MedusaConfig,
    base_model_id: str,
    facts: dict[str, str],
    metrics: dict[str, float],
    evaluation: EvalReport | None,
    repo_id: str | None,
    metric_label: str,
    metric_name: str,
    first_predictor: int,
    layout: str = "medusa",
) -> str:
    """The card of a heads folder. `layout`: the folder's ("medusa" = TGI's, or "vllm"), which decides which engine
    reads it as-is."""
    k = config.medusa_num_heads
    hub_id = hub_base_id(base_model_id)
    header = header_lines(("medusa", "speculative-decoding", "medusa-heads"), hub_id)
    rows = [
        ("Base model", f"`{base_model_id}`"),
        ("Heads / residual blocks per head", f"{k} / {config.medusa_num_layers}"),
        ("Hidden size / vocabulary", f"{config.hidden_size} / {config.vocab_size}"),
        *facts.items(),
    ]
    if getattr(config, "draft_vocab_size", None):
        rows.append(
            (
                "Draft vocabulary",
                f"trained on ids < {config.draft_vocab_size}: `medusa-forge generate/eval/serve` propose only those; "
                f"TGI, vLLM and TensorRT-LLM propose from all {config.vocab_size} ids (rows >= "
                f"{config.draft_vocab_size} keep the base lm_head's weights)",
            )
        )
    summary = evaluation_summary(evaluation)
    rows += headline_rows(summary)
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)

    title = "Head accuracy (held-out, teacher-forced, at the end of training)"
    sections = accuracy_sections(title, metric_label, metric_name, metrics, summary, first_predictor)

    where = repo_id or "<this-repo-or-folder>"
    serve_base = hub_id or base_model_id
    body = "\n\n".join(sections)
    if layout == "vllm":
        title_intro, serve = _vllm_layout(base_model_id, k, where, serve_base)
    else:
        title_intro, serve = _tgi_layout(base_model_id, k, where, serve_base)
    return f"""{chr(10).join(header)}
{CARD_MARKER}

{title_intro}

| | |
|---|---|
{table}

{body}

## Serve

{serve}"""


def _vllm_layout(base_model_id: str, k: int, where: str, serve_base: str) -> tuple[str, str]:
    """(title and introduction, how to serve) of heads in vLLM's layout."""
    title_intro = f"""# Medusa heads for `{base_model_id}` (vLLM layout)

{k} Medusa heads in vLLM's layout (`model_type: medusa`, `blocks.*`, `lm_heads.*`), exported by
[medusa-forge](https://pypi.org/project/medusa-forge/). Head i predicts the token i+2 positions ahead."""
    serve = f"""Medusa heads load in vLLM up to {VLLM_MEDUSA_RELEASE} (0.33 removed Medusa):

```bash
{vllm_medusa_command(serve_base, where, k)}
```

For TGI or TensorRT-LLM: `hf download {where} --local-dir heads && medusa-forge export --draft heads --format tgi
--output-dir heads-tgi` (or `--format tensorrt-llm`).
"""
    return title_intro, serve


def _tgi_layout(base_model_id: str, k: int, where: str, serve_base: str) -> tuple[str, str]:
    """(title and introduction, how to serve) of heads in this project's (= TGI's) layout."""
    title_intro = f"""# Medusa heads for `{base_model_id}`

{k} Medusa heads trained with [medusa-forge](https://pypi.org/project/medusa-forge/) on the frozen base
model. Head i predicts the token i+2 positions ahead; each decoding step verifies their guesses in one forward
pass of the base model, so generation is faster and greedy output is unchanged."""
    serve = f"""Medusa heads load in TGI's last release, vLLM up to {VLLM_MEDUSA_RELEASE} and TensorRT-LLM
{TENSORRT_LLM_MEDUSA_RELEASE}; {EAGLE3_ONLY}.

**TGI** reads this layout as-is (`config.json` + `medusa_lm_head.safetensors`; it loads the base model named in
`config.json`). `--speculate` must be at most {k}:

```bash
text-generation-launcher --model-id {where} --speculate {k}
# or with docker:
docker run --gpus all --shm-size 1g -p 8080:80 {TGI_IMAGE} \\
    --model-id {where} --speculate {k}
```

**vLLM** needs its own names and config; convert, then serve:

```bash
hf download {where} --local-dir heads
medusa-forge export --draft heads --format vllm --output-dir heads-vllm
{vllm_medusa_command(serve_base, "heads-vllm", k)}
```

**TensorRT-LLM {TENSORRT_LLM_MEDUSA_RELEASE}**: `medusa-forge export --draft heads --format tensorrt-llm
--output-dir heads-trt` prints the `convert_checkpoint.py --medusa_model_dir` and `trtllm-build` commands
(`examples/medusa` of the v{TENSORRT_LLM_MEDUSA_RELEASE} source tree; main no longer has it).
"""
    return title_intro, serve
