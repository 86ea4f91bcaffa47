"""The layouts heads are read from and the engines they are written for, and what reading gives:
`LoadedHeads`, canonical tensors plus their config, which any writer takes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from medusa_forge.drafts.medusa_heads import MedusaConfig

OUR_LAYOUT = "medusa"  # what training, import and `MedusaHeads.save` write
LAYOUTS = {
    OUR_LAYOUT: "Medusa / TGI / TensorRT-LLM layout (config.json + medusa_lm_head.safetensors)",
    "medusa-pt": "original Medusa torch pickle (config.json + medusa_lm_head.pt)",
    "vllm": "vLLM Medusa layout (model_type medusa; blocks.{i}.layers.{j}.*, lm_heads.{i}.weight)",
    "full-checkpoint": "full model checkpoint whose weights carry a `medusa_head.` prefix",
}
FORMATS = ("tgi", "vllm", "tensorrt-llm")


@dataclass
class LoadedHeads:
    """Heads read from any layout, in canonical names, ready to be written in any other."""

    state: dict[str, torch.Tensor]
    config: MedusaConfig
    layout: str
    source: Path
    notes: list[str] = field(default_factory=list)

    @property
    def description(self) -> str:
        return f"{LAYOUTS[self.layout]} at {self.source}"


def describe(loaded: LoadedHeads) -> dict:
    dtype = str(next(iter(loaded.state.values())).dtype).removeprefix("torch.")
    return {**asdict(loaded.config), "dtype": dtype, "layout": loaded.layout}
