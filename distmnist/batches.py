"""Splits -> sharded, shuffled batches on the device, and the held-out validation split.

Training batches follow a ``DistributedSampler`` (shuffled, seeded, ``set_epoch`` every epoch), so
each rank sees a disjoint shard. Two paths give identical batches: ``loader`` (a DataLoader over the
host tensors) and ``resident`` (the whole split moved to the device once, batches gathered there by
index). Evaluation shards are ``rank::world`` slices without padding, so every test image is counted
exactly once.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from .data import Split
from .errors import DistmnistError


def split_validation(train: Split, n: int, seed: int) -> tuple[Split, Split]:
    """(train without them, validation): n images drawn with the seed, the same on every rank (whose
    data the digest check has shown identical). Both keep the images' order in the file; n = 0
    leaves the training set exactly as it was."""
    if not 0 < n < len(train):
        raise DistmnistError(f"--val-size {n} must be between 1 and {len(train) - 1}, the training images less one")
    held = torch.zeros(len(train), dtype=torch.bool)
    held[torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]] = True
    return Split(train.images[~held], train.labels[~held]), Split(train.images[held], train.labels[held])


def train_sampler(n: int, world_size: int, rank: int, seed: int) -> DistributedSampler:
    """The shard of each rank: shuffled by (seed, epoch), padded so every rank takes the same steps."""
    return DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)


class LoaderBatches:
    """Training batches through a DataLoader over host tensors (uint8 images, int64 labels)."""

    def __init__(self, split: Split, sampler: DistributedSampler, batch_size: int, device: torch.device):
        pin = device.type == "cuda"
        # its own generator: iterating must not draw from the global RNG that dropout uses, so both
        # paths train bit-identically
        self.loader = DataLoader(
            TensorDataset(split.images, split.labels), batch_size=batch_size, sampler=sampler, pin_memory=pin,
            generator=torch.Generator(),
        )
        self.sampler, self.device = sampler, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)

    def epoch(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This epoch's batches from step ``start_step`` on (the sampler's order, set_epoch already called)."""
        loader = self.loader
        if start_step:  # the same batches as an uninterrupted epoch, minus the first start_step
            rest = list(self.sampler)[start_step * self.loader.batch_size :]
            loader = DataLoader(self.loader.dataset, batch_size=self.loader.batch_size, sampler=rest,
                                pin_memory=self.loader.pin_memory)
        for images, labels in loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


class ResidentBatches:
    """Training batches gathered on the device from a resident copy of the split (moved there once)."""

    def __init__(self, split: Split, sampler: DistributedSampler, batch_size: int, device: torch.device):
        self.split = split.to(device)
        self.sampler, self.batch_size, self.device = sampler, batch_size, device

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)

    def epoch(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This epoch's batches from step ``start_step`` on (the sampler's order, set_epoch already called)."""
        # one host->device copy of this epoch's indices, then pure device-side gathers
        order = torch.tensor(list(self.sampler)[start_step * self.batch_size :], dtype=torch.long)
        order = order.to(self.device, non_blocking=True)
        for idx in order.split(self.batch_size):
            yield self.split.images.index_select(0, idx), self.split.labels.index_select(0, idx)


def train_batches(split: Split, sampler: DistributedSampler, batch_size: int, device: torch.device, resident: bool):
    return (ResidentBatches if resident else LoaderBatches)(split, sampler, batch_size, device)


def eval_shard(n: int, world_size: int, rank: int) -> torch.Tensor:
    """Indices rank, rank + world, ...: disjoint across ranks, covering 0..n-1, no padding duplicates."""
    return torch.arange(min(rank, n), n, world_size)  # a rank beyond a tiny test set gets an empty shard


def eval_batches(split: Split, world_size: int, rank: int, batch_size: int, device: torch.device):
    """This rank's test images, each exactly once, in batches, on the device."""
    shard = eval_shard(len(split), world_size, rank)
    images, labels = split.images[shard].to(device), split.labels[shard].to(device)
    return list(zip(images.split(batch_size), labels.split(batch_size)))
