"""What packing a CPU's linear weights in oneDNN's layout (`generation/device.py` `pack_linear_weights`) buys a
decoding step of 1 to 16 rows (a plain step, a chain, a tree), per dtype this CPU can run:

1. the products alone: SmolLM2's 210 backbone weight matrices, one product each with R rows;
2. the whole model: one forward of R new tokens after 256 cached ones, lm_head over the R rows.

    .venv/bin/python bench/linear_packing.py [--rows 1,2,4,8,16] [--repeats 7] [--threads 2]

Medians in ms, each case's repeats back to back; on an idle machine (timings). Packing applies to float32
everywhere and to bfloat16 only where the CPU multiplies it natively (`packable_dtypes`), so "bfloat16, packed"
appears only there.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from transformers import AutoModelForCausalLM

from medusa_forge.defaults import smollm2_dir
from medusa_forge.generation.device import pack_linear_weights, packable_dtypes


def median_ms(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first warms up
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[1:])


@torch.no_grad()
def products(model: torch.nn.Module, rows: int, repeats: int) -> float:
    layers = [m for m in model.model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(rows, layer.in_features).to(layer.weight.dtype) for layer in layers]
    return median_ms(lambda: [layer(x) for layer, x in zip(layers, inputs, strict=True)], repeats)


@torch.no_grad()
def model_step(model: torch.nn.Module, rows: int, repeats: int, prefix: int = 256) -> float:
    vocab = model.config.vocab_size
    cache = model(torch.randint(0, vocab, (1, prefix)), use_cache=True).past_key_values

    def step() -> None:
        model(torch.randint(0, vocab, (1, rows)), cache=cache, use_cache=True, logits_to_keep=rows)
        cache.crop(-rows)

    return median_ms(step, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,2,4,8,16")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    header = "| | " + " | ".join(str(r) for r in rows) + " |"
    tables = {"products (210 weight matrices)": products, "whole model, 256 cached tokens": model_step}
    models = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=dtype).eval()
        models[f"{str(dtype)[6:]}"] = model
        if dtype in packable_dtypes():
            packed = copy.deepcopy(model)
            pack_linear_weights(packed)
            models[f"{str(dtype)[6:]}, packed"] = packed
    for title, measure in tables.items():
        print(f"\n{title}, ms per step of R rows (R = {args.rows}); {args.threads} threads\n")
        print(header)
        print("|---" * (len(rows) + 1) + "|")
        for name, model in models.items():
            cells = " | ".join(f"{measure(model, r, args.repeats):.1f}" for r in rows)
            print(f"| {name} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
