"""Synthetic images (``data.name=synthetic``): seeded noise with a disc whose colour and place
give the class, for smoke tests and dry runs."""

from __future__ import annotations

import torch

from .memory import available_memory, check_memory
from .splits import _RESIZE_CHUNK, ImageTensors


def make_synthetic(
    *, num_train: int, num_test: int, num_classes: int, size: int, seed: int
) -> tuple[ImageTensors, ImageTensors, list[str]]:
    """Seeded random images whose class is visible: a disc of the class's colour at the class's place.

    Each class has a colour and a disc centre; an image is grey noise with that disc (jittered,
    noisy) painted on it. A tiny model's loss falls within a few steps, which is what smoke tests
    and ``finetune`` dry runs need; nothing here resembles natural images.

    Raises:
        DataError: the images, with the float work space of one chunk, would not fit in memory.
    """
    pixels = 3 * size * size
    # uint8 images, plus about six float32 (chunk, 3, size, size) intermediates for one chunk.
    check_memory(
        (num_train + num_test) * pixels + min(num_train + num_test, _RESIZE_CHUNK) * pixels * 4 * 6,
        f"The synthetic dataset (data.synthetic_train={num_train} and data.synthetic_test={num_test} images of "
        f"{size}x{size})",
        f"Lower data.synthetic_train, data.synthetic_test or data.synthetic_size: about "
        f"{max(1, available_memory() // (2 * pixels)):,} images of {size}x{size} fill half the available memory.",
    )
    gen = torch.Generator().manual_seed(seed)
    colours = torch.rand(num_classes, 3, generator=gen) * 195 + 30  # (K, 3) in [30, 225]
    centres = torch.rand(num_classes, 2, generator=gen) * size * 0.5 + size * 0.25  # (K, 2), inner half
    # Separate streams for train and test: the test images do not depend on num_train.
    train = _synthetic_images(num_train, colours, centres, size, torch.Generator().manual_seed(seed * 2 + 1))
    test = _synthetic_images(num_test, colours, centres, size, torch.Generator().manual_seed(seed * 2 + 2))
    return train, test, [f"class_{k}" for k in range(num_classes)]


def _synthetic_images(
    n: int, colours: torch.Tensor, centres: torch.Tensor, size: int, gen: torch.Generator
) -> ImageTensors:
    num_classes = colours.shape[0]
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]  # balanced classes
    out = torch.empty((n, 3, size, size), dtype=torch.uint8)
    coords = torch.arange(size, dtype=torch.float32)
    radius = max(size / 5, 1.0)
    for start in range(0, n, _RESIZE_CHUNK):
        y = labels[start : start + _RESIZE_CHUNK]
        b = y.shape[0]
        centre = centres[y] + (torch.rand(b, 2, generator=gen) - 0.5) * size / 8  # (b, 2) jittered
        dist2 = (coords[None, :, None] - centre[:, 0, None, None]) ** 2 + (
            coords[None, None, :] - centre[:, 1, None, None]
        ) ** 2  # (b, size, size)
        disc = (dist2 <= radius**2)[:, None]  # (b, 1, size, size)
        background = torch.randn(b, 3, size, size, generator=gen) * 40 + 128
        images = torch.where(disc, colours[y][:, :, None, None], background)
        images = images + torch.randn(b, 3, size, size, generator=gen) * 12
        out[start : start + b] = images.round().clamp(0, 255).to(torch.uint8)
    return ImageTensors(out, labels)
