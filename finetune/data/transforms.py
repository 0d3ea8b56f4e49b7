"""Batch augmentation on the device: pad-and-crop, horizontal flip and random resized crop of whole
``(B, C, H, W)`` batches, with random numbers drawn so that a batch split across processes is
augmented exactly as one process would augment it. The in-memory and the streamed loader both
augment here, on the batch at its stored size, so they give the same batches."""

from __future__ import annotations

import math

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


RRC_TRIES = 10
"""Boxes a random resized crop draws per image before it falls back to a centre crop (torchvision's
``RandomResizedCrop`` tries as many)."""


def random_resized_crop(
    images: torch.Tensor,
    out_size: tuple[int, int],
    scale: tuple[float, float],
    generator: torch.Generator,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Cut a random box from each image and resample it straight to ``out_size``.

    The boxes follow torchvision's ``RandomResizedCrop`` in the images' own pixels
    (:func:`resized_crop_boxes`); one ``affine_grid`` + ``grid_sample`` (bilinear, no antialiasing)
    then resamples every box at once, with no loop over images and no host sync. Both data paths
    call this on the batch at its stored size, on the device, so a streamed and an in-memory run
    crop alike.

    Args:
        images: float ``(B, C, H, W)``.
        out_size: ``(H', W')``.
        scale: ``(low, high)`` area fractions.
        generator: on ``images.device``.
        ratio: ``(low, high)`` width / height, in pixels.
        rows: ``(offset, total)`` as in :func:`random_crop`.

    Returns:
        float ``(B, C, H', W')``.
    """
    batch, channels, height, width = images.shape
    device = images.device
    total, mine = _draw_rows(images, rows)
    tries = torch.rand(2, total, RRC_TRIES, device=device, generator=generator)[:, mine]
    place = torch.rand(2, total, device=device, generator=generator)[:, mine]
    top, left, box_h, box_w = resized_crop_boxes(tries, place, (height, width), scale, ratio).float()
    # Normalised coordinates (align_corners=False): -1 and 1 are the outer edges of the first and
    # last pixel, so a box's edges are -1 + 2 * left / W and -1 + 2 * (left + w) / W.
    theta = torch.zeros(batch, 2, 3, device=device)
    theta[:, 0, 0] = box_w / width
    theta[:, 0, 2] = (2 * left + box_w) / width - 1
    theta[:, 1, 1] = box_h / height
    theta[:, 1, 2] = (2 * top + box_h) / height - 1
    grid = F.affine_grid(theta, [batch, channels, *out_size], align_corners=False)  # (B, H', W', 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def resized_crop_boxes(
    tries: torch.Tensor,
    place: torch.Tensor,
    size: tuple[int, int],
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """Random-resized-crop boxes in pixels from uniform draws, by torchvision's rule.

    Each try takes an area ``uniform(scale) * H * W`` and a width/height ratio log-uniform in
    ``ratio`` (both in pixels), rounds the sides, and keeps the box if it fits in the image; the
    first of ``T`` tries that fits is the box, placed uniformly over the positions where it fits.
    When none fits, the box is the centre crop of the whole image clipped to ``ratio``.

    Args:
        tries: ``(2, B, T)`` uniform draws in [0, 1): area and log-ratio of each try.
        place: ``(2, B)`` uniform draws in [0, 1): the box's vertical and horizontal position.
        size: ``(H, W)`` of the images the boxes are cut from.
        scale: ``(low, high)`` area fractions.
        ratio: ``(low, high)`` width / height.

    Returns:
        int64 ``(4, B)``: rows ``top``, ``left``, ``height``, ``width``.
    """
    height, width = size
    area = height * width * (scale[0] + (scale[1] - scale[0]) * tries[0])  # (B, T)
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_low + (log_high - log_low) * tries[1])
    box_w, box_h = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))
    fits = (box_w >= 1) & (box_w <= width) & (box_h >= 1) & (box_h <= height)
    first = fits.int().argmax(dim=1, keepdim=True)  # (B, 1): the first try that fits (0 if none does)
    found = fits.any(dim=1)
    fallback_h, fallback_w = _centre_box(height, width, ratio)
    box_h = torch.where(found, box_h.gather(1, first)[:, 0], fallback_h).long()
    box_w = torch.where(found, box_w.gather(1, first)[:, 0], fallback_w).long()
    # uniform over the H - h + 1 rows a box of height h can start at; the clamp guards float32
    # rounding of a draw just below 1
    top = torch.minimum((place[0] * (height - box_h + 1)).floor().long(), height - box_h)
    left = torch.minimum((place[1] * (width - box_w + 1)).floor().long(), width - box_w)
    top = torch.where(found, top, (height - fallback_h) // 2)
    left = torch.where(found, left, (width - fallback_w) // 2)
    return torch.stack([top, left, box_h, box_w])


def _centre_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """``(h, w)`` of the fallback box: the whole image, cut to the nearest ratio in ``ratio``."""
    if width / height < min(ratio):
        return int(round(width / min(ratio))), width
    if width / height > max(ratio):
        return height, int(round(height * max(ratio)))
    return height, width
