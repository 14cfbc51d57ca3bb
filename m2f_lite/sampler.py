"""The training data stream: deterministic, resumable, and the same for any number of processes.

detectron2 trains on an infinite stream of shuffled indices (``TrainingSampler``). Here the stream
is a pure function of ``(seed, position)``:

- position ``p`` (the ``p``-th image of the run) is image ``perm_e[p mod n]`` of epoch ``e = p // n``,
  ``perm_e`` a permutation drawn from ``torch.Generator().manual_seed(seed + e)``;
- its augmentation draws from its own generator, seeded from ``(seed, p)``, whatever process or
  DataLoader worker loads it.

Optimizer step ``it`` consumes positions ``[it·B, (it+1)·B)`` (``B`` = ``solver.ims_per_batch``,
the global batch). With ``W`` processes and ``A`` accumulation steps, process ``r`` takes the
contiguous block ``r·B/W .. (r+1)·B/W`` of each global batch and splits it into ``A`` micro-batches.
So the images of a step are the same for 1 process with batch ``B``, ``W`` processes with ``B/W``
each, or ``A`` micro-batches of ``B/A``; and resuming after ``it`` steps needs only ``it``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def sample_seed(seed: int, position: int) -> int:
    """The augmentation seed of stream position ``position`` (a 63-bit int from numpy's SeedSequence)."""
    state = np.random.SeedSequence([seed, position]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """An endless stream of this process's micro-batches, each a list of ``(index, seed)`` pairs.

    Args:
        size: images in the dataset (``n``).
        global_batch: images per optimizer step over all processes (``B``).
        world_size, rank: the processes (``W``) and this one (``r``).
        grad_accum: micro-batches per optimizer step (``A``); ``B`` must divide by ``W·A``.
        seed: the stream's seed (``cfg.seed``).
        start_iter: optimizer steps already done (resume).
    """

    def __init__(
        self,
        *,
        size: int,
        global_batch: int,
        world_size: int = 1,
        rank: int = 0,
        grad_accum: int = 1,
        seed: int = 0,
        start_iter: int = 0,
    ) -> None:
        if size <= 0:
            raise ValueError("the training dataset is empty")
        if global_batch % (world_size * grad_accum) != 0:
            raise ValueError(
                f"solver.ims_per_batch={global_batch} must be divisible by processes × "
                f"solver.grad_accum = {world_size} × {grad_accum}"
            )
        self.size, self.global_batch, self.seed = size, global_batch, seed
        self.world_size, self.rank, self.grad_accum = world_size, rank, grad_accum
        self.micro_batch = global_batch // (world_size * grad_accum)
        self.start_iter = start_iter
        self._orders: dict[int, list[int]] = {}

    def permutation(self, epoch: int) -> list[int]:
        """The order of epoch ``epoch`` (the last two epochs are kept: a batch may span both)."""
        if epoch not in self._orders:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = torch.randperm(self.size, generator=g).tolist()
        return self._orders[epoch]

    def item(self, position: int) -> tuple[int, int]:
        """``(dataset index, augmentation seed)`` of stream position ``position``."""
        epoch, offset = divmod(position, self.size)
        return self.permutation(epoch)[offset], sample_seed(self.seed, position)

    def positions(self, iteration: int, micro: int) -> range:
        """The stream positions of micro-batch ``micro`` of step ``iteration`` on this process."""
        start = (
            iteration * self.global_batch + (self.rank * self.grad_accum + micro) * self.micro_batch
        )
        return range(start, start + self.micro_batch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        iteration = self.start_iter
        while True:
            for micro in range(self.grad_accum):
                yield [self.item(p) for p in self.positions(iteration, micro)]
            iteration += 1

    def state(self, iteration: int) -> dict[str, int]:
        """What a checkpoint records about the stream after ``iteration`` steps."""
        position = iteration * self.global_batch
        return {"position": position, "epoch": position // self.size, "seed": self.seed}


class SeededSamples(Dataset):
    """``dataset.get(index, generator=Generator(seed))`` for the ``(index, seed)`` pairs the sampler yields."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, seed = item
        return self.dataset.get(index, generator=torch.Generator().manual_seed(seed))


def build_train_loader(
    dataset: Dataset,
    *,
    global_batch: int,
    collate_fn,
    world_size: int = 1,
    rank: int = 0,
    grad_accum: int = 1,
    seed: int = 0,
    start_iter: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """The endless loader of this process's micro-batches (see the module doc)."""
    sampler = GlobalBatchSampler(
        size=len(dataset),
        global_batch=global_batch,
        world_size=world_size,
        rank=rank,
        grad_accum=grad_accum,
        seed=seed,
        start_iter=start_iter,
    )
    return DataLoader(
        SeededSamples(dataset),
        batch_sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        # the workers' base seed comes from here, not from the global RNG (which resume restores)
        generator=torch.Generator().manual_seed(seed),
    )
