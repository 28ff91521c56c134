"""Splits -> sharded, shuffled batches on the device, and the held-out validation split.

Training batches follow a TrainOrder: per-process batches from a ``DistributedSampler`` (shuffled,
seeded, ``set_epoch`` every epoch), or a global batch shared out the same way whatever the world
size; either way each rank sees a disjoint shard. Two paths give identical batches: ``loader`` (a DataLoader over the
host tensors) and ``resident`` (the whole split moved to the device once, batches gathered there by
index). Evaluation shards are ``rank::world`` slices without padding, so every test image is counted
exactly once.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

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


class TrainOrder:
    """Which training images each rank takes at each step of an epoch (``set_epoch`` first).

    Per-process batches (the default, --batch-size B): a ``DistributedSampler`` (shuffled by seed and
    epoch, padded so that every rank takes the same steps), each rank taking B of its own shard per
    step: the global batch is B x world size, and the order depends on the world size.

    A global batch (--global-batch-size G): the epoch's permutation (the same one the sampler draws) is
    cut into steps of G images, the last one shorter, and rank r of N takes positions r, r + N, ... of
    each step (G / N images; in a short last step, as many as fall to it). The images of every step,
    and their positions, are then the same for any N: the same run on any number of processes.
    """

    def __init__(self, n: int, world: int, rank: int, seed: int, batch_size: int, global_batch: int | None = None,
                 data_key: bytes = b""):
        self.n, self.world, self.rank, self.seed = n, world, rank, seed
        self.global_batch = global_batch
        self.batch_size = global_batch // world if global_batch else batch_size  # images per rank per full step
        self.data_key = data_key  # identifies the training images themselves (their digest, the split)
        # torch annotates the dataset as a Dataset; the sampler only takes its len()
        self.sampler: DistributedSampler[int] = DistributedSampler(
            range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed)  # type: ignore[arg-type]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        """Optimizer steps per epoch."""
        if self.global_batch:
            return math.ceil(self.n / self.global_batch)
        return math.ceil(len(self.sampler) / self.batch_size)

    def permutation(self) -> torch.Tensor:
        """The epoch's shuffle of 0..n-1: DistributedSampler's own (seed + epoch)."""
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))

    def steps(self, start_step: int = 0) -> list[torch.Tensor]:
        """This rank's image indices for each step of the epoch from ``start_step`` on."""
        if not self.global_batch:
            return list(torch.tensor(list(self.sampler), dtype=torch.long).split(self.batch_size))[start_step:]
        perm, g = self.permutation(), self.global_batch
        return [perm[k * g : min((k + 1) * g, self.n)][self.rank :: self.world] for k in range(start_step, len(self))]

    def step_images(self, step: int) -> int | None:
        """Images in the global batch of ``step`` (a global batch only; None for per-process batches)."""
        if not self.global_batch:
            return None
        return min(self.global_batch, self.n - step * self.global_batch)

    def digest(self) -> str:
        """SHA-256 of the epoch's order over every rank: the images, how they are cut into steps and shared
        out, and the permutation. Equal digests mean identical batches, step for step."""
        layout = (f"global {self.global_batch}" if self.global_batch
                  else f"per-process {self.batch_size} x {self.world}")
        h = hashlib.sha256(self.data_key)
        h.update(f"{layout}; n {self.n}; epoch {self.epoch}; ".encode())
        h.update(self.permutation().numpy().tobytes())
        return h.hexdigest()

    def describe(self) -> str:
        """For the plan: the batch and how it relates to the world size."""
        if self.global_batch:
            return (f"global batch {self.global_batch} ({self.batch_size} per process), the same run on any number "
                    "of processes")
        return f"{self.batch_size} per process, {self.batch_size * self.world} global"


class LoaderBatches:
    """Training batches through a DataLoader over host tensors (uint8 images, int64 labels)."""

    def __init__(self, split: Split, order: TrainOrder, device: torch.device):
        self.dataset = TensorDataset(split.images, split.labels)
        self.order, self.device = order, device

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)

    def epoch(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This epoch's batches from step ``start_step`` on (set_epoch already called)."""
        # its own generator: iterating must not draw from the global RNG that dropout uses, so both
        # paths train bit-identically, resumed or not
        loader = DataLoader(self.dataset, batch_sampler=[s.tolist() for s in self.order.steps(start_step)],
                            pin_memory=self.device.type == "cuda", generator=torch.Generator())
        for images, labels in loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


class ResidentBatches:
    """Training batches gathered on the device from a resident copy of the split (moved there once)."""

    def __init__(self, split: Split, order: TrainOrder, device: torch.device):
        self.split = split.to(device)
        self.order, self.device = order, device

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)

    def epoch(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This epoch's batches from step ``start_step`` on (set_epoch already called)."""
        steps = self.order.steps(start_step)
        if not steps:
            return
        # one host->device copy of this epoch's indices, then pure device-side gathers
        order = torch.cat(steps).to(self.device, non_blocking=True)
        for idx in order.split([len(s) for s in steps]):
            yield self.split.images.index_select(0, idx), self.split.labels.index_select(0, idx)


def train_batches(split: Split, order: TrainOrder, device: torch.device, resident: bool):
    return (ResidentBatches if resident else LoaderBatches)(split, order, device)


def eval_shard(n: int, world_size: int, rank: int) -> torch.Tensor:
    """Indices rank, rank + world, ...: disjoint across ranks, covering 0..n-1, no padding duplicates."""
    return torch.arange(min(rank, n), n, world_size)  # a rank beyond a tiny test set gets an empty shard


def eval_batches(split: Split, world_size: int, rank: int, batch_size: int, device: torch.device):
    """This rank's test images, each exactly once, in batches, on the device."""
    shard = eval_shard(len(split), world_size, rank)
    images, labels = split.images[shard].to(device), split.labels[shard].to(device)
    return list(zip(images.split(batch_size), labels.split(batch_size), strict=True))
