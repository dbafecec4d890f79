"""The training set's order and per-item seeds, so an epoch can stop anywhere and resume bit for bit.

    EpochSampler  this rank's share of the epoch's shuffled order (seed + epoch), as (epoch, index)
                  keys; `start` skips the samples an interrupted run already trained on
    SeededPairs   item (epoch, i) = dataset[i] drawn with the CPU generator seeded from (seed, epoch, i),
                  so the pixels of an epoch do not depend on loader workers, their persistence, or an
                  interruption
    resumable_loader  the train DataLoader over both (what `build_loaders` returns as `train`)
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class SeededPairs(Dataset):
    """Wraps the training dataset: item (epoch, i) is dataset[i] drawn with the CPU generator seeded from
    (seed, epoch, i), inside fork_rng so the caller's RNG stream is untouched. (Not torch.manual_seed:
    on a CUDA build it also queues a lazy CUDA seeding with a captured stack trace for every item.)"""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(hash((self.seed, epoch, i)) & (2**63 - 1))
            return self.dataset[i]


class EpochSampler(DistributedSampler):
    """This rank's share of the epoch's shuffled order (seed + epoch), as (epoch, index) keys;
    `start` skips the samples an interrupted run already trained on. With one process it is the whole
    shuffled set (drop_last: the tail that does not divide among the ranks is left out)."""

    def __init__(self, dataset: Dataset, world: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def __iter__(self):
        return iter([(self.epoch, i) for i in list(super().__iter__())[self.start:]])

    def __len__(self) -> int:
        return self.num_samples - self.start


def resumable_loader(dataset: Dataset, batch_size: int, world: int, rank: int, seed: int,
                     collate_fn: Callable, **options) -> tuple[DataLoader, EpochSampler]:
    """(loader, sampler): batches of `batch_size` (per process, drop_last) over SeededPairs + EpochSampler.
    `options` are the DataLoader's worker settings (num_workers, pin_memory, persistent_workers). Its own
    generator (workers' base seed) keeps the global RNG untouched. Call sampler.set_epoch(e) before each
    epoch and set sampler.start to resume inside one."""
    sampler = EpochSampler(dataset, world, rank, seed)
    loader = DataLoader(SeededPairs(dataset, seed), batch_size=batch_size, sampler=sampler, drop_last=True,
                        collate_fn=collate_fn, generator=torch.Generator().manual_seed(seed), **options)
    return loader, sampler
