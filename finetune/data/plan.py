"""The batch plan: the order of an epoch's images, the rows of each batch a process takes, and the
seed each batch is augmented from; and how the global batch is split among processes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DataError, FinetuneError


def check_global_batch(batch_size: int, world_size: int) -> None:
    """``data.batch_size`` is the global batch, split evenly between the processes.

    Raises:
        FinetuneError: it does not divide by ``world_size``.
    """
    if batch_size % world_size:
        raise FinetuneError(
            f"data.batch_size is {batch_size}, which does not divide among {world_size} processes.",
            f"data.batch_size is the global batch, split evenly: use a multiple of {world_size} "
            f"(e.g. {max(world_size, batch_size // world_size * world_size)}), or another number of processes.",
        )


SHUFFLE_STREAM, AUGMENT_STREAM = 0, 1
"""Random streams of a training epoch: the order of the images, and their augmentation."""


def stream_seed(seed: int, epoch: int, stream: int) -> int:
    """A 63-bit seed for one random stream of one epoch of one run.

    NumPy's ``SeedSequence`` hashes the three numbers together, so every ``(seed, epoch, stream)``
    gets its own, unrelated seed: the shuffle and the augmentation of an epoch do not share one,
    and seed ``s`` at epoch ``e + 1`` does not replay seed ``s + 1`` at epoch ``e`` (as ``seed +
    epoch`` would).
    """
    entropy = [seed & (2**64 - 1), epoch & (2**64 - 1), stream]  # SeedSequence takes non-negative ints
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)


@dataclass(frozen=True)
class BatchPlan:
    """Which images make up each batch of an epoch, which rows of it this process takes, and the
    seed each batch is augmented from: the one source of order, rows and seeds that the in-memory
    and the streamed loader both read, so that the two give the same batches by construction.

    Training: the epoch's order is a ``randperm`` drawn on the CPU from the epoch's shuffle stream
    (:func:`stream_seed`), whatever device the images live on; batch ``i`` is positions
    ``i * batch_size ..`` of it, of which process ``rank`` takes rows ``rank * local .. + local``;
    batch ``i`` is augmented from the epoch's augmentation stream re-seeded for ``i``, with random
    numbers drawn for the whole global batch (see :mod:`finetune.data.transforms`). So batch ``i`` of
    epoch ``e`` is the same whether an epoch is iterated from its start or resumed part-way through,
    and whatever the number of processes. Evaluation: the split in order, the last batch partial.

    Args:
        num_images: images in the split (for evaluation: this process's part of it).
        batch_size: the global batch when training; the batch when evaluating.
        train: shuffle, augment and split batches among processes.
        drop_last: drop the last partial batch.
        seed: the run's seed.
        rank: this process's place among ``world_size`` training processes.
        world_size: processes sharing each training batch.

    Raises:
        FinetuneError: a training batch that does not divide among the processes.
        DataError: fewer images than one batch when the last partial batch is dropped.
    """

    num_images: int
    batch_size: int
    train: bool
    drop_last: bool
    seed: int = 0
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        assert self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"
        if self.train:
            check_global_batch(self.batch_size, self.world_size)
        if self.drop_last and self.num_images < self.batch_size:
            raise DataError(
                f"The {'training' if self.train else 'evaluation'} split has {self.num_images} images, fewer "
                f"than one batch of {self.batch_size}, so an epoch would have no batches.",
                "Lower data.batch_size or use more images (data.train_subset, data.synthetic_train).",
            )

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.drop_last:
            return self.num_images // self.batch_size
        return math.ceil(self.num_images / self.batch_size)

    @property
    def local(self) -> int:
        """Images of each batch this process takes."""
        return self.batch_size // self.world_size if self.train else self.batch_size

    @property
    def rows(self) -> tuple[int, int] | None:
        """``(offset, total)``: this process's rows of each global training batch; ``None`` when
        evaluating."""
        return (self.rank * self.local, self.batch_size) if self.train else None

    def order(self, epoch: int) -> torch.Tensor | None:
        """The epoch's order of the images (int64, on the CPU); ``None`` when evaluating (in order)."""
        if not self.train:
            return None
        generator = torch.Generator().manual_seed(stream_seed(self.seed, epoch, SHUFFLE_STREAM))
        return torch.randperm(self.num_images, generator=generator)

    def positions(self, order: torch.Tensor | None, batch: int) -> torch.Tensor | slice:
        """This process's images of batch ``batch``: rows of ``order`` (training), or a slice."""
        start = batch * self.batch_size
        if order is None:
            return slice(start, min(start + self.batch_size, self.num_images))
        offset = self.rows[0]
        return order[start + offset : start + offset + self.local]

    def augment_seed(self, epoch: int, batch: int) -> int:
        """The seed batch ``batch`` of ``epoch`` is augmented from."""
        return (stream_seed(self.seed, epoch, AUGMENT_STREAM) + batch) % 2**63
