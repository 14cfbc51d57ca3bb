"""DataLoaders for training (an endless, seeded, sharded stream) and evaluation (each image once).

Training iterates by iteration, not by epoch, as detectron2 does: :class:`TrainingSampler` yields
an endless sequence of shuffled indices, the same for a given seed whatever the number of
processes, and each process takes every ``world_size``-th one. Each index comes with its own
augmentation seed, a function of the run's seed and the position in the stream, so a sample is
augmented identically whatever the number of workers or processes, and ``start`` (indices already
consumed) makes a resumed run see exactly the data it would have seen. Evaluation shards the images into
contiguous blocks, one per process (:class:`InferenceSampler`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist

from m2f_lite.data.build import collate


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)``: from torch.distributed when initialised, else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class TrainingSampler(torch.utils.data.Sampler[tuple[int, int]]):
    """Endless ``(index, augmentation seed)`` pairs: permutation after permutation of
    ``range(size)``, seeded by ``seed``; this process yields positions ``rank, rank + world_size,
    ...`` of that stream, starting after the first ``start`` it would have yielded. Datasets
    (``SegmentationDataset.__getitem__``) accept the pair as a key."""

    def __init__(
        self,
        size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        start: int = 0,
    ):
        if size <= 0:
            raise ValueError(f"TrainingSampler: the dataset is empty (size={size})")
        r, w = dist_info()
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world_size = (
            (r if rank is None else rank),
            (w if world_size is None else world_size),
        )
        self.start = start

    def _stream(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed)
        position = itertools.count()
        while True:
            order = (
                torch.randperm(self.size, generator=g) if self.shuffle else torch.arange(self.size)
            )
            for index in order.tolist():
                yield index, augmentation_seed(self.seed, next(position))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        first = self.rank + self.start * self.world_size
        return itertools.islice(self._stream(), first, None, self.world_size)


def augmentation_seed(seed: int, position: int) -> int:
    """A well-mixed 63-bit seed for the sample at ``position`` of the run seeded ``seed``."""
    return int(
        np.random.SeedSequence([seed, position]).generate_state(2, dtype=np.uint64)[0]
        >> np.uint64(1)
    )


class InferenceSampler(torch.utils.data.Sampler[int]):
    """Each index exactly once over all processes: process ``rank`` gets a contiguous block."""

    def __init__(self, size: int, *, rank: int | None = None, world_size: int | None = None):
        r, w = dist_info()
        rank, world_size = (r if rank is None else rank), (w if world_size is None else world_size)
        per = size // world_size + (1 if size % world_size else 0)
        self.indices = range(min(rank * per, size), min((rank + 1) * per, size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_train_loader(
    dataset,
    *,
    batch_size: int,
    num_workers: int = 0,
    seed: int = 0,
    start: int = 0,
    pin_memory: bool | None = None,
) -> torch.utils.data.DataLoader:
    """An endless loader of ``batch_size`` images per process (``(images, targets)`` batches).

    ``start`` is the number of batches already consumed (resume); augmentation seeds come with
    the indices (:class:`TrainingSampler`), so runs repeat exactly."""
    rank, _ = dist_info()
    sampler = TrainingSampler(len(dataset), seed=seed, start=start * batch_size)
    g = torch.Generator().manual_seed(seed * 1000 + rank + start)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=num_workers > 0,
        generator=g,
        drop_last=True,
    )


def build_test_loader(
    dataset, *, batch_size: int = 1, num_workers: int = 0
) -> torch.utils.data.DataLoader:
    """Every image once (sharded over processes), in order, as ``(images, targets)`` batches."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=InferenceSampler(len(dataset)),
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
    )
