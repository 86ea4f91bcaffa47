"""Hidden-state cache: run the frozen base model once over the tokenised data set, keep what the draft's loss
reads from it in files (float16, or float8 with per-token scales: `cache_records.py`), and train every epoch from
them.

What is kept per token is the draft kind's record (`DraftKind.record_layers`, `DraftKind.records`): Medusa heads
read the final hidden state [H]; an EAGLE-3 draft reads its three feature layers followed by the final hidden state,
[4H] (nothing vocabulary-sized is stored). meta.json says which (kind, layers, width, precision).

Why: the base model is frozen, so its hidden states are the same in every epoch; recomputing them (what
the original trainer does) is most of the cost of epochs 2..N. The cache is keyed by a hash of the model's files
(config and every weight file's bytes, `TargetFiles.fingerprint`), of the frozen pass's dtype, of the kind and its
record and its precision, and of every token id (which covers data, chat template and max length), so a stale
cache is never reused, and whether it is complete is known before the target is loaded (then it never is:
`target_files.py`).

Every process builds (under torchrun): the data's length-sorted batches are split between the processes that share
the cache folder (`cache_group.py`), balanced by padded tokens, and each writes its own shard (records, offsets, the
items it holds, its progress); the reader reads every shard, in the data's item order. A shard is the same whichever
process computes it, so a cache built by N processes is the one a single process builds. A rerun reuses finished
shards, whatever the number of processes that wrote them, and resumes unfinished ones when it has as many processes
(their batches are then the same); with another number, the items of unfinished shards are computed again and the
partial shards removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from medusa_forge.drafts import default_kind, get_kind
from medusa_forge.drafts.shapes import padded_length
from medusa_forge.errors import UserError
from medusa_forge.modeling import input_device
from medusa_forge.train.cache_group import CacheGroup, balance, cache_group, distributed, everywhere
from medusa_forge.train.cache_records import (
    DATA_FILES,
    SCALES_FILE,
    STORED,
    cache_plan,
    float8_decode,
    float8_encode,
    free_bytes,
    record_bytes,
    record_layout,
)
from medusa_forge.train.target_files import TargetFiles

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: keyed by the model's files, not its loaded weights; sharded by process
META_FILE, SHARD_PREFIX = "meta.json", "shard-"
OFFSETS_FILE, ITEMS_FILE, PROGRESS_FILE, DONE_FILE = "offsets.npy", "items.npy", "progress.json", "shard.json"
RESERVE = 256 * 2**20  # left free on a disk: logs, metrics, the tokenizer files


class CacheTooLarge(UserError):
    """The disk cannot hold the cache; callers that can compute the frozen pass per batch catch this."""


def frozen_pass(
    base: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, kind: str | None = None
) -> torch.Tensor:
    """[B, T, width] records of one frozen forward (`record_layout`) for `kind` (default: the default kind), in the
    base model's dtype; no gradient. The per-batch path (no cache) and the cache build both use the kind's
    records, so both see the same numbers."""
    with torch.no_grad():
        return get_kind(kind or default_kind().name).records(base, input_ids, attention_mask)


def cache_key(
    target: TargetFiles, items: list[dict[str, list[int]]], kind: str | None = None, precision: str = "float16"
) -> str:
    """Hash of the model's files (`TargetFiles.fingerprint`: config, dtype, every weight file), of what is recorded
    and at which precision, and of all token ids; computed without loading the model."""
    kind = kind or default_kind().name
    layers, width = record_layout(target.config, kind)
    digest = hashlib.sha256(f"medusa-forge hidden cache v{FORMAT_VERSION}".encode())
    digest.update(f"kind={kind} layers={layers} width={width} target={target.fingerprint}".encode())
    if precision != "float16":  # float16 caches keep the keys they had before precisions existed (still reused)
        digest.update(f" precision={precision}".encode())
    for item in items:
        digest.update(np.asarray(item["input_ids"], dtype=np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:24]


class HiddenStateCache:
    """Read side: the records of sequence i as a [len_i, width] float16 tensor (float8 records dequantised), from
    whichever shard holds them.

    Records are read from the file, not memory-mapped: the pages of a mapping count in the process's resident
    memory once touched, so one epoch over a mapped cache added the whole file to the training process's RSS (0.74 GB
    for 160k EAGLE-3 tokens; issue 27). Read pages stay in the kernel's page cache, shared and reclaimable."""

    def __init__(self, folder: Path) -> None:
        meta = json.loads((folder / META_FILE).read_text())
        self.kind = get_kind(meta["kind"])
        self.width = meta["hidden"]
        self.precision = meta.get("precision", "float16")  # caches written before precisions were float16
        self.parts = len(meta["layers"])
        self.shards = [folder / name for name in meta["shards"]]
        # Per item: (shard, first token, end token) in that shard's file.
        self.location = np.full((meta["sequences"], 3), -1, dtype=np.int64)
        for number, shard in enumerate(self.shards):
            order, offsets = np.load(shard / ITEMS_FILE), np.load(shard / OFFSETS_FILE)
            self.location[order] = np.stack([np.full(len(order), number), offsets[:-1], offsets[1:]], axis=1)

    def __len__(self) -> int:
        return len(self.location)

    def get(self, index: int) -> torch.Tensor:
        shard, start, stop = (int(x) for x in self.location[index])
        if shard < 0:
            raise IndexError(f"item {index} is in no shard of this cache")
        stored = np.dtype(STORED[self.precision])
        rows = np.fromfile(
            self.shards[shard] / DATA_FILES[self.precision],
            dtype=stored,
            count=(stop - start) * self.width,
            offset=start * stored.itemsize * self.width,
        ).reshape(stop - start, self.width)
        if self.precision == "float16":
            return torch.from_numpy(rows)
        scales = np.fromfile(
            self.shards[shard] / SCALES_FILE,
            dtype=np.float16,
            count=(stop - start) * self.parts,
            offset=start * self.parts * 2,
        )
        return float8_decode(rows, scales.reshape(stop - start, self.parts))


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


def check_output_space(outputs: RunOutputs) -> None:
    """Refuse before training when --output_dir's disk cannot hold the checkpoints and the draft."""
    free, _ = free_bytes(outputs.folder)
    logger.warning("--output_dir %s will need %s (%.2f GB free)", outputs.folder, outputs.describe(), free / 1e9)
    if outputs.total > free - RESERVE:
        raise UserError(
            f"--output_dir {outputs.folder}: this run needs {outputs.total / 1e9:.2f} GB there ({outputs.describe()}) "
            f"but its disk has {free / 1e9:.2f} GB free: free space, choose another --output_dir, or save fewer "
            f"checkpoints (--save_strategy no: an interrupted run then starts over)"
        )


def complete_cache(
    target: TargetFiles, items: list[dict[str, list[int]]], root: Path, kind: str, precision: str = "float16"
) -> bool:
    """Whether the cache for (target, items, kind, precision) under `root` is complete (then training needs no
    target pass)."""
    return (root / cache_key(target, items, kind, precision) / META_FILE).is_file()


def _finished_shards(folder: Path) -> dict[str, np.ndarray]:
    """Shard folder name -> the items it holds, for every finished shard in `folder`."""
    if not folder.is_dir():
        return {}
    return {
        shard.name: np.load(shard / ITEMS_FILE)
        for shard in sorted(folder.glob(SHARD_PREFIX + "*"))
        if (shard / DONE_FILE).is_file()
    }


def build_hidden_cache(
    base: PreTrainedModel | None,
    target: TargetFiles,
    items: list[dict[str, list[int]]],
    root: Path,
    max_tokens_per_batch: int = 8192,
    kind: str | None = None,
    outputs: RunOutputs | None = None,
    group: CacheGroup | None = None,
    precision: str = "float16",
) -> HiddenStateCache:
    """Load the cache for (target, items, kind; default: the default kind; records kept at `precision`: float16 or
    float8, `cache_records.py`), first computing with `base` (the
    target loaded from `target`'s files; None only when the cache is complete) this process's share of what is
    missing. Under torchrun every process calls it at once; `group`: who shares `root` (default: found out now,
    `cache_group`). CacheTooLarge
    when the disk cannot hold it, with `outputs` (what the run writes next) when that goes to the same disk
    (nothing is written then; raised by every process when one's disk is short)."""
    kind = kind or default_kind().name
    group = group or cache_group(root)
    folder = root / cache_key(target, items, kind, precision)
    layers, width = record_layout(target.config, kind)
    per_token = record_bytes(target.config, kind, precision)
    lengths = [len(item["input_ids"]) for item in items]
    complete = (folder / META_FILE).is_file()
    finished = {} if complete else _finished_shards(folder)
    covered = np.zeros(len(items), dtype=bool)
    for order in finished.values():
        covered[order] = True
    missing = [] if complete else [i for i in range(len(items)) if not covered[i]]
    # The batches a single process would compute (when nothing is cached yet), split between the group's processes.
    batches = [[missing[j] for j in batch] for batch in _batches([lengths[i] for i in missing], max_tokens_per_batch)]
    longest = max(lengths)
    costs = [len(batch) * padded_length(max(lengths[i] for i in batch), longest) for batch in batches]
    mine = [batches[b] for b in balance(costs, [1] * len(group.ranks))[group.index]]
    mine_items = [i for batch in mine for i in batch]
    name = hashlib.sha256(np.asarray(mine_items, dtype=np.int64).tobytes()).hexdigest()[:12]
    shard = folder / f"{SHARD_PREFIX}{group.index:05d}-of-{len(group.ranks):05d}-{name}"

    tokens, left = sum(lengths), sum(lengths[i] for i in missing)
    need = left * per_token
    already = _resumed_bytes(folder, finished, len(group.ranks))
    root.mkdir(parents=True, exist_ok=True)  # the disk measured is the one the cache goes to
    free, device = free_bytes(folder)
    # Checkpoints and the draft count here too when they go to the same disk: the run needs both.
    shared = outputs is not None and free_bytes(outputs.folder)[1] == device
    also = f" + {outputs.describe()} at {outputs.folder}" if shared else ""
    done = "complete" if complete else f"{(tokens - left) / max(tokens, 1):.0%} cached"
    logger.warning(
        "%s%s; %s; this process computes %d of the %d tokens left to %d process(es)",
        cache_plan(target.config, kind, tokens, folder, precision), also, done, sum(lengths[i] for i in mine_items),
        left, len(group.ranks),
    )  # fmt: skip
    total = max(need - already, 0) + (outputs.total if shared and not complete else 0)
    short = total > free - RESERVE
    if not all(everywhere([not short])):
        raise CacheTooLarge(
            (
                f"this run needs {total / 1e9:.2f} GB (the hidden-state cache {need / 1e9:.2f} GB{also}) but {folder} "
                f"has {free / 1e9:.2f} GB free"
                if short
                else f"another process's disk cannot hold its hidden-state cache (its log says which and how much; "
                f"{folder} here has {free / 1e9:.1f} GB free)"
            )
            + ": free space, point --medusa_hidden_cache_dir at a larger disk, lower --max_samples/--model_max_length, "
            + ("keep float8 records (--medusa_hidden_cache_precision float8), " if precision == "float16" else "")
            + "or train without it (--medusa_hidden_cache False)"
        )
    if mine:
        _build_shard(base, items, lengths, mine, shard, (len(layers), width, precision), kind, longest)
    if distributed():
        dist.barrier()
    if not complete and group.index == 0:
        _finish(folder, len(items), width, layers, kind, precision)
    if distributed():
        dist.barrier()
    return HiddenStateCache(folder)


def _resumed_bytes(folder: Path, finished: dict[str, np.ndarray], processes: int) -> int:
    """Bytes already written by the partial shards a run with as many processes resumes (the same split)."""
    return sum(
        path.stat().st_size
        for shard in folder.glob(f"{SHARD_PREFIX}*-of-{processes:05d}-*")
        if shard.name not in finished
        for path in (shard / name for name in (*DATA_FILES.values(), SCALES_FILE))
        if path.is_file()
    )


def _build_shard(
    base: PreTrainedModel | None,
    items: list[dict[str, list[int]]],
    lengths: list[int],
    batches: list[list[int]],
    shard: Path,
    record: tuple[int, int, str],
    kind: str,
    longest: int,
) -> None:
    """Compute and write the records of `batches` into `shard` (resuming where its progress says), then mark it
    finished. record: (parts, width, precision) of a token's record."""
    if (shard / DONE_FILE).is_file():
        return
    if base is None:
        raise ValueError("the cache is incomplete: building it needs the target model")
    order = [i for batch in batches for i in batch]
    offsets = np.concatenate([[0], np.cumsum([lengths[i] for i in order])]).astype(np.int64)
    start = {item: int(offset) for item, offset in zip(order, offsets[:-1], strict=True)}
    shard.mkdir(parents=True, exist_ok=True)
    parts, width, precision = record
    progress_path, tokens = shard / PROGRESS_FILE, int(offsets[-1])
    # The data file, and at float8 the scales beside it: (path, numpy dtype, shape).
    files = [(shard / DATA_FILES[precision], STORED[precision], (tokens, width))]
    if precision == "float8":
        files.append((shard / SCALES_FILE, np.float16, (tokens, parts)))
    resume = all(
        path.is_file() and path.stat().st_size == np.dtype(dtype).itemsize * shape[0] * shape[1]
        for path, dtype, shape in files
    )
    if not resume:
        np.save(shard / ITEMS_FILE, np.asarray(order, dtype=np.int64))
        np.save(shard / OFFSETS_FILE, offsets)
    maps = [np.memmap(path, dtype=dtype, mode="r+" if resume else "w+", shape=shape) for path, dtype, shape in files]
    done = json.loads(progress_path.read_text())["batches"] if resume and progress_path.is_file() else 0
    if done:
        logger.warning("hidden-state cache: %s resumes at batch %d of %d", shard.name, done, len(batches))
    device = input_device(base)
    with torch.inference_mode():
        for batch_index in tqdm(
            range(done, len(batches)), desc="caching hidden states", initial=done, total=len(batches)
        ):
            batch = batches[batch_index]
            padded = padded_length(max(lengths[i] for i in batch), longest)  # few shapes (drafts/shapes.py)
            input_ids = torch.zeros((len(batch), padded), dtype=torch.long)
            mask = torch.zeros((len(batch), padded), dtype=torch.long)
            for row, i in enumerate(batch):
                input_ids[row, : lengths[i]] = torch.tensor(items[i]["input_ids"])
                mask[row, : lengths[i]] = 1
            hidden = frozen_pass(base, input_ids.to(device), mask.to(device), kind).to(torch.float16).cpu()
            for row, i in enumerate(batch):
                # float8 quantises the float16 records, as bench/cache_precision.py measured it.
                stored = float8_encode(hidden[row, : lengths[i]], parts) if precision == "float8" else None
                for number, target in enumerate(maps):
                    target[start[i] : start[i] + lengths[i]] = (
                        stored[number] if stored else hidden[row, : lengths[i]].numpy()
                    )
            for target in maps:
                target.flush()
            progress_path.write_text(json.dumps({"batches": batch_index + 1}))
    del maps
    (shard / DONE_FILE).write_text(json.dumps({"sequences": len(order), "tokens": int(offsets[-1])}))


def _finish(folder: Path, sequences: int, width: int, layers: list[int | str], kind: str, precision: str) -> None:
    """Mark the cache complete (meta.json, written last) once its finished shards hold every item exactly once;
    remove the partial shards a run with another number of processes left."""
    finished = _finished_shards(folder)
    counts = np.zeros(sequences, dtype=np.int64)
    for order in finished.values():
        np.add.at(counts, order, 1)
    if not (counts == 1).all():
        raise RuntimeError(f"{folder}: its finished shards do not hold every item once ({np.bincount(counts)})")
    for path in folder.glob(SHARD_PREFIX + "*"):
        if path.name not in finished:
            shutil.rmtree(path)
    meta = {
        "tokens": int(sum(json.loads((folder / name / DONE_FILE).read_text())["tokens"] for name in finished)),
        "hidden": width,  # the record width
        "sequences": sequences,
        "version": FORMAT_VERSION,
        "kind": kind,
        "layers": layers,
        "precision": precision,
        "shards": sorted(finished),
    }
    (folder / META_FILE).write_text(json.dumps(meta))


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


