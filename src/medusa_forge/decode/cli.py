"""`medusa-forge generate`: stream an answer decoded with Medusa heads, then report speed and acceptance."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from medusa_forge.errors import UserError
from medusa_forge.generation.text import StreamedText


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medusa-forge generate",
        description="Generate with Medusa heads (tree verification; greedy output equals plain greedy decoding).",
    )
    parser.add_argument("--heads", required=True, help="Heads folder written by `medusa-forge train`.")
    parser.add_argument("--model", help="Base model (default: base_model_name_or_path in the heads' config.json).")
    parser.add_argument("--prompt", required=True, help="The user message (or plain text with --raw).")
    parser.add_argument("--system", help="Optional system message.")
    parser.add_argument("--raw", action="store_true", help="Do not apply the chat template; continue the text.")
    parser.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 = typical acceptance.")
    parser.add_argument("--posterior-threshold", "--posterior_threshold", type=float, default=0.09)
    parser.add_argument("--posterior-alpha", "--posterior_alpha", type=float, default=0.3)
    parser.add_argument("--seed", type=int, help="Sampling seed (with --temperature > 0).")
    parser.add_argument(
        "--tree",
        help="Tree: a JSON file of choices, default-N (N nodes), or omitted: the tree `eval` stored in the heads "
        "folder, else default-16.",
    )
    parser.add_argument(
        "--draft-vocab",
        "--draft_vocab",
        type=int,
        help="Heads propose only token ids below N (cheaper heads on CPU; output unchanged). Default: the "
        "heads' draft_vocab_size from training, else the whole vocabulary.",
    )
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16.")
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, ...")
    return parser


class TextStream:
    """Print the growing reply as it decodes, only what is new (`StreamedText` holds back half a character)."""

    def __init__(self, tokenizer, out=sys.stdout) -> None:
        self.out = out
        self.tokens: list[int] = []
        self.text = StreamedText(tokenizer)

    def add(self, tokens: list[int], final: bool = False) -> None:
        self.tokens.extend(tokens)
        if delta := self.text.update(self.tokens, final):
            self.out.write(delta)
            self.out.flush()


def generate(args: argparse.Namespace) -> None:
    from medusa_forge.decode.generation import DecodeResult, MedusaDecoder
    from medusa_forge.decode.loading import encode_prompt, load_medusa
    from medusa_forge.decode.tree import resolve_tree
    from medusa_forge.generation.text import eos_token_ids

    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    if args.temperature < 0:
        raise UserError("--temperature must be >= 0")
    model, tokenizer = load_medusa(args.heads, args.model, args.dtype, args.device)
    choices = resolve_tree(args.tree, args.heads, len(model.heads))
    decoder = MedusaDecoder(model, choices, draft_vocab=args.draft_vocab)
    prompt = encode_prompt(tokenizer, args.prompt, raw=args.raw, system=args.system)
    result = DecodeResult([])
    stream = TextStream(tokenizer)
    start = time.perf_counter()
    for tokens in decoder.stream(
        prompt,
        args.max_new_tokens,
        eos_token_ids=eos_token_ids(model.base, tokenizer),
        temperature=args.temperature,
        posterior_threshold=args.posterior_threshold,
        posterior_alpha=args.posterior_alpha,
        seed=args.seed,
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


def cli_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        generate(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
