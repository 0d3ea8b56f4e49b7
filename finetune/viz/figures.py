"""Pictures of what a ViT sees, drawn from ``finetune.viz.visual``'s tensors: the patch grid, attention,
position-embedding similarity, training samples as the model receives them, and its most
confident mistakes. Each function writes one PNG and returns its path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .plots import new_figure, save_figure


def _hwc(image: torch.Tensor):
    """``uint8 (3, H, W)`` -> ``(H, W, 3)`` NumPy array for ``imshow``."""
    return image.permute(1, 2, 0).cpu().numpy()


def draw_patches(image: torch.Tensor, patch_size: int, out_png: str | Path, *, prefix_tokens: int = 1) -> Path:
    """The image as the model sees it, cut into its numbered patch grid, beside the sequence the
    transformer reads: the prefix token(s) first, then the patches row by row.

    Args:
        image: ``uint8 (3, H, W)`` at the model's input size.
        patch_size: the model's patch size.
        prefix_tokens: tokens before the patches (1: the class token).
    """
    from .visual import patch_grid

    patches, (gh, gw) = patch_grid(image, patch_size)
    height, width = image.shape[-2:]
    fig = new_figure(13, 5.5)
    left, right = fig.subfigures(1, 2, width_ratios=[1, 1.4])
    ax = left.subplots()
    ax.imshow(_hwc(image))
    for k in range(1, gh):
        ax.axhline(k * height / gh - 0.5, color="white", linewidth=1)
    for k in range(1, gw):
        ax.axvline(k * width / gw - 0.5, color="white", linewidth=1)
    if gh * gw <= 256:
        for i in range(gh * gw):
            r, c = divmod(i, gw)
            ax.text((c + 0.5) * width / gw - 0.5, (r + 0.5) * height / gh - 0.5, str(i), color="yellow",
                    ha="center", va="center", fontsize=max(4, 11 - gw // 3))
    ax.set_title(f"{height}x{width} image, {patch_size}-px patches: a {gh}x{gw} grid")
    ax.axis("off")
    shown = list(range(gh * gw)) if gh * gw <= 32 else list(range(12)) + [None] + list(range(gh * gw - 4, gh * gw))
    cells = ["cls"] * min(prefix_tokens, 1) + (["dist"] if prefix_tokens >= 2 else []) + shown
    axes = right.subplots(1, len(cells))
    for ax, cell in zip(axes, cells):
        ax.axis("off")
        if cell in ("cls", "dist"):
            ax.text(0.5, 0.5, cell, ha="center", va="center", fontsize=9, bbox=dict(facecolor="lightgrey"))
        elif cell is None:
            ax.text(0.5, 0.5, "...", ha="center", va="center", fontsize=12)
        else:
            ax.imshow(_hwc(patches[cell]))
            ax.set_title(str(cell), fontsize=7)
    right.suptitle(f"The sequence the transformer reads: {prefix_tokens} prefix token(s) + {gh * gw} patches")
    return save_figure(fig, out_png)


def draw_attention(
    images: torch.Tensor, rollout: torch.Tensor, heads: torch.Tensor, out_png: str | Path,
    *, titles: Sequence[str] | None = None,
) -> Path:
    """Per image: the image, the attention rollout over it, and each head's last-layer attention
    from the token(s) the head reads, each map upsampled to the image and laid over it.

    Args:
        images: ``uint8 (B, 3, H, W)``.
        rollout: ``(B, gh, gw)`` (:func:`finetune.viz.visual.attention_rollout`).
        heads: ``(B, heads, gh, gw)`` (:func:`finetune.viz.visual.last_layer_attention`).
        titles: one line per image (e.g. the predicted class).
    """
    import torch.nn.functional as F

    count, num_heads = images.shape[0], heads.shape[1]
    size = images.shape[-2:]
    fig = new_figure(2.2 * (2 + num_heads), 2.4 * count)
    axes = fig.subplots(count, 2 + num_heads, squeeze=False)

    def overlay(ax, image, grid_map, title):
        up = F.interpolate(grid_map[None, None].float(), size=size, mode="nearest")[0, 0]
        ax.imshow(_hwc(image))
        ax.imshow((up / up.max().clamp(min=1e-12)).cpu().numpy(), cmap="inferno", alpha=0.6)
        ax.set_title(title, fontsize=8)

    for b in range(count):
        axes[b, 0].imshow(_hwc(images[b]))
        axes[b, 0].set_title(titles[b] if titles else "input", fontsize=8)
        overlay(axes[b, 1], images[b], rollout[b], "rollout")
        for h in range(num_heads):
            overlay(axes[b, 2 + h], images[b], heads[b, h], f"last layer, head {h}")
        for ax in axes[b]:
            ax.axis("off")
    fig.suptitle("Attention rollout (Abnar and Zuidema, 2020) and each head's last-layer attention, from the token(s) the head reads")
    return save_figure(fig, out_png)


def draw_pos_embed_similarity(maps: Mapping[str, torch.Tensor], out_png: str | Path) -> Path:
    """For each labelled embedding, the grid of small maps of ViT's figure 7: in cell (i, j), the
    cosine similarity of position (i, j)'s embedding to every position.

    Args:
        maps: label -> ``(gh * gw, gh, gw)`` (:func:`finetune.viz.visual.pos_embed_similarity`).
    """
    fig = new_figure(max(6.5, 5 * len(maps)), 5.6)  # one map is narrow: room for the title
    axes = fig.subplots(1, len(maps), squeeze=False)[0]
    for ax, (label, sims) in zip(axes, maps.items()):
        _, gh, gw = sims.shape
        gap = 1
        canvas = torch.full((gh * (gh + gap), gw * (gw + gap)), float("nan"))
        for i in range(gh * gw):
            r, c = divmod(i, gw)
            canvas[r * (gh + gap): r * (gh + gap) + gh, c * (gw + gap): c * (gw + gap) + gw] = sims[i]
        image = ax.imshow(canvas.numpy(), cmap="viridis", vmin=-1, vmax=1)
        ax.set_title(f"{label}: {gh}x{gw} positions", fontsize=10)
        ax.axis("off")
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="cosine similarity")
    fig.suptitle("Position-embedding similarity\n(each small map: one position's similarity to all the others)",
                 fontsize=11)
    return save_figure(fig, out_png)


def draw_samples(
    images: torch.Tensor, labels: Sequence[int], classes: Sequence[str], out_png: str | Path, *, title: str
) -> Path:
    """A grid of images (``uint8 (B, 3, H, W)``) with their class names."""
    count = images.shape[0]
    cols = min(8, count)
    rows = -(-count // cols)
    fig = new_figure(1.7 * cols, 1.9 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, image, label in zip(axes, images, labels):
        ax.imshow(_hwc(image))
        ax.set_title(str(classes[label]), fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, out_png)


def draw_mistakes(
    images: torch.Tensor, true: Sequence[int], predicted: Sequence[int], confidence: Sequence[float],
    classes: Sequence[str], out_png: str | Path, *, where: str = "the test set",
) -> Path:
    """The most confident errors on ``where``: each image with its true class and the class predicted."""
    count = images.shape[0]
    cols = min(6, max(count, 1))
    rows = max(1, -(-count // cols))
    fig = new_figure(2.1 * cols, 2.4 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, image, t, p, c in zip(axes, images, true, predicted, confidence):
        ax.imshow(_hwc(image))
        ax.set_title(f"true: {classes[t]}\npred: {classes[p]} ({100 * c:.0f}%)", fontsize=8, color="darkred")
    fig.suptitle(f"Most confident mistakes on {where}" if count else f"No mistakes on {where}", fontsize=10)
    return save_figure(fig, out_png)
