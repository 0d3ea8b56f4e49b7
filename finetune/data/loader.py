"""The batch loader: one split turned into normalised float batches on the device, shuffled and
augmented per seeded epoch, in memory or streamed from encoded files, with no DataLoader workers.

Augmentation and resizing (e.g. CIFAR's 32 px to a ViT's 224 px) run on the whole batch on the
device, so the CPU never touches a 224-px image.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from .decode import TV_CODEC_DEPRECATION, decode_images
from .plan import BatchPlan
from .preprocess import Preprocess
from .splits import EncodedImages, ImageTensors
from .transforms import random_crop, random_hflip, random_resized_crop


class BatchLoader:
    """Batches of one split, normalised on the device, with augmentation on whole batches.

    ``in_memory=True`` moves the uint8 images to the device once (CIFAR-10's 50,000 train images are
    150 MB); each batch is then an index into them, with no host work and no host syncs. With
    ``in_memory=False`` the images stay on the CPU and each batch is gathered into pinned memory and
    copied with ``non_blocking``. Training batches are slices of a ``randperm`` drawn from the
    epoch's shuffle stream, and batch ``i`` is augmented from the epoch's augmentation stream
    re-seeded for ``i`` (see :class:`~finetune.data.plan.BatchPlan`): call :meth:`set_epoch` before each epoch, as with
    ``DistributedSampler``. The same epoch gives the same batches and augmentations, and
    :meth:`iter_from` starts an epoch part-way through with exactly the batches the rest of it
    would have had, which is what resuming a run mid-epoch needs.

    Per batch, on the device and on the images at their stored size: pad-and-crop
    (``augment.crop_padding``), horizontal flip (``augment.hflip``), ``(x / 255 - mean) / std``,
    then either a random resized crop straight to ``out_size`` (``augment.random_resized_crop``,
    which replaces pad-and-crop) or a resize (the preprocessing's interpolation) to ``out_size`` when the stored size
    differs, then ``channels_last`` and ``dtype``. A streamed split is decoded to the stored size
    first and then goes through the same steps with the same random numbers, so with equal stored
    images both paths give bit-identical batches under every augmentation. Evaluation batches are
    not augmented or shuffled and keep the last partial batch.

    Args:
        data: the split; uint8 ``(N, 3, H, W)`` images and int64 labels.
        batch_size: images per batch.
        train: shuffle and augment (and by default drop the last partial batch).
        device: where batches are produced.
        out_size: ``(H', W')`` of the batches the model sees.
        mean: per-channel mean of ``x / 255``.
        std: per-channel std of ``x / 255``.
        preprocess: instead of ``out_size``, ``mean``, ``std``, ``channels_last`` and ``dtype``:
            the :class:`~finetune.data.preprocess.Preprocess` that holds them (the loader uses one
            either way, as :attr:`preprocess`).
        augment: the recipe's ``data.augment`` (``hflip``, ``crop_padding``,
            ``random_resized_crop``, ``rrc_scale``); ``None``: no augmentation. Ignored when
            ``train`` is false.
        channels_last: return batches in channels-last memory format (default false).
        drop_last: drop a final partial batch; ``None``: drop when training, keep otherwise.
        in_memory: keep the images on ``device`` (``False``: on the CPU, copied per batch).
        seed: the run's seed; with the epoch it seeds shuffling and augmentation.
        dtype: floating dtype of the batches (default float32).
        rank: this process's place among ``world_size`` training processes.
        world_size: processes sharing each training batch. ``batch_size`` is the global batch:
            every process draws the same shuffle and takes its own ``batch_size / world_size``
            images of each batch, augmented exactly as one process would augment them. An
            evaluation loader is given each process's own part of the split instead.
        workers: threads decoding the images of a streamed split (:class:`EncodedImages`).

    Raises:
        DataError: a training split smaller than one batch when the last partial one is dropped.
    """

    def __init__(
        self,
        data: ImageTensors,
        *,
        batch_size: int,
        train: bool,
        device: torch.device,
        out_size: tuple[int, int] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        preprocess: Preprocess | None = None,
        augment=None,
        channels_last: bool | None = None,
        drop_last: bool | None = None,
        in_memory: bool = True,
        seed: int = 0,
        dtype: torch.dtype | None = None,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 4,
    ):
        """Stage one split for batching (arguments: see the class docstring)."""
        device = torch.device(device)
        assert batch_size >= 1, f"batch_size must be >= 1, got {batch_size}"
        self.preprocess = _preprocess(preprocess, out_size, mean, std, channels_last, dtype)
        self.streaming = isinstance(data, EncodedImages)
        if not self.streaming:
            assert data.images.dtype == torch.uint8 and data.images.dim() == 4, "images must be uint8 (N, 3, H, W)"
        self.device = device
        self.augment = augment if train else None
        self.in_memory = in_memory
        self.epoch = 0
        self.plan = BatchPlan(len(data), batch_size, train, train if drop_last is None else drop_last, seed=seed,
                              rank=rank, world_size=world_size)
        self._stage(data, workers)

    # What the plan and the preprocessing decide, read from them rather than kept twice.
    train = property(lambda self: self.plan.train, doc="Shuffled, augmented training batches.")
    batch_size = property(lambda self: self.plan.batch_size, doc="Images per (global) batch.")
    num_images = property(lambda self: self.plan.num_images, doc="Images in the split.")
    mean = property(lambda self: self.preprocess.mean, doc="Per-channel mean of ``x / 255``.")
    std = property(lambda self: self.preprocess.std, doc="Per-channel std of ``x / 255``.")

    def _stage(self, data: ImageTensors | EncodedImages, workers: int) -> None:
        """Put the images and labels where batches are cut from."""
        device = self.device
        # Where the index permutation lives: beside the images, so indexing never crosses devices.
        self._index_device = device if self.in_memory and not self.streaming else torch.device("cpu")
        if self.streaming:
            self._encoded = data
            size = data.image_size
            self._stored_size = (size, size) if size else self.preprocess.size  # decoded images are resized to this
            self._workers = workers
        else:
            self._images = data.images.to(self._index_device)
        self._labels = data.labels.to(self._index_device)
        self._pin = (not self.in_memory or self.streaming) and device.type == "cuda"

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.plan)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose shuffle and augmentation the next iteration uses."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)``: ``x`` ``(B, 3, *out_size)`` of ``dtype``, ``y`` int64 ``(B,)``, on the device."""
        return self.iter_from(0)

    def iter_from(self, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Like iterating, but skip the epoch's first ``start_batch`` batches without making them."""
        plan, epoch = self.plan, self.epoch
        # The order is drawn on the CPU by the plan, whichever path and device: one host-to-device
        # copy an epoch when the images live on the device.
        order = plan.order(epoch)
        order = None if order is None else order.to(self._index_device)
        aug_gen = torch.Generator(device=self.device) if self.train else None
        if self.streaming:
            yield from self._stream(start_batch, order, aug_gen)
            return
        for i in range(start_batch, len(self)):
            idx = plan.positions(order, i)
            if order is None:
                images, labels = self._images[idx], self._labels[idx]  # views, no copy
            else:
                images, labels = self._images.index_select(0, idx), self._labels.index_select(0, idx)
                # Re-seeded per batch, so batch i's augmentation does not depend on where iteration
                # started; setting a seed is host-side bookkeeping, with no device sync.
                aug_gen.manual_seed(plan.augment_seed(epoch, i))
            if not self.in_memory:
                images, labels = self._to_device(images), self._to_device(labels)
            yield self._prepare(images, aug_gen, plan.rows), labels

    def _stream(self, start_batch, order, aug_gen) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of a streamed split: a background thread decodes the next batch (in
        ``workers`` threads) while this one trains, so only about two batches are ever decoded.
        A decoded batch is then augmented exactly as an in-memory batch of the same images."""
        with ThreadPoolExecutor(1) as loader, ThreadPoolExecutor(self._workers) as decoders, \
                warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=TV_CODEC_DEPRECATION, category=DeprecationWarning)

            plan, epoch = self.plan, self.epoch

            def load(i: int):
                idx = plan.positions(order, i)
                labels = self._labels[idx]
                where = range(self.num_images)[idx] if isinstance(idx, slice) else idx.tolist()
                return self._decode_batch(list(where), decoders), labels

            pending = loader.submit(load, start_batch) if start_batch < len(self) else None
            for i in range(start_batch, len(self)):
                images, labels = pending.result()
                pending = loader.submit(load, i + 1) if i + 1 < len(self) else None
                images, labels = self._to_device(images), self._to_device(labels)
                if self.train:
                    aug_gen.manual_seed(plan.augment_seed(epoch, i))
                yield self._prepare(images, aug_gen, plan.rows), labels

    def _decode_batch(self, where: list[int], decoders: ThreadPoolExecutor) -> torch.Tensor:
        """Decode one batch of a streamed split into ``uint8 (B, 3, H, W)`` at the stored size
        (``image_size``, else the model's), by the resize policy: the images an in-memory split
        would hold."""
        encoded, pre = self._encoded, self.preprocess
        if self.device.type == "cuda":  # JPEGs decoded on the GPU, in one call for the batch
            images = decode_images([encoded.items[j] for j in where], [encoded.names[j] for j in where],
                                   device=self.device, exif=pre.exif)
        else:  # one image per task, in the decoder threads
            images = list(decoders.map(
                lambda j: decode_images([encoded.items[j]], [encoded.names[j]], exif=pre.exif)[0], where))
        return torch.stack([pre.resize_uint8(image, self._stored_size) for image in images])

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.device == self.device:  # decoded on the GPU already
            return batch
        if self._pin:
            # A fresh pinned buffer per batch: the caching host allocator will not reuse it until
            # the asynchronous copy from it has finished.
            pinned = torch.empty(batch.shape, dtype=batch.dtype, pin_memory=True)
            pinned.copy_(batch)
            return pinned.to(self.device, non_blocking=True)
        return batch.to(self.device)

    def _prepare(
        self, images: torch.Tensor, gen: torch.Generator | None, rows: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """uint8 ``(B, 3, H, W)`` at the stored size -> augmented, normalised, resized
        ``(B, 3, *out_size)``: the one place either path augments a batch."""
        aug = self.augment
        rrc = aug is not None and aug.random_resized_crop
        if aug is not None and not rrc and aug.crop_padding > 0:
            images = random_crop(images, aug.crop_padding, gen, rows)  # still uint8: a quarter of the bytes
        if aug is not None and aug.hflip:
            images = random_hflip(images, gen, rows)
        pre = self.preprocess
        # Normalising before resizing is exact (bilinear weights sum to 1, so they commute with a
        # per-channel affine map) and touches 49x fewer values for 32 -> 224.
        x = pre.to_layout(pre.normalize(images))
        if rrc:
            x = random_resized_crop(x, self.preprocess.size, tuple(aug.rrc_scale), gen, rows=rows)
        else:
            # On the device: upsampling CIFAR to 224 px here is the reason the data is kept small.
            x = pre.resize_batch(x)
        return pre.finish(x)


def _preprocess(
    preprocess: Preprocess | None, out_size: tuple[int, int] | None, mean: Sequence[float] | None,
    std: Sequence[float] | None, channels_last: bool | None, dtype: torch.dtype | None,
) -> Preprocess:
    """The loader's :class:`Preprocess`: the one given, or one made of the separate arguments."""
    if preprocess is not None:
        assert out_size is None and mean is None and std is None and channels_last is None and dtype is None, \
            "give either preprocess or out_size, mean, std, channels_last and dtype"
        return preprocess
    assert out_size is not None and mean is not None and std is not None, "out_size, mean and std are needed"
    return Preprocess(size=tuple(out_size), mean=tuple(mean), std=tuple(std), channels_last=bool(channels_last),
                      dtype=torch.float32 if dtype is None else dtype)
