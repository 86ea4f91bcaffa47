"""The processes that build and read one hidden-state cache together: who shares a cache folder (one group for a
folder every node sees, else one per node), the deterministic split of work between them, and, for a folder per
node, the sampler that keeps each process to its node's share of the training data."""

from __future__ import annotations

import math
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from medusa_forge.errors import UserError


@dataclass(frozen=True)
class CacheGroup:
    """The processes that share one cache folder and build it together, and how the run's processes fall into such
    groups: one group when the folder is shared by all nodes, else one per node."""

    groups: tuple[tuple[int, ...], ...]  # each group's global ranks, the groups in order of their first rank
    rank: int  # this process's global rank

    @property
    def ranks(self) -> tuple[int, ...]:
        return next(group for group in self.groups if self.rank in group)

    @property
    def index(self) -> int:
        """This process's place in its group."""
        return self.ranks.index(self.rank)

    @property
    def number(self) -> int:
        """Its group's place among the groups."""
        return self.groups.index(self.ranks)

    @property
    def shared(self) -> bool:
        return len(self.groups) == 1

def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

def _gathered(value: object) -> list:
    """`value` of every process, in rank order (itself alone without torch.distributed)."""
    if not distributed():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values

def everywhere(flags: object) -> list[bool]:
    """Every process's `all(flags)`: what all processes must decide alike (modules of one shape for DDP)."""
    return [bool(flag) for flag in _gathered(all(flags))]

def cache_group(root: Path) -> CacheGroup:
    """Which processes see the same `root`: each writes a file named after its rank into a folder new to this run,
    and after a barrier lists the files it sees there. One process alone: a group of one."""
    if not distributed():
        return CacheGroup(((0,),), 0)
    rank = dist.get_rank()
    run = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(run, src=0)
    marks = root / f".ranks-{run[0]}"
    marks.mkdir(parents=True, exist_ok=True)
    (marks / str(rank)).touch()
    dist.barrier()
    seen = tuple(sorted(int(path.name) for path in marks.iterdir()))
    views = _gathered(seen)
    dist.barrier()
    shutil.rmtree(marks, ignore_errors=True)  # every process of the group tries; one succeeds
    # The views must split the processes into groups that see each other's files and no one else's.
    if any(rank not in view or any(views[other] != view for other in view) for rank, view in enumerate(views)):
        raise UserError(
            f"--medusa_hidden_cache_dir {root}: the processes see different sets of each other's files there "
            f"({views}); use a folder that every node sees, or one on a disk local to each node"
        )
    return CacheGroup(tuple(sorted(set(views))), rank)

def balance(costs: list[int], weights: list[int]) -> list[list[int]]:
    """The indices of `costs` in len(weights) parts whose cost sums are about proportional to `weights`: largest
    first, each to the part it leaves least loaded for its weight (ties: the first part). Deterministic: every
    process computes the same split. Each part ascending."""
    parts: list[list[int]] = [[] for _ in weights]
    loads = [0] * len(weights)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        part = min(range(len(weights)), key=lambda p: ((loads[p] + costs[i]) / weights[p], p))
        parts[part].append(i)
        loads[part] += costs[i]
    return [sorted(part) for part in parts]

class NodeShareSampler(Sampler[int]):
    """For a cache folder each node has its own of: every process draws its batches only from its group's share of
    the training data (what its group cached), a fresh permutation of it each epoch, its group's shares dealt out
    to the group's processes. The sequence is the same on every process and laid out for accelerate, which gives
    process p the batches p, p + W, p + 2W, ... (W processes): batch s * W + p is process p's step s. Every process
    takes as many steps per epoch; a group with less data per process repeats some of it."""

    def __init__(self, share_sizes: list[int], groups: tuple[tuple[int, ...], ...], batch_size: int, seed: int) -> None:
        self.share_sizes, self.groups, self.batch_size, self.seed = share_sizes, groups, batch_size, seed
        self.epoch = 0
        self.steps = max(math.ceil(n / (len(g) * batch_size)) for n, g in zip(share_sizes, groups, strict=True))
        self.world = sum(len(group) for group in groups)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps * self.world * self.batch_size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        per_process: dict[int, list[int]] = {}
        for size, group in zip(self.share_sizes, self.groups, strict=True):
            order = torch.randperm(size, generator=generator).tolist()
            wanted = self.steps * len(group) * self.batch_size
            order = (order * math.ceil(wanted / size))[:wanted]
            for place, rank in enumerate(group):
                per_process[rank] = order[place :: len(group)]
        for step in range(self.steps):
            for rank in range(self.world):
                yield from per_process[rank][step * self.batch_size : (step + 1) * self.batch_size]
