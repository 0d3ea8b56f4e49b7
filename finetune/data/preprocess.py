"""Preprocessing: the one description of how a decoded ``uint8`` image becomes the float tensor a
model sees (:class:`Preprocess`: input size, resize policy, interpolation, mean and std, EXIF,
dtype and layout), used by the training and evaluation loaders, ``finetune eval``, ``predict``
and ``show``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

RESIZE_POLICIES = ("center_crop",)
"""How an image of another shape is brought to a size: ``center_crop`` scales it to cover the
size (the shorter side, for a square) and cuts the centre, as torchvision's eval transform."""

_DEFAULT_STATS = (0.5, 0.5, 0.5)  # mean and std when neither the recipe nor the model gives them
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
MAX_STORED_SIDE = 4096  # as runs.folder.stored_size: one image at 4096 px is about 200 MB as floats


def stored_size_of(cfg: dict[str, Any]) -> tuple[int, int] | None:
    """A ``pretrained_cfg``'s ``stored_size`` as ``(H, W)``, or ``None`` when it has none or it is
    not two whole numbers from 2 to :data:`MAX_STORED_SIDE` (a config.json is data, checked)."""
    size = cfg.get("stored_size")
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(
            type(s) is int and 2 <= s <= MAX_STORED_SIDE for s in size):
        return int(size[0]), int(size[1])
    return None


@dataclass(frozen=True)
class Preprocess:
    """How decoded ``uint8 (3, H, W)`` images become a model's input, on every path.

    Loaders keep images as uint8 at their stored size (``load_size``: resized with the resize
    policy when decoded) and, per batch on the device, normalise first and then resize to
    ``size`` (normalising before resizing is exact: bilinear weights sum to 1, so they commute with
    a per-channel affine map, and it touches fewer values when upsampling). Single images
    (``predict``, ``show``) go the same way (:meth:`__call__`), so a photo gives a model the tensor
    its evaluation loader would.
    """

    size: tuple[int, int]  # (H, W) of the model's input
    mean: tuple[float, ...] = _DEFAULT_STATS  # per-channel mean of x / 255
    std: tuple[float, ...] = _DEFAULT_STATS  # per-channel std of x / 255
    load_size: tuple[int, int] | None = None  # uint8 size images are stored at (data.image_size); None: as decoded
    resize: str = "center_crop"  # policy for uint8 images of another shape (RESIZE_POLICIES)
    interpolation: str = "bilinear"  # for the uint8 resize and the device resize of a batch
    antialias: bool = True  # uint8 resize; the device resize of a float batch antialiases only when shrinking
    exif: bool = True  # decoding turns images upright by their EXIF orientation
    dtype: torch.dtype = torch.float32  # of the batches the model sees
    channels_last: bool = False  # memory format of the batches the model sees

    def __post_init__(self):
        assert self.resize in RESIZE_POLICIES, f"resize must be one of {RESIZE_POLICIES}, got {self.resize!r}"
        assert self.dtype.is_floating_point, f"dtype must be a floating type, got {self.dtype}"
        object.__setattr__(self, "size", (int(self.size[0]), int(self.size[1])))
        object.__setattr__(self, "mean", tuple(self.mean))
        object.__setattr__(self, "std", tuple(self.std))

    @classmethod
    def from_model(
        cls, model: Any, *, mean: Sequence[float] | None = None, std: Sequence[float] | None = None, **fields: Any
    ) -> Preprocess:
        """A model's preprocessing: its input size (``patch_embed.img_size``, else its
        ``pretrained_cfg['input_size']``) and, unless given, the mean and std of its
        ``pretrained_cfg`` (see :func:`normalisation`). ``fields``: other fields to set."""
        cfg = getattr(model, "pretrained_cfg", None) or {}
        patch_embed = getattr(model, "patch_embed", None)
        size = tuple(patch_embed.img_size) if patch_embed is not None else tuple(cfg["input_size"][1:])
        mean, std = normalisation(cfg, mean, std)
        # What a model saved by finetune was evaluated with (see to_pretrained_cfg); timm's own
        # configs have no stored_size, and their interpolation is used only where it is one of ours.
        if cfg.get("interpolation") in INTERPOLATIONS:
            fields.setdefault("interpolation", cfg["interpolation"])
        if (stored := stored_size_of(cfg)) is not None:
            fields.setdefault("load_size", stored)
        return cls(size=size, mean=mean, std=std, **fields)

    @classmethod
    def from_recipe(cls, recipe: Any, model: Any, *, dtype: torch.dtype | None = None) -> Preprocess:
        """The preprocessing a recipe trains ``model`` with: ``data.mean``/``data.std`` over the
        model's own, ``data.image_size`` as the stored size, ``train.channels_last``; ``dtype``:
        of the batches (``None``: float32)."""
        size = recipe.data.image_size
        return cls.from_model(
            model, mean=recipe.data.mean, std=recipe.data.std, load_size=(size, size) if size else None,
            channels_last=bool(recipe.train.channels_last), dtype=dtype or torch.float32,
            interpolation="bilinear",  # finetune's training resize, whatever the source model's config says
        )

    def to_pretrained_cfg(self, stored_size: Sequence[int] | None = None) -> dict[str, Any]:
        """The ``pretrained_cfg`` keys that state this preprocessing, for a saved model's config.json.

        timm's ``resolve_data_config`` + ``create_transform`` read them as the same pipeline:
        resize the shorter side to the input size with this interpolation, cut the centre
        (``crop_pct`` 1.0: nothing more is cropped), normalise. ``stored_size`` (the size the run
        kept its images at, when not the input size) is finetune's own key: finetune first brings
        a photo to that size, as the run's evaluation did (``save_model`` writes it beside
        ``pretrained_cfg`` in config.json, where timm ignores it: timm refuses unknown keys inside).
        """
        cfg: dict[str, Any] = {
            "input_size": [3, *self.size], "interpolation": self.interpolation, "crop_pct": 1.0,
            "crop_mode": "center", "mean": list(self.mean), "std": list(self.std),
        }
        if stored_size is not None and tuple(stored_size) != self.size:
            cfg["stored_size"] = [int(stored_size[0]), int(stored_size[1])]
        return cfg

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def resize_uint8(self, images: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Images of any shape to ``size`` (default ``load_size``, else ``size``) by the resize policy.
        ``(3, H, W)`` or ``(B, 3, H, W)``, uint8 or float -> same rank and dtype."""
        out = size or self.load_size or self.size
        return resize_center_crop(images, out, interpolation=self.interpolation, antialias=self.antialias)

    def stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std as ``float32 (1, 3, 1, 1)`` tensors on ``device``, made once per device."""
        return _stats(self.mean, self.std, torch.device(device))

    def normalize(self, images: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``uint8 (B, 3, H, W)`` -> ``float32 (x / 255 - mean) / std``, on the images' device.
        ``stats``: the :meth:`stats` tensors to use (an exported graph holds them as its buffers,
        so that tracing never creates or caches a tensor)."""
        mean, std = stats if stats is not None else self.stats(images.device)
        return (images.float() / 255 - mean) / std

    def to_layout(self, x: torch.Tensor) -> torch.Tensor:
        """A normalised batch in the model's memory format. Loaders change layout at the stored
        size, before any resize, so that the resized batch comes out in that layout instead of
        being copied again at full size."""
        return x.contiguous(memory_format=self.memory_format)

    def resize_batch(self, x: torch.Tensor) -> torch.Tensor:
        """A normalised float ``(B, 3, H, W)`` batch to ``size`` on its device (a no-op at that size).
        Antialiasing only matters (and only costs) when shrinking."""
        if tuple(x.shape[-2:]) == self.size:
            return x
        shrink = x.shape[-2] > self.size[0] or x.shape[-1] > self.size[1]
        return F.interpolate(x, size=self.size, mode=self.interpolation, align_corners=False, antialias=shrink)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """A batch at the model's input size in the model's dtype and memory format."""
        return x.to(dtype=self.dtype, memory_format=self.memory_format)

    def __call__(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Decoded photos of any size (one ``uint8 (3, H, W)`` or several) as one model input
        ``(B, 3, *size)``, made as an evaluation loader makes it: each resized by the resize policy
        to ``load_size`` (the size the model was trained on images stored at), normalised, then
        resized to ``size``; without ``load_size``, resized straight to ``size``."""
        images = [images] if isinstance(images, torch.Tensor) and images.dim() == 3 else list(images)
        batch = torch.stack([self.resize_uint8(image) for image in images])
        return self.finish(self.resize_batch(self.to_layout(self.normalize(batch))))


def resize_center_crop(
    images: torch.Tensor, out_size: tuple[int, int], *, interpolation: str = "bilinear", antialias: bool = True
) -> torch.Tensor:
    """Scale images to cover ``out_size``, then cut the centre (torchvision's eval transform).

    Args:
        images: ``(3, H, W)`` or ``(B, 3, H, W)``, uint8 or float.
        out_size: ``(H', W')``.
        interpolation: torchvision's interpolation mode, by name.
        antialias: antialias when shrinking.

    Returns:
        ``(3, H', W')`` or ``(B, 3, H', W')`` of the input's dtype.
    """
    out_h, out_w = out_size
    height, width = images.shape[-2:]
    if (height, width) == (out_h, out_w):
        return images
    scale = max(out_h / height, out_w / width)  # for a square output: shorter side -> out size
    new_size = [max(out_h, round(height * scale)), max(out_w, round(width * scale))]
    mode = TF.InterpolationMode(interpolation)
    resized = TF.resize(images, new_size, interpolation=mode, antialias=antialias)
    return TF.center_crop(resized, [out_h, out_w])


def preprocess_images(
    images: Sequence[torch.Tensor],
    out_size: int | tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """Decoded photos of any size as one normalised ``float32 (B, 3, H', W')`` model input:
    :class:`Preprocess` ``(out_size, mean, std)`` applied to them."""
    size = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
    return Preprocess(size=size, mean=tuple(mean), std=tuple(std))(images)


def normalisation(
    pretrained_cfg: dict, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std a model's inputs are normalised with: the given ones (a recipe's
    ``data.mean``/``data.std``), else the model's ``pretrained_cfg`` (ImageNet's for DeiT), else 0.5."""
    return (
        tuple(mean or pretrained_cfg.get("mean") or _DEFAULT_STATS),
        tuple(std or pretrained_cfg.get("std") or _DEFAULT_STATS),
    )


@lru_cache(maxsize=32)
def _stats(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1, 3, 1, 1)`` float32 mean and std on ``device``, made once: a per-batch host-to-device
    copy would cost a sync."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return mean_t, std_t
