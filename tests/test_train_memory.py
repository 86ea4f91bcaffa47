"""Training memory stays flat after warm-up when the conversations differ in length (issue 27).

Each distinct matrix-product shape costs the kernel library memory where oneDNN runs the products (bfloat16 on a CPU
with native bfloat16: one cached primitive per shape), so a run whose batches were padded to their own longest row
and whose loss gathered a different number of labelled rows per batch grew by tens of MB per step. Both are checked
on a tiny model trained like the Trainer does (collated batches, forward, backward, AdamW): the resident memory of
the second epoch against the first's, and the product shapes the second epoch adds. Where float32 products run in
MKL (no native bfloat16) memory does not grow per shape, and the shape count is what catches a regression.
"""

import random
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from medusa_forge.data.tokenize import IGNORE_INDEX
from medusa_forge.drafts.eagle3_model import Eagle3Draft
from medusa_forge.drafts.eagle3_training import Eagle3ForTraining, step_weights
from medusa_forge.drafts.medusa_heads import MedusaHeads
from medusa_forge.drafts.medusa_training import MedusaForTraining, head_weights
from medusa_forge.generation.device import cpu_has_native_bfloat16
from medusa_forge.modeling import load_base_model
from medusa_forge.train.dataset import PadCollator

MAX_LENGTH, BATCH, CONVERSATIONS = 192, 4, 48
aten = torch.ops.aten
PRODUCTS = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.matmul, aten.linear}


class ProductShapes(TorchDispatchMode):
    """Records the input shapes of every matrix product run while active."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: set[tuple] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in PRODUCTS:
            self.shapes.add((func.overloadpacket, *(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))))
        return func(*args, **(kwargs or {}))


def rss_anon_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status RssAnon on this system")


def varied_items(vocab: int) -> list[dict[str, list[int]]]:
    """Conversations of 64 different lengths (8 .. MAX_LENGTH), the second part of each labelled (the reply)."""
    rng = random.Random(0)
    lengths = rng.sample(range(8, MAX_LENGTH + 1), CONVERSATIONS)
    items = []
    for length in lengths:
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        reply = length // 3
        items.append({"input_ids": ids, "labels": [IGNORE_INDEX] * reply + ids[reply:]})
    return items


def train_epochs(model: torch.nn.Module, items: list[dict], pad_token_id: int, epochs: int) -> list[dict]:
    """Per epoch: {"rss": RssAnon MB at its end, "shapes": product shapes seen in it}."""
    collate = PadCollator(pad_token_id, MAX_LENGTH)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    dtype = torch.bfloat16 if cpu_has_native_bfloat16() else None  # as `train --bf16 True` there
    order = list(range(len(items)))
    out = []
    for epoch in range(epochs):
        random.Random(epoch).shuffle(order)
        with ProductShapes() as recorder:
            for start in range(0, len(order), BATCH):
                batch = collate([items[i] for i in order[start : start + BATCH]])
                with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                    loss = model(**batch)["loss"]
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
        out.append({"rss": rss_anon_mb(), "shapes": recorder.shapes})
    return out


@pytest.mark.parametrize("kind", ["medusa", "eagle3"])
def test_memory_and_shapes_flat_after_warmup(kind, tiny_model_dir, tiny_tokenizer):
    base = load_base_model(str(tiny_model_dir))
    torch.manual_seed(0)
    if kind == "medusa":
        heads = MedusaHeads.for_base_model(base, 3, 1, str(tiny_model_dir))
        model = MedusaForTraining(base, heads, head_weights(3, 0.8))
    else:
        draft = Eagle3Draft.for_target(base, None, str(tiny_model_dir))
        model = Eagle3ForTraining(base, draft, step_weights(3, 0.8))
    model.train()
    items = varied_items(base.config.vocab_size)
    warm, *later = train_epochs(model, items, tiny_tokenizer.pad_token_id, epochs=2)
    seen = set(warm["shapes"])
    new = set().union(*(epoch["shapes"] for epoch in later)) - seen
    # 48 lengths in 12 batches per epoch: padded to their own longest row and gathering each batch's own number of
    # labelled rows, the second epoch brought 86 (Medusa) and 102 (EAGLE-3) new shapes; rounded to multiples of 64,
    # the first epoch meets all of them (0 new).
    assert len(new) <= 12, f"{len(new)} product shapes first seen after the first epoch (of {len(seen)} in it)"
    growth = later[-1]["rss"] - warm["rss"]
    assert growth < 64, f"resident memory grew {growth:.0f} MB after the first epoch"


@pytest.mark.parametrize("kind", ["medusa", "medusa-soft", "eagle3"])
def test_padding_to_a_multiple_leaves_losses_and_gradients_unchanged(kind, tiny_model_dir, tiny_tokenizer):
    """The same rows padded to their longest (70) or to the next multiple of 64 (128): padding is masked, so the
    losses, statistics and gradients agree to float noise."""
    base = load_base_model(str(tiny_model_dir))
    torch.manual_seed(0)
    if kind.startswith("medusa"):
        heads = MedusaHeads.for_base_model(base, 3, 1, str(tiny_model_dir))
        model = MedusaForTraining(base, heads, head_weights(3, 0.8), soft_labels=kind == "medusa-soft")
    else:
        model = Eagle3ForTraining(base, Eagle3Draft.for_target(base, None, str(tiny_model_dir)), step_weights(3, 0.8))
    first, *rest = varied_items(base.config.vocab_size)  # the first is longer than 70
    items = [{key: value[:70] for key, value in first.items()}, *[i for i in rest if len(i["input_ids"]) < 70][:2]]
    results = []
    for limit in (70, MAX_LENGTH):
        batch = PadCollator(tiny_tokenizer.pad_token_id, limit)(items)
        out = model(**batch)
        out["loss"].backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad()
        results.append((batch["labels"].shape[1], out["loss"].detach(), out["head_stats"], grads))
    (short, *exact), (padded, *bucketed) = results
    assert (short, padded) == (70, 128)
    torch.testing.assert_close(exact[0], bucketed[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(exact[1], bucketed[1], rtol=1e-5, atol=1e-4)
    for a, b in zip(exact[2], bucketed[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
