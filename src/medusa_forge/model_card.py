"""The heads folder's README.md: a Hub model card with metadata and copy-paste serving snippets."""

from __future__ import annotations

from pathlib import Path

from medusa_forge.heads import MedusaConfig


def render_model_card(
    config: MedusaConfig, base_model_id: str, facts: dict[str, str], metrics: dict[str, float]
) -> str:
    """Markdown with a YAML header; `facts` are extra rows (training data, size), `metrics` head accuracies."""
    header = ["---", "library_name: medusa-forge", "tags:", "- medusa", "- speculative-decoding"]
    if "/" in base_model_id and not Path(base_model_id).exists():
        header.append(f"base_model: {base_model_id}")
    header.append("---")
    rows = [
        ("Base model", f"`{base_model_id}`"),
        ("Heads / layers per head", f"{config.medusa_num_heads} / {config.medusa_num_layers}"),
        *facts.items(),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    accuracy = ""
    heads = [i for i in range(config.medusa_num_heads) if f"medusa{i}_top1" in metrics]
    if heads:
        accuracy = (
            "\n## Head accuracy (held-out, teacher-forced)\n\n| head | predicts | top-1 | top-5 |\n|---|---|---|---|\n"
        )
        accuracy += "\n".join(
            f"| {i} | t+{i + 2} | {metrics[f'medusa{i}_top1']:.3f} "
            f"| {metrics.get(f'medusa{i}_top5', float('nan')):.3f} |"
            for i in heads
        )
    return f"""{chr(10).join(header)}

# Medusa heads for `{base_model_id}`

{config.medusa_num_heads} Medusa heads trained with [medusa-forge](https://pypi.org/project/medusa-forge/) on the
frozen base model. Head i predicts the token i+2 positions ahead; a decoding step verifies their guesses in one
forward pass of the base model, so generation is faster with identical greedy output.

| | |
|---|---|
{table}
{accuracy}

## Serve

TGI (this folder's layout: `config.json` + `medusa_lm_head.safetensors`):

```bash
text-generation-launcher --model-id <this-repo-or-folder> --speculate {config.medusa_num_heads}
```
"""
