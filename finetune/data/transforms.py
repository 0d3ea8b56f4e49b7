"""Batch augmentation on the device: pad-and-crop, horizontal flip and random resized crop of whole
``(B, C, H, W)`` batches, with random numbers drawn so that a batch split across processes is
augmented exactly as one process would augment it."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _draw_rows(images: torch.Tensor, rows: tuple[int, int] | None) -> tuple[int, slice]:
    """How many images to draw random numbers for, and which of them are these ``images``.

    ``rows = (offset, total)``: ``images`` are rows ``offset .. offset + B`` of a batch of ``total``
    split across processes. Drawing for the whole batch and keeping one's own rows gives every
    image the same random numbers whatever the number of processes.
    """
    batch = images.shape[0]
    offset, total = rows if rows is not None else (0, batch)
    return total, slice(offset, offset + batch)


def random_crop(
    images: torch.Tensor, padding: int, generator: torch.Generator, rows: tuple[int, int] | None = None
) -> torch.Tensor:
    """Pad with zeros by ``padding`` and cut a random window of the original size, per image.

    Equivalent to torchvision's ``RandomCrop(size, padding)`` applied to each image: every image is
    shifted by its own ``(dy, dx)`` in ``[-padding, padding]`` with zeros filling the gap.

    Args:
        images: ``(B, C, H, W)`` of any dtype.
        padding: largest shift in pixels.
        generator: on ``images.device``.
        rows: ``(offset, total)`` when ``images`` are one process's rows of a larger batch.

    Returns:
        ``(B, C, H, W)``, same dtype.
    """
    batch, _, height, width = images.shape
    device = images.device
    total, mine = _draw_rows(images, rows)
    shifts = torch.randint(0, 2 * padding + 1, (2, total), device=device, generator=generator)[:, mine]  # offsets
    padded = F.pad(images, (padding, padding, padding, padding))  # (B, C, H + 2p, W + 2p), zeros
    rows = shifts[0, :, None] + torch.arange(height, device=device)  # (B, H) rows of the padded image
    cols = shifts[1, :, None] + torch.arange(width, device=device)  # (B, W)
    b = torch.arange(batch, device=device)[:, None, None]
    # Gather in (B, H, W, C) so one advanced index picks every image's own window, no loop over images.
    windows = padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return windows.permute(0, 3, 1, 2)


def random_hflip(
    images: torch.Tensor, generator: torch.Generator, rows: tuple[int, int] | None = None
) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2. ``(B, C, H, W)`` -> same. ``rows`` as in
    :func:`random_crop`."""
    total, mine = _draw_rows(images, rows)
    flip = torch.rand(total, device=images.device, generator=generator)[mine] < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def random_resized_crop(
    images: torch.Tensor,
    out_size: tuple[int, int],
    scale: tuple[float, float],
    generator: torch.Generator,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Cut a random box from each image and resample it straight to ``out_size``.

    Like torchvision's ``RandomResizedCrop``: box area is uniform in ``scale`` (fraction of the
    image), aspect ratio log-uniform in ``ratio``; box sides are clipped to the image, so extreme
    draws come out slightly squarer. One ``affine_grid`` + ``grid_sample`` does every image at once.

    Args:
        images: float ``(B, C, H, W)``.
        out_size: ``(H', W')``.
        scale: ``(low, high)`` area fractions.
        generator: on ``images.device``.
        ratio: ``(low, high)`` width / height.
        rows: ``(offset, total)`` as in :func:`random_crop`.

    Returns:
        float ``(B, C, H', W')``.
    """
    batch, channels = images.shape[:2]
    device = images.device
    total, mine = _draw_rows(images, rows)
    box_w, box_h, centre_x, centre_y = crop_boxes(torch.rand(4, total, device=device, generator=generator)[:, mine], scale, ratio)
    theta = torch.zeros(batch, 2, 3, device=device)
    theta[:, 0, 0] = box_w
    theta[:, 1, 1] = box_h
    theta[:, 0, 2] = centre_x
    theta[:, 1, 2] = centre_y
    grid = F.affine_grid(theta, [batch, channels, *out_size], align_corners=False)  # (B, H', W', 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def crop_boxes(
    rand: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> torch.Tensor:
    """Random-resized-crop boxes from uniform draws ``rand (4, B)``: ``(4, B)`` rows of half-width,
    half-height, centre x and centre y in normalised coordinates, where an image spans [-1, 1].

    Area is uniform in ``scale`` (a fraction of the image) and width/height log-uniform in
    ``ratio``; sides are clipped to the image and the centre keeps the box inside it.
    """
    area = scale[0] + (scale[1] - scale[0]) * rand[0]
    log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * rand[1]
    box_w = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)
    box_h = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
    return torch.stack([box_w, box_h, (2 * rand[2] - 1) * (1 - box_w), (2 * rand[3] - 1) * (1 - box_h)])


def boxes_in_pixels(boxes: torch.Tensor, images: Sequence[torch.Tensor]) -> list[tuple[int, int, int, int]]:
    """:func:`crop_boxes` as ``(top, left, height, width)`` in each image's own pixels."""
    out = []
    for (box_w, box_h, cx, cy), image in zip(boxes.t().tolist(), images):
        height, width = image.shape[-2:]
        crop_h, crop_w = max(1, round(box_h * height)), max(1, round(box_w * width))
        top = min(height - crop_h, max(0, round((cy + 1) / 2 * height - crop_h / 2)))
        left = min(width - crop_w, max(0, round((cx + 1) / 2 * width - crop_w / 2)))
        out.append((top, left, crop_h, crop_w))
    return out
