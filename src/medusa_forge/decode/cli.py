"""`medusa-forge generate`: stream an answer decoded with a draft of any kind, then report speed and acceptance."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import ClassVar, TextIO

from medusa_forge.decode.loading import base_model_field, draft_folder_field, draft_vocab_field
from medusa_forge.errors import UserError
from medusa_forge.generation.device import device_field, dtype_field
from medusa_forge.generation.sampling import SEED_MAX, SEED_MIN
from medusa_forge.generation.text import StreamedText
from medusa_forge.modeling import (
    check_target_flags,
    target_device_map_field,
    target_max_memory_field,
    target_offload_folder_field,
    target_placement,
)


@dataclass
class GenerateConfig:
    """Generate with a draft (Medusa heads or EAGLE-3; tree verification: greedy output equals plain greedy)."""

    UNDERSCORE_ALIASES: ClassVar[bool] = True

    draft: str = draft_folder_field()
    prompt: str = field(metadata={"help": "The user message (or plain text with --raw)."})
    model: str | None = base_model_field()
    system: str | None = field(default=None, metadata={"help": "Optional system message."})
    raw: bool = field(default=False, metadata={"help": "Do not apply the chat template; continue the text."})
    max_new_tokens: int = 256
    temperature: float = field(
        default=0.0,
        metadata={"help": "0 = greedy; > 0 = sampling: the base model's own distribution, exactly (any draft)."},
    )
    top_p: float = field(
        default=1.0, metadata={"help": "With --temperature > 0: sample among the most likely tokens covering this."}
    )
    seed: int | None = field(default=None, metadata={"help": "Sampling seed (with --temperature > 0)."})
    tree: str | None = field(
        default=None,
        metadata={
            "help": "Tree: a JSON file of choices, default-N (N nodes), or omitted: the tree `eval` stored in the "
            "draft folder, else default-16."
        },
    )
    draft_vocab: int | None = draft_vocab_field()
    dtype: str = dtype_field()
    device: str = device_field()
    target_device_map: str | None = target_device_map_field()
    target_max_memory: str | None = target_max_memory_field()
    target_offload_folder: str | None = target_offload_folder_field()

    def __post_init__(self) -> None:
        check_target_flags(self)
        if self.max_new_tokens < 1:
            raise UserError("--max-new-tokens must be at least 1")
        if self.temperature < 0:
            raise UserError("--temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p {self.top_p}: expected a number in (0, 1]")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise UserError(f"--seed {self.seed}: expected {SEED_MIN}..{SEED_MAX} (what torch's generators take)")


class TextStream:
    """Print the growing reply as it decodes, only what is new (`StreamedText` holds back half a character)."""

    def __init__(self, tokenizer, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout  # looked up now: sys.stdout may be replaced after import (tests capture it)
        self.tokens: list[int] = []
        self.text = StreamedText(tokenizer)

    def add(self, tokens: list[int], final: bool = False) -> None:
        self.tokens.extend(tokens)
        if delta := self.text.update(self.tokens, final):
            self.out.write(delta)
            self.out.flush()


def run_generate(config: GenerateConfig) -> int:
    """Stream the reply to stdout, then the speed and acceptance to stderr."""
    from medusa_forge.decode.generation import DecodeResult
    from medusa_forge.decode.loading import encode_prompt, load_draft
    from medusa_forge.decode.tree import resolve_tree
    from medusa_forge.generation.device import resolve_device
    from medusa_forge.generation.text import eos_token_ids

    placement = target_placement(config, resolve_device(config.device))
    loaded = load_draft(config.draft, config.model, config.dtype, config.device, config.draft_vocab, placement)
    base, tokenizer = loaded.base, loaded.tokenizer
    choices = resolve_tree(config.tree, config.draft, loaded.max_depth)
    decoder = loaded.decoder(choices)
    prompt = encode_prompt(tokenizer, config.prompt, raw=config.raw, system=config.system)
    result = DecodeResult([])
    stream = TextStream(tokenizer)
    start = time.perf_counter()
    for tokens in decoder.stream(
        prompt,
        config.max_new_tokens,
        eos_token_ids=eos_token_ids(base, tokenizer),
        temperature=config.temperature,
        top_p=config.top_p,
        seed=config.seed,
        result=result,
    ):
        stream.add(tokens)
    stream.add([], final=True)
    seconds = time.perf_counter() - start
    print(file=sys.stdout)
    print(
        f"[{len(result.tokens)} tokens in {seconds:.2f} s: {len(result.tokens) / seconds:.2f} tokens/s; "
        f"mean accepted tokens per step {result.mean_accept_length:.2f} over {result.steps} steps; "
        f"tree of {len(choices)} nodes; prompt {len(prompt)} tokens, prefill {result.prefill_seconds:.2f} s]",
        file=sys.stderr,
    )
    return 0
