"""Hidden-state cache: run the frozen base model once over the tokenised data set, keep what the draft's loss
reads from it in one float16 file, and train every epoch from them.

What is kept per token is the draft kind's record (`DraftKind.record_layers`, `DraftKind.records`): Medusa heads
read the final hidden state [H]; an EAGLE-3 draft reads its three feature layers followed by the final hidden state,
[4H] (nothing vocabulary-sized is stored). meta.json says which (kind, layers, width).

Why: the base model is frozen, so its hidden states are the same in every epoch; recomputing them (what
the original trainer does) is most of the cost of epochs 2..N. The cache is keyed by a hash of the model's
weights and config and of every token id (which covers data, chat template and max length), so a stale
cache is never reused; other kinds' caches also hash the kind and layers (the default kind's keys are
unchanged, so Medusa caches written before other kinds existed stay valid). Building is resumable: progress is
recorded batch by batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from medusa_forge.drafts import default_kind, get_kind
from medusa_forge.drafts.shapes import padded_length
from medusa_forge.errors import UserError
from medusa_forge.modeling import input_device, named_weights

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
DATA_FILE, OFFSETS_FILE, PROGRESS_FILE, META_FILE = "hidden.f16", "offsets.npy", "progress.json", "meta.json"
RESERVE = 256 * 2**20  # left free on a disk: logs, metrics, the tokenizer files


class CacheTooLarge(UserError):
    """The disk cannot hold the cache; callers that can compute the frozen pass per batch catch this."""


def record_layout(base: PreTrainedModel, kind: str) -> tuple[list[int | str], int]:
    """(what each token's record holds, in order, as `output_hidden_states` indices or "final"; its width)."""
    layers = get_kind(kind).record_layers(base)
    return layers, len(layers) * base.get_output_embeddings().weight.shape[1]


def frozen_pass(
    base: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, kind: str | None = None
) -> torch.Tensor:
    """[B, T, width] records of one frozen forward (`record_layout`) for `kind` (default: the default kind), in the
    base model's dtype; no gradient. The per-batch path (no cache) and the cache build both use the kind's
    records, so both see the same numbers."""
    with torch.no_grad():
        return get_kind(kind or default_kind().name).records(base, input_ids, attention_mask)


def cache_key(base: PreTrainedModel, items: list[dict[str, list[int]]], kind: str | None = None) -> str:
    """Hash of the model (config + a checksum of every weight), of what is recorded, and of all token ids."""
    digest = hashlib.sha256(f"medusa-forge hidden cache v{FORMAT_VERSION}".encode())
    if kind is not None and kind != default_kind().name:  # the default kind's keys stay as they were
        layers, width = record_layout(base, kind)
        digest.update(f"kind={kind} layers={layers} width={width}".encode())
    digest.update(base.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        # Offloaded weights too: a dispatched target keys as the whole one. Summed in float64 without a float64
        # copy of the weight (an 8B-shaped vocabulary matrix's copy is 4.2 GB; the sums are bit-identical).
        for name, param in named_weights(base):
            digest.update(f"{name}:{tuple(param.shape)}:{float(param.sum(dtype=torch.float64)):.10e}".encode())
    for item in items:
        digest.update(np.asarray(item["input_ids"], dtype=np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:24]


class HiddenStateCache:
    """Read side: the records of sequence i as a [len_i, width] float16 tensor.

    Records are read from the file, not memory-mapped: the pages of a mapping count in the process's resident
    memory once touched, so one epoch over a mapped cache added the whole file to the training process's RSS (0.74 GB
    for 160k EAGLE-3 tokens; issue 27). Read pages stay in the kernel's page cache, shared and reclaimable."""

    def __init__(self, folder: Path) -> None:
        meta = json.loads((folder / META_FILE).read_text())
        # Caches written before the field existed are the default kind's (Medusa heads').
        self.kind = get_kind(meta.get("kind", default_kind().name))
        self.offsets = np.load(folder / OFFSETS_FILE)
        self.path, self.width = folder / DATA_FILE, meta["hidden"]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def get(self, index: int) -> torch.Tensor:
        start, stop = int(self.offsets[index]), int(self.offsets[index + 1])
        record = np.dtype(np.float16).itemsize * self.width
        rows = np.fromfile(self.path, dtype=np.float16, count=(stop - start) * self.width, offset=start * record)
        return torch.from_numpy(rows.reshape(stop - start, self.width))


def _batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped by similar length (little padding), at most max_tokens padded tokens per batch."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, current = [], []
    for index in order:
        if current and lengths[index] * (len(current) + 1) > max_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


@dataclass
class RunOutputs:
    """What the rest of a training run writes to --output_dir, in bytes, so the disk check can count it."""

    folder: Path
    checkpoint: int  # one checkpoint: the draft's weights + the optimizer's state
    copies: int  # checkpoints on disk at once (the newest is written before the oldest is removed)
    draft: int  # the final draft folder's weights

    @property
    def total(self) -> int:
        return self.copies * self.checkpoint + self.draft

    def describe(self) -> str:
        if not self.copies:
            return f"the draft {self.draft / 1e9:.2f} GB"
        return (
            f"{self.copies} checkpoint(s) x {self.checkpoint / 1e9:.2f} GB (draft weights + optimizer state) "
            f"+ the draft {self.draft / 1e9:.2f} GB"
        )


def run_outputs(draft: torch.nn.Module, folder: Path, save_strategy: str, save_total_limit: int | None) -> RunOutputs:
    """Estimated from parameter counts: weights as stored, plus AdamW's two float32 moments per trainable weight."""
    weights = sum(p.numel() * p.element_size() for p in draft.parameters())
    moments = sum(2 * 4 * p.numel() for p in draft.parameters() if p.requires_grad)
    # save_total_limit N: N kept, and one more while the newest is written; no limit: at least that many.
    copies = 0 if save_strategy == "no" else (save_total_limit or 1) + 1
    return RunOutputs(folder, weights + moments, copies, weights)


def _free_bytes(path: Path) -> tuple[int, int]:
    """(free bytes, device) of the file system `path` is or will be on (its nearest existing parent)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free, os.stat(path).st_dev


def check_output_space(outputs: RunOutputs) -> None:
    """Refuse before training when --output_dir's disk cannot hold the checkpoints and the draft."""
    free, _ = _free_bytes(outputs.folder)
    logger.warning("--output_dir %s will need %s (%.2f GB free)", outputs.folder, outputs.describe(), free / 1e9)
    if outputs.total > free - RESERVE:
        raise UserError(
            f"--output_dir {outputs.folder}: this run needs {outputs.total / 1e9:.2f} GB there ({outputs.describe()}) "
            f"but its disk has {free / 1e9:.2f} GB free: free space, choose another --output_dir, or save fewer "
            f"checkpoints (--save_strategy no: an interrupted run then starts over)"
        )


def build_hidden_cache(
    base: PreTrainedModel,
    items: list[dict[str, list[int]]],
    root: Path,
    max_tokens_per_batch: int = 8192,
    kind: str | None = None,
    outputs: RunOutputs | None = None,
) -> HiddenStateCache:
    """Load the cache for (base, items, kind; default: the default kind), building or finishing it first if
    needed. CacheTooLarge when the disk cannot hold it, with `outputs` (what the run writes next) when that goes
    to the same disk (nothing is written then)."""
    kind = kind or default_kind().name
    folder = root / cache_key(base, items, kind)
    if (folder / META_FILE).is_file():
        logger.warning("hidden-state cache: reusing %s", folder)
        return HiddenStateCache(folder)
    lengths = [len(item["input_ids"]) for item in items]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    layers, hidden_size = record_layout(base, kind)
    need = int(offsets[-1]) * hidden_size * 2
    folder.mkdir(parents=True, exist_ok=True)
    data_path = folder / DATA_FILE
    already = data_path.stat().st_size if data_path.exists() else 0
    free, device = _free_bytes(folder)
    # Checkpoints and the draft count here too when they go to the same disk: the run needs both.
    shared = outputs is not None and _free_bytes(outputs.folder)[1] == device
    also = f" + {outputs.describe()} at {outputs.folder}" if shared else ""
    logger.warning(
        "hidden-state cache: %d tokens x %d x float16 = %.2f GB at %s%s (%.1f GB free)",
        offsets[-1], hidden_size, need / 1e9, folder, also, free / 1e9,
    )  # fmt: skip
    total = need - already + (outputs.total if shared else 0)
    if total > free - RESERVE:
        if not any(folder.iterdir()):
            folder.rmdir()  # leave no empty cache folder behind
        raise CacheTooLarge(
            f"this run needs {total / 1e9:.2f} GB (the hidden-state cache {need / 1e9:.2f} GB{also}) but {folder} "
            f"has {free / 1e9:.2f} GB free: free space, point --medusa_hidden_cache_dir at a larger disk, lower "
            f"--max_samples/--model_max_length, or train without it (--medusa_hidden_cache False)"
        )
    np.save(folder / OFFSETS_FILE, offsets)
    mode = "r+" if already == need else "w+"
    data = np.memmap(data_path, dtype=np.float16, mode=mode, shape=(int(offsets[-1]), hidden_size))
    progress_path = folder / PROGRESS_FILE
    batches = _batches(lengths, max_tokens_per_batch)
    done = json.loads(progress_path.read_text())["batches"] if mode == "r+" and progress_path.exists() else 0
    if done:
        logger.warning("hidden-state cache: resuming at batch %d of %d", done, len(batches))
    device = input_device(base)
    with torch.inference_mode():
        for batch_index in tqdm(
            range(done, len(batches)), desc="caching hidden states", initial=done, total=len(batches)
        ):
            batch = batches[batch_index]
            width = padded_length(max(lengths[i] for i in batch), max(lengths))  # few shapes (drafts/shapes.py)
            input_ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                input_ids[row, : lengths[i]] = torch.tensor(items[i]["input_ids"])
                mask[row, : lengths[i]] = 1
            hidden = frozen_pass(base, input_ids.to(device), mask.to(device), kind)
            hidden = hidden.to(torch.float16).cpu().numpy()
            for row, i in enumerate(batch):
                data[offsets[i] : offsets[i + 1]] = hidden[row, : lengths[i]]
            data.flush()
            progress_path.write_text(json.dumps({"batches": batch_index + 1}))
    del data
    meta = {
        "tokens": int(offsets[-1]),
        "hidden": hidden_size,  # the record width
        "sequences": len(items),
        "version": FORMAT_VERSION,
        "kind": kind,
        "layers": layers,
    }
    (folder / META_FILE).write_text(json.dumps(meta))  # written last: marks the cache complete
    return HiddenStateCache(folder)


class CachedHiddenDataset(Dataset):
    """Items for training from the cache: hidden states instead of token ids (and the token ids too for a kind
    whose records need them)."""

    def __init__(self, items: list[dict[str, list[int]]], cache: HiddenStateCache) -> None:
        if len(items) != len(cache):
            raise ValueError("cache and data set differ in length")
        self.items, self.cache = items, cache

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = {"hidden_states": self.cache.get(index), "labels": self.items[index]["labels"]}
        if self.cache.kind.records_need_token_ids:
            item["input_ids"] = self.items[index]["input_ids"]
        return item
