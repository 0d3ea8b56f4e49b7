"""What a ViT sees, as tensors: its patch grid, its attention, its position embeddings, and its
inputs as they really arrive. ``finetune.viz.figures`` draws them; ``finetune show`` is the command.

Every function here returns tensors with documented shapes, so a notebook can use them without
the pictures.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GridError
from ..models.pos_embed import position_encodings, to_2tuple


MAX_PICTURE_SIDE = 4096
"""Largest image a patch-grid picture shows (4,096 px a side: 48 MB of pixels, drawn in about 12 s
on one CPU thread); no figure shows more detail."""
MAX_PICTURE_GRID = 1024
"""Most patches per side of a patch-grid picture (about 6 s to draw at 1,024; as many as
``finetune.models.pos_embed.MAX_GRID_SIDE``, the largest grid a model is resized to)."""


def check_patch_picture(img_size: int, patch_size: int) -> None:
    """Refuse a patch-grid picture that could not be drawn in memory and time: an image over
    :data:`MAX_PICTURE_SIDE` pixels a side, or a grid over :data:`MAX_PICTURE_GRID` patches a side.
    (``--img-size 100000 --patch-size 1`` asked for 30 GB of pixels and 10 billion patches.)

    Raises:
        GridError: naming the size, the grid and the limits.
    """
    if img_size > MAX_PICTURE_SIDE:
        raise GridError(f"An image of {img_size:,} px a side is more than a patch picture can show "
                        f"(at most {MAX_PICTURE_SIDE:,} px).", f"Use --img-size {MAX_PICTURE_SIDE} or less.")
    grid = img_size // max(patch_size, 1)
    if grid > MAX_PICTURE_GRID:
        raise GridError(f"{img_size} px in {patch_size}-px patches is a {grid:,}x{grid:,} grid, more than a picture "
                        f"can draw (at most {MAX_PICTURE_GRID:,} patches a side).",
                        f"Use --patch-size {-(-img_size // MAX_PICTURE_GRID)} or more, or a smaller --img-size.")


MAX_SIMILARITY_GRID = 64
"""Most positions per side of a position-embedding similarity picture: it holds one small map per
position, (gh * gw)^2 numbers, 16.8 million (67 MB) at 64x64 and 4 TB at 1,024x1,024."""


def check_similarity_picture(grid: tuple[int, int], what: str) -> None:
    """Refuse a similarity picture over :data:`MAX_SIMILARITY_GRID` positions a side.

    Raises:
        GridError: naming the grid, ``what`` asked for it, and the limit.
    """
    if max(grid) > MAX_SIMILARITY_GRID:
        raise GridError(f"{what} is a {grid[0]:,}x{grid[1]:,} grid of positions, more than a similarity picture can "
                        f"hold (at most {MAX_SIMILARITY_GRID} a side: it has one map per position).",
                        "Use a smaller --img-size, or a model with fewer patches.")


def patch_grid(image: torch.Tensor, patch_size: int | tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Cut an image into the patches a ViT embeds, in the order it reads them (row by row).

    Args:
        image: ``(C, H, W)`` with ``H`` and ``W`` multiples of the patch size.
        patch_size: ``p`` or ``(ph, pw)``.

    Returns:
        ``(patches, (gh, gw))``: ``patches`` is ``(gh * gw, C, ph, pw)``, patch ``i`` from grid row
        ``i // gw`` and column ``i % gw``.

    Raises:
        GridError: the image does not split into whole patches.
    """
    ph, pw = to_2tuple(patch_size)
    channels, height, width = image.shape
    if height % ph or width % pw:
        raise GridError(f"A {height}x{width} image does not split into {ph}x{pw} patches.",
                        "Resize it to a multiple of the patch size first (as the model's input size is).")
    gh, gw = height // ph, width // pw
    patches = image.reshape(channels, gh, ph, gw, pw).permute(1, 3, 0, 2, 4).reshape(gh * gw, channels, ph, pw)
    return patches, (gh, gw)


@contextlib.contextmanager
def _recording_attention(model: nn.Module):
    """Record each block's attention probabilities ``(B, heads, N, N)`` during forward passes.

    timm's fused attention kernel never materialises them, so the explicit path is used while
    recording; the probabilities are what its ``attn_drop`` receives (the identity in eval mode).
    """
    modules = [m for m in model.modules() if hasattr(m, "attn_drop") and hasattr(m, "qkv")]
    if not modules:
        raise GridError("This model has no timm attention layers to read.", "Pass a timm ViT or DeiT.")
    maps: list[torch.Tensor] = []
    fused = [getattr(m, "fused_attn", False) for m in modules]
    hooks = [m.attn_drop.register_forward_hook(lambda _m, _i, out: maps.append(out.detach())) for m in modules]
    for m in modules:
        m.fused_attn = False
    try:
        yield maps
    finally:
        for hook in hooks:
            hook.remove()
        for m, was in zip(modules, fused):
            m.fused_attn = was


@torch.no_grad()
def attention_maps(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Attention probabilities of every block for a batch: a list of ``(B, heads, N, N)``, one per
    block, ``N`` = prefix tokens + patches. The model runs in eval mode; its mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with _recording_attention(model) as maps:
            model(x)
    finally:
        model.train(was_training)
    return [m.float() for m in maps]


def _grid(model: nn.Module) -> tuple[int, int]:
    return to_2tuple(model.patch_embed.grid_size)


def _global_maps(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """:func:`attention_maps`, checked to be global attention over prefix tokens + the patch grid
    (windowed attention, as in Swin, attends within windows and has no such map)."""
    windows = [kind for kind in position_encodings(model) if "window" in kind]
    if windows:  # refuse before running: per-window maps have no row for a token the head reads
        raise GridError(
            f"{model.pretrained_cfg.get('architecture') or type(model).__name__}'s attention is not global attention "
            f"over its patch grid: it attends within {windows[0]} (Swin), each block within one window, and has no "
            "class token whose attention could be rolled out over the image.",
            "Draw attention for a model with global attention (ViT, DeiT, DINOv2, CLIP, SigLIP, EVA, BEiT).",
        )
    maps = attention_maps(model, x)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    prefix, _ = _read_tokens(model)
    if grid is None or any(m.shape[-1] != prefix + to_2tuple(grid)[0] * to_2tuple(grid)[1] for m in maps):
        raise GridError(
            "This model's attention is not global attention over its patch grid (e.g. windowed attention).",
            "Pass a ViT or DeiT: attention rollout is defined for models whose every block attends over all tokens.",
        )
    return maps


def attention_rollout_matrix(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Attention rollout (Abnar and Zuidema, 2020): how much each token's final representation
    draws on each input token, through every block and its residual connection.

    Each block's attention is averaged over heads, mixed half and half with the identity (the
    residual path) and its rows renormalised; the blocks are multiplied in order.

    Args:
        maps: :func:`attention_maps`' output.

    Returns:
        ``(B, N, N)``; every row sums to 1.
    """
    rollout = None
    for attention in maps:
        mixed = 0.5 * attention.mean(dim=1) + 0.5 * torch.eye(attention.shape[-1], device=attention.device)
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        rollout = mixed if rollout is None else mixed @ rollout
    return rollout


@torch.no_grad()
def attention_rollout(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Where the model looks for its prediction: the rollout from the token its head reads, over
    the patch grid.

    The head reads the class token on DeiT, ViT, EVA, BEiT and DINOv2 (whose register tokens are
    left out), the class and distillation tokens on distilled DeiT (2: their two rollouts
    averaged), and the mean of the patch tokens on mean-pooled models (the course lab's, or one
    with no prefix token at all, such as SigLIP, whose attention-pool head is stood for by the
    mean). Swin's windowed attention has no such map and is refused with a message.

    Args:
        model: a timm ViT, at any input size it was resized to.
        x: ``(B, 3, H, W)`` normalised images of the model's input size.

    Returns:
        ``(B, gh, gw)`` on the patch grid; each map sums to at most 1 (the rest of the weight
        sits on prefix tokens) and is >= 0.
    """
    rollout = attention_rollout_matrix(_global_maps(model, x))  # (B, N, N)
    prefix, pooled = _read_tokens(model)
    sources = rollout[:, prefix:] if pooled else rollout[:, :_readout_tokens(model)]  # rows of the tokens the head reads
    gh, gw = _grid(model)
    return sources.mean(dim=1)[:, prefix:].reshape(-1, gh, gw)


@torch.no_grad()
def last_layer_attention(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last block's attention to each patch, per head, from the token(s) the head reads: the
    class token (and distillation token) on DeiT/ViT, the patch tokens (averaged) on mean-pooled
    models, as in :func:`attention_rollout`.

    Returns:
        ``(B, heads, gh, gw)``; each head's map sums to at most 1.
    """
    last = _global_maps(model, x)[-1]  # (B, heads, N, N)
    prefix, pooled = _read_tokens(model)
    rows = last[:, :, prefix:] if pooled else last[:, :, :_readout_tokens(model)]
    gh, gw = _grid(model)
    return rows.mean(dim=2)[:, :, prefix:].reshape(last.shape[0], last.shape[1], gh, gw)


def _read_tokens(model: nn.Module) -> tuple[int, bool]:
    """``(prefix tokens, whether the head pools the patch tokens rather than reading prefix ones)``."""
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    return prefix, prefix == 0 or getattr(model, "global_pool", "token") == "avg"


def _readout_tokens(model: nn.Module) -> int:
    """How many leading tokens the head reads: the prefix tokens less the registers (DINOv2's four
    carry no prediction), so 1 on ViT/DeiT/DINOv2, 2 on distilled DeiT."""
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    return max(1, prefix - int(getattr(model, "num_reg_tokens", 0) or 0))


def pos_embed_similarity(
    pos_embed: torch.Tensor, grid: int | tuple[int, int], *, num_prefix_tokens: int = 1
) -> torch.Tensor:
    """Cosine similarity of each grid position's embedding to every other's (ViT paper, figure 7).

    Args:
        pos_embed: ``(1, P + gh * gw, D)``.
        grid: ``(gh, gw)``.
        num_prefix_tokens: ``P``, the leading slots that belong to no grid position.

    Returns:
        ``(gh * gw, gh, gw)``: map ``i`` is position ``i``'s similarity to each position; it is 1
        at ``i`` itself.

    Raises:
        GridError: the grid does not match the embedding's slots.
    """
    gh, gw = to_2tuple(grid)
    slots = pos_embed.shape[1] - num_prefix_tokens
    if slots != gh * gw:
        raise GridError(f"pos_embed has {slots} grid slots, not {gh}x{gw}.", "Pass the grid it was made for.")
    grid_embed = F.normalize(pos_embed[0, num_prefix_tokens:].float(), dim=-1)  # (gh * gw, D)
    return (grid_embed @ grid_embed.t()).reshape(gh * gw, gh, gw)


def denormalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised images back to ``uint8 (B, 3, H, W)`` pixels: ``round((x * std + mean) * 255)``."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return ((x.float() * std_t + mean_t) * 255).round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def training_samples(loader, count: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` images of epoch 1's first training batch, exactly as the model receives
    them (augmented, resized), de-normalised: ``(uint8 (B, 3, H, W), labels (B,))``."""
    loader.set_epoch(1)
    x, y = next(iter(loader))
    return denormalise(x[:count], loader.mean, loader.std).cpu(), y[:count].cpu()


@torch.no_grad()
def most_confident_mistakes(
    model: nn.Module, loader, count: int = 12, *, amp_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The test images the model gets wrong with the highest confidence.

    Returns:
        ``(images, true, predicted, confidence)``: ``uint8 (K, 3, H, W)`` as the model saw them,
        the true and predicted labels and the predicted class's probability, most confident first
        (``K <= count``).
    """
    from ..training.device import autocast

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    kept: list[tuple[float, torch.Tensor, int, int]] = []
    for x, y in loader:
        with autocast(device, amp_dtype):
            probs = model(x).float().softmax(dim=-1)
        confidence, predicted = probs.max(dim=-1)
        wrong = (predicted != y).nonzero().flatten()
        for i in wrong[confidence[wrong].argsort(descending=True)[:count]].tolist():
            kept.append((float(confidence[i]), x[i].cpu(), int(y[i]), int(predicted[i])))
        kept = sorted(kept, key=lambda item: -item[0])[:count]
    model.train(was_training)
    if not kept:
        return torch.zeros(0, 3, 1, 1, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0)
    images = denormalise(torch.stack([item[1] for item in kept]), loader.mean, loader.std)
    return (images, torch.tensor([item[2] for item in kept]), torch.tensor([item[3] for item in kept]),
            torch.tensor([item[0] for item in kept]))


@dataclass
class RunPictures:
    """What a finished run shows of itself: its first training batch and its most confident test
    errors (see :func:`training_samples`, :func:`most_confident_mistakes`). ``where`` names the
    images the mistakes were sought in: under several processes, this process's share of the test set."""

    samples: torch.Tensor
    sample_labels: torch.Tensor
    mistakes: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    where: str


def run_pictures(state) -> RunPictures:
    """The pictures of a run at its end (a ``TrainState``), made on first use and kept on the state,
    so the run folder and TensorBoard share one pass over the test set."""
    if state.pictures is None:
        samples, labels = training_samples(state.train_loader)
        mistakes = most_confident_mistakes(state.eval_model, state.test_loader, amp_dtype=state.amp_dtype)
        world = state.processes.world_size
        where = "the test set" if world == 1 else f"process 0's 1/{world} share of the test set"
        state.pictures = RunPictures(samples, labels, mistakes, where)
    return state.pictures
