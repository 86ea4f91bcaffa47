"""Hidden-state cache: run the frozen base model once over the tokenised data set, keep its final hidden
states on disk (float16, memory-mapped), and train every epoch from them.

Why: the base model is frozen, so its hidden states are the same in every epoch; recomputing them (what
the original trainer does) is most of the cost of epochs 2..N. The cache is keyed by a hash of the model's
weights and config and of every token id (which covers data, chat template and max length), so a stale
cache is never reused. Building is resumable: progress is recorded batch by batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from medusa_forge.errors import UserError
from medusa_forge.heads import backbone

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
DATA_FILE, OFFSETS_FILE, PROGRESS_FILE, META_FILE = "hidden.f16", "offsets.npy", "progress.json", "meta.json"


def cache_key(base: PreTrainedModel, items: list[dict[str, list[int]]]) -> str:
    """Hash of the model (config + a checksum of every weight) and of all token ids, in order."""
    digest = hashlib.sha256(f"medusa-forge hidden cache v{FORMAT_VERSION}".encode())
    digest.update(base.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, param in base.named_parameters():
            digest.update(f"{name}:{tuple(param.shape)}:{float(param.double().sum()):.10e}".encode())
    for item in items:
        digest.update(np.asarray(item["input_ids"], dtype=np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:24]


class HiddenStateCache:
    """Read side: hidden states of sequence i as a [len_i, H] float16 tensor."""

    def __init__(self, folder: Path) -> None:
        meta = json.loads((folder / META_FILE).read_text())
        self.offsets = np.load(folder / OFFSETS_FILE)
        self.data = np.memmap(folder / DATA_FILE, dtype=np.float16, mode="r", shape=(meta["tokens"], meta["hidden"]))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def get(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.data[self.offsets[index] : self.offsets[index + 1]]))


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


def build_hidden_cache(
    base: PreTrainedModel, items: list[dict[str, list[int]]], root: Path, max_tokens_per_batch: int = 8192
) -> HiddenStateCache:
    """Load the cache for (base, items), building or finishing it first if needed."""
    folder = root / cache_key(base, items)
    if (folder / META_FILE).is_file():
        logger.warning("hidden-state cache: reusing %s", folder)
        return HiddenStateCache(folder)
    lengths = [len(item["input_ids"]) for item in items]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    hidden_size = base.get_output_embeddings().weight.shape[1]
    need = int(offsets[-1]) * hidden_size * 2
    folder.mkdir(parents=True, exist_ok=True)
    data_path = folder / DATA_FILE
    already = data_path.stat().st_size if data_path.exists() else 0
    free = shutil.disk_usage(folder).free
    logger.warning(
        "hidden-state cache: %d tokens x %d x float16 = %.2f GB at %s (%.1f GB free)",
        offsets[-1], hidden_size, need / 1e9, folder, free / 1e9,
    )  # fmt: skip
    if need - already > free - 256 * 2**20:
        raise UserError(
            f"the hidden-state cache needs {need / 1e9:.2f} GB but {folder} has {free / 1e9:.2f} GB free: "
            f"free space, point --medusa_hidden_cache_dir at a larger disk, lower --max_samples/--model_max_length, "
            f"or train without it (--medusa_hidden_cache False)"
        )
    np.save(folder / OFFSETS_FILE, offsets)
    mode = "r+" if already == need else "w+"
    data = np.memmap(data_path, dtype=np.float16, mode=mode, shape=(int(offsets[-1]), hidden_size))
    progress_path = folder / PROGRESS_FILE
    batches = _batches(lengths, max_tokens_per_batch)
    done = json.loads(progress_path.read_text())["batches"] if mode == "r+" and progress_path.exists() else 0
    if done:
        logger.warning("hidden-state cache: resuming at batch %d of %d", done, len(batches))
    device = next(base.parameters()).device
    model = backbone(base)
    with torch.inference_mode():
        for batch_index in tqdm(
            range(done, len(batches)), desc="caching hidden states", initial=done, total=len(batches)
        ):
            batch = batches[batch_index]
            width = max(lengths[i] for i in batch)
            input_ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                input_ids[row, : lengths[i]] = torch.tensor(items[i]["input_ids"])
                mask[row, : lengths[i]] = 1
            hidden = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)
            hidden = hidden.last_hidden_state.to(torch.float16).cpu().numpy()
            for row, i in enumerate(batch):
                data[offsets[i] : offsets[i + 1]] = hidden[row, : lengths[i]]
            data.flush()
            progress_path.write_text(json.dumps({"batches": batch_index + 1}))
    del data
    meta = {"tokens": int(offsets[-1]), "hidden": hidden_size, "sequences": len(items), "version": FORMAT_VERSION}
    (folder / META_FILE).write_text(json.dumps(meta))  # written last: marks the cache complete
    return HiddenStateCache(folder)


class CachedHiddenDataset(Dataset):
    """Items for training from the cache: hidden states instead of token ids."""

    def __init__(self, items: list[dict[str, list[int]]], cache: HiddenStateCache) -> None:
        if len(items) != len(cache):
            raise ValueError("cache and data set differ in length")
        self.items, self.cache = items, cache

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return {"hidden_states": self.cache.get(index), "labels": self.items[index]["labels"]}
