"""What DDP changes in training: the model wrapped in DistributedDataParallel, and each
process's share of the training and test images (reidkit.run.distributed holds the processes
themselves: launching, joining, collectives)."""
from __future__ import annotations

from collections import Counter
from typing import Iterator, Sequence

import torch
import torch.nn as nn
from torch.utils.data import Sampler

from reidkit.data.datapath import dataset_of, loader_like
from reidkit.run import distributed
from reidkit.run.errors import UserError


def _generator(*seeds: int) -> torch.Generator:
    generator = torch.Generator()
    value = 0
    for seed in seeds:
        value = (value * 1_000_003 + int(seed)) % (2 ** 63)
    generator.manual_seed(value)
    return generator


class ShardedRandomSampler(Sampler):
    """Torchreid's RandomSampler split across processes: each epoch one permutation of the
    training set drawn from (seed, epoch), the same on every process; process r takes every
    world-th index from r. Every process gets the same count, so no process waits for a
    batch the others never send; the fewer than `world` images left over sit out one epoch."""

    def __init__(self, size: int, rank: int, world_size: int, seed: int):
        self.size, self.rank, self.world_size, self.seed = size, rank, world_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.world_size

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.size, generator=_generator(self.seed, self.epoch))
        return iter(order[self.rank:len(self) * self.world_size:self.world_size].tolist())


class ShardedIdentitySampler(Sampler):
    """The identity (P x K) sampler for LOSS='triplet' split across processes by identity:
    each epoch the identities are shuffled from (seed, epoch) and dealt out, so every image of
    an identity goes to one process and the triplet loss finds its positives there. Within a
    process a batch holds batch_size / num_instances identities with num_instances images each
    (an identity with fewer images repeats some, as Torchreid's sampler does). All processes
    stop at the smallest process's batch count; each computes every count itself (no messages)."""

    def __init__(self, pids: Sequence[int], batch_size: int, num_instances: int, rank: int,
                 world_size: int, seed: int):
        if batch_size % num_instances:
            raise UserError(f'BATCH_SIZE_TRAIN={batch_size} must be a multiple of the images '
                            f'per identity ({num_instances}) for LOSS=\'triplet\'.')
        self.pids = [int(pid) for pid in pids]
        self.batch_size, self.num_instances = batch_size, num_instances
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch = 0
        self.identities = sorted(set(self.pids))
        per_batch = batch_size // num_instances
        if len(self.identities) // world_size < per_batch:
            raise UserError(
                f'LOSS=\'triplet\' with {world_size} processes: each process gets '
                f'{len(self.identities) // world_size} of the {len(self.identities)} training '
                f'identities, fewer than the {per_batch} a batch of {batch_size} needs '
                f'({num_instances} images each). Use fewer processes or a smaller '
                f'BATCH_SIZE_TRAIN.')
        self._cached: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def identities_of(self, rank: int, epoch: int) -> list[int]:
        """This epoch's identities of `rank`: shuffled, then each dealt to the process holding
        the fewest images so far, so that no process runs out of batches long before another
        (all stop at the smallest count)."""
        counts = Counter(self.pids)
        order = torch.randperm(len(self.identities), generator=_generator(self.seed, epoch))
        held, mine = [0] * self.world_size, []
        for i in order.tolist():
            pid = self.identities[i]
            to = min(range(self.world_size), key=lambda r: (held[r], r))
            held[to] += max(counts[pid], self.num_instances)
            if to == rank:
                mine.append(pid)
        return mine

    def _batches(self, rank: int, epoch: int) -> list[list[int]]:
        generator = _generator(self.seed, epoch, rank + 1)
        by_identity: dict[int, list[int]] = {pid: [] for pid in self.identities_of(rank, epoch)}
        for index, pid in enumerate(self.pids):
            if pid in by_identity:
                by_identity[pid].append(index)
        k = self.num_instances
        chunks: dict[int, list[list[int]]] = {}
        for pid, indices in by_identity.items():
            if len(indices) < k:     # too few images: draw k with repeats
                picks = torch.randint(len(indices), (k,), generator=generator).tolist()
            else:
                picks = torch.randperm(len(indices), generator=generator).tolist()
            shuffled = [indices[i] for i in picks]
            chunks[pid] = [shuffled[i:i + k] for i in range(0, len(shuffled) - k + 1, k)]
        per_batch, batches = self.batch_size // k, []
        while True:
            ready = [pid for pid in chunks if chunks[pid]]
            if len(ready) < per_batch:
                return batches
            chosen = torch.randperm(len(ready), generator=generator)[:per_batch].tolist()
            batches.append([i for c in chosen for i in chunks[ready[c]].pop()])

    def _epoch_batches(self) -> list[list[int]]:
        if self._cached is None or self._cached[0] != self.epoch:
            every = [self._batches(rank, self.epoch) for rank in range(self.world_size)]
            count = min(len(batches) for batches in every)
            self._cached = (self.epoch, every[self.rank][:count])
        return self._cached[1]

    def __len__(self) -> int:
        return len(self._epoch_batches()) * self.batch_size

    def __iter__(self) -> Iterator[int]:
        return iter([index for batch in self._epoch_batches() for index in batch])


def shard_bounds(size: int, world_size: int) -> list[tuple[int, int]]:
    """Contiguous (start, end) per rank covering range(size), sizes differing by at most 1."""
    base, extra = divmod(size, world_size)
    bounds, start = [], 0
    for rank in range(world_size):
        end = start + base + (rank < extra)
        bounds.append((start, end))
        start = end
    return bounds


class ShardSampler(Sampler):
    """This rank's contiguous slice of a test set, in order (gathered back by `gather`)."""

    def __init__(self, size: int, rank: int, world_size: int):
        self.start, self.end = shard_bounds(size, world_size)[rank]

    def __len__(self) -> int:
        return self.end - self.start

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.end))


def shard_loaders(datamanager, seed: int) -> None:
    """Replaces the datamanager's samplers with this rank's shards (training: a new split
    every epoch; test: a fixed contiguous slice)."""
    process = distributed.current()
    rank, world = process.rank, process.world_size
    train = datamanager.train_loader
    data = dataset_of(train).data
    if type(train.sampler).__name__ == 'RandomIdentitySampler':
        sampler = ShardedIdentitySampler([item[1] for item in data], train.batch_size,
                                         train.sampler.num_instances, rank, world, seed)
    else:
        sampler = ShardedRandomSampler(len(data), rank, world, seed)
    datamanager.train_loader = loader_like(train, sampler=sampler)
    for name, splits in datamanager.test_loader.items():
        for split, loader in splits.items():
            if len(loader.dataset) < world:
                raise UserError(f'{name} {split}: {len(loader.dataset)} images, fewer than the '
                                f'{world} processes that would share them. Train with fewer '
                                f'processes.')
    datamanager.test_loader = {
        name: {split: loader_like(loader, sampler=ShardSampler(len(loader.dataset), rank,
                                                                world))
               for split, loader in splits.items()}
        for name, splits in datamanager.test_loader.items()}


def distributed_model(model: nn.Module, device: torch.device, channels_last: bool,
                      sync_bn: bool, frozen_layers: bool = False) -> nn.Module:
    """The model in DistributedDataParallel (SyncBatchNorm first with `sync_bn`, which needs
    CUDA: reidkit.data.checks refuses it elsewhere before any work), in the memory format the
    fast path will use (`channels_last`), so DDP's gradient buckets match the weights' layout.
    `frozen_layers` (FIXBASE_EPOCH): layers without gradients, which DDP must expect."""
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # keeps the same parameters
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == 'cuda' else None,
        find_unused_parameters=frozen_layers)
