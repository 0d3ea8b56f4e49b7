"""Position-embedding and patch-embedding surgery.

``resize_pos_embed`` is a pure tensor function; ``resize_model_input`` resizes a timm
ViT-family model's input in place through timm's ``set_input_size`` (new patch kernel, grid and
patch count; rotary embeddings, relative position tables and attention windows for EVA, BEiT and
Swin), refitting an absolute ``pos_embed`` with ``resize_pos_embed`` in the modes timm lacks.
:func:`position_encodings` and :func:`supported_modes` say what each model carries and which
``pos_embed_mode`` it takes; :func:`check_runs_at_input_size` is the load-time check that an
adapted model of those families runs.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GridError

PosEmbedMode = Literal["bicubic", "bilinear", "nearest", "truncate", "crop"]
POS_EMBED_MODES: tuple[str, ...] = ("bicubic", "bilinear", "nearest", "truncate", "crop")
_INTERPOLATING = ("bicubic", "bilinear", "nearest")


MAX_GRID_SIDE = 1024
"""Largest patch grid side accepted (a 16,384-px image in 16-px patches): beyond it a resize would
allocate without bound, which no real model needs."""


def to_2tuple(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``7 -> (7, 7)``; ``(7, 5) -> (7, 5)``."""
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def _grid_arg(value: object, name: str, *, high: int = MAX_GRID_SIDE, unit: str = "patches") -> tuple[int, int]:
    """A size argument as ``(H, W)``: one int or two, each in ``1..high`` (a grid, by default)."""
    pair = (value, value) if not isinstance(value, (tuple, list)) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise GridError(
            f"{name} must be an int or a pair of ints (H, W); got {value!r}.",
            f"Pass whole numbers of {unit}, e.g. {name}=14 or {name}=(14, 14).",
        )
    if not all(1 <= v <= high for v in pair):
        raise GridError(
            f"{name} must be between 1 and {high} {unit} per side; got {value!r}.",
            "Check that you passed a grid in patches (image size / patch size), not pixels."
            if unit == "patches" else f"Pass a size in {unit}.",
        )
    return pair


def resize_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: int | tuple[int, int],
    *,
    old_grid: int | tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    mode: PosEmbedMode = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Fit a learned absolute position embedding to a new patch grid.

    Args:
        pos_embed: ``(B, P + H*W, D)``, usually ``B = 1``; the first ``P`` slots belong to prefix
            tokens (cls, distillation, registers) and the rest to the ``H x W`` patch grid, row-major.
        new_grid: ``(H', W')`` of the new grid, or one int for a square grid.
        old_grid: ``(H, W)`` of the old grid. Inferred when square; required otherwise.
        num_prefix_tokens: ``P``: 1 for ViT/DeiT, 2 for distilled DeiT (cls + dist), 0 for models
            whose prefix tokens carry no position (timm's ``no_embed_class``).
        mode: how to map the old grid onto the new one.

            - ``"bicubic"``, ``"bilinear"``, ``"nearest"``: 2D interpolation of the grid, as timm's
              ``resample_abs_pos_embed`` does (computed in float32, cast back).
            - ``"truncate"``: keep the first ``H'*W'`` grid slots in flat order, as the course does
              for 32-px inputs (197 slots -> cls + first 4). The kept slots are the start of the
              old grid's *top row*, so a 2x2 grid gets positions learned for a 1x4 strip.
            - ``"crop"``: keep the top-left ``H' x W'`` window of the old grid. Like truncation it
              reuses learned vectors without resampling, but each kept vector keeps its 2D
              neighbours (slot (i, j) stays (i, j)), so the layout the model learned is preserved.
              It is the better of the two no-interpolation choices; both lose the spacing of the
              original grid, which interpolation keeps.
        antialias: low-pass filter when downsampling with ``bilinear`` or ``bicubic`` (torch
            supports it for those modes only; ``nearest`` ignores it).

    Returns:
        ``(B, P + H'*W', D)`` in the input's dtype. Prefix slots are copied bit for bit. When the
        grid does not change, the input tensor itself is returned.

    Raises:
        GridError: an unknown mode, a grid that does not match ``pos_embed``, or ``truncate`` /
            ``crop`` to a grid larger than the old one.

    Example:
        >>> pe = torch.randn(1, 1 + 14 * 14, 192)      # DeiT-tiny at 224 px
        >>> resize_pos_embed(pe, 2).shape               # 32 px with 16-px patches
        torch.Size([1, 5, 192])
        >>> resize_pos_embed(pe, (2, 2), mode="truncate").shape
        torch.Size([1, 5, 192])
    """
    num_tokens = _check_pos_embed(pos_embed, num_prefix_tokens, mode)
    new_h, new_w = _grid_arg(new_grid, "new_grid")
    old_h, old_w = _old_grid(old_grid, num_tokens, num_prefix_tokens)
    if (new_h, new_w) == (old_h, old_w):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    grid = _refit_grid(grid, (old_h, old_w), (new_h, new_w), mode=mode, antialias=antialias)
    return torch.cat([prefix, grid], dim=1)


def _check_pos_embed(pos_embed: object, num_prefix_tokens: object, mode: str) -> int:
    """Raise a :class:`GridError` unless ``pos_embed`` is ``(B, tokens, dim)`` with room for the prefix
    and ``mode`` is known; return the number of tokens."""
    if mode not in POS_EMBED_MODES:
        raise GridError(
            f"Unknown position-embedding mode {mode!r}.", f"Use one of: {', '.join(POS_EMBED_MODES)}."
        )
    if not isinstance(pos_embed, torch.Tensor):
        raise GridError(
            f"pos_embed must be a torch.Tensor of shape (B, tokens, dim); got a {type(pos_embed).__name__}.",
            "Convert it first, e.g. torch.as_tensor(array).",
        )
    if pos_embed.ndim != 3:
        raise GridError(
            f"pos_embed must have shape (B, tokens, dim); got {tuple(pos_embed.shape)}.",
            "Pass the model's pos_embed parameter as it is, e.g. model.pos_embed.",
        )
    num_tokens = pos_embed.shape[1]
    if not isinstance(num_prefix_tokens, int) or isinstance(num_prefix_tokens, bool) or not 0 <= num_prefix_tokens < num_tokens:
        raise GridError(
            f"num_prefix_tokens must be a whole number from 0 to {num_tokens - 1} (pos_embed has {num_tokens} "
            f"slots); got {num_prefix_tokens!r}.",
            "Use 1 for ViT/DeiT (cls), 2 for distilled DeiT (cls + dist), 0 for models whose prefix tokens "
            "have no position (no_embed_class); model.num_prefix_tokens says which.",
        )
    return num_tokens


def _old_grid(old_grid: object, num_tokens: int, num_prefix_tokens: int) -> tuple[int, int]:
    """The grid ``pos_embed``'s slots after the prefix form: ``old_grid`` checked, or the square."""
    num_grid = num_tokens - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(max(num_grid, 0))
        if side * side != num_grid:
            raise GridError(
                f"Cannot infer the old grid: {num_grid} grid slots ({num_tokens} tokens minus "
                f"{num_prefix_tokens} prefix) is not a square number.",
                "Pass old_grid=(H, W), or check num_prefix_tokens.",
            )
        return side, side
    old_h, old_w = _grid_arg(old_grid, "old_grid")
    if old_h * old_w != num_grid:
        raise GridError(
            f"old_grid {old_h}x{old_w} has {old_h * old_w} slots but pos_embed has {num_grid} "
            f"grid slots ({num_tokens} tokens minus {num_prefix_tokens} prefix).",
            "Pass the grid the embedding was trained with, or check num_prefix_tokens.",
        )
    return old_h, old_w


def _refit_grid(grid: torch.Tensor, old: tuple[int, int], new: tuple[int, int], *, mode: str,
                antialias: bool) -> torch.Tensor:
    """``(B, H*W, D)`` grid slots, row-major, to ``(B, H'*W', D)`` in ``mode`` (see :func:`resize_pos_embed`)."""
    (old_h, old_w), (new_h, new_w) = old, new
    batch, num_grid, dim = grid.shape
    if mode == "truncate":
        if new_h * new_w > num_grid:
            raise GridError(
                f"Cannot truncate a {old_h}x{old_w} position embedding ({num_grid} slots) to a "
                f"larger {new_h}x{new_w} grid ({new_h * new_w} slots).",
                "Truncation only shrinks; use mode='bicubic' (interpolation) to grow the grid.",
            )
        return grid[:, : new_h * new_w]
    if mode == "crop":
        if new_h > old_h or new_w > old_w:
            raise GridError(
                f"Cannot crop a {old_h}x{old_w} position embedding to a larger {new_h}x{new_w} grid.",
                "Cropping only shrinks; use mode='bicubic' (interpolation) to grow the grid.",
            )
        return grid.reshape(batch, old_h, old_w, dim)[:, :new_h, :new_w].reshape(batch, -1, dim)
    # (B, H*W, D) -> (B, D, H, W) image layout for F.interpolate; float32 like timm.
    image = grid.float().reshape(batch, old_h, old_w, dim).permute(0, 3, 1, 2)
    image = F.interpolate(image, size=(new_h, new_w), mode=mode, antialias=antialias and mode != "nearest")
    return image.permute(0, 2, 3, 1).reshape(batch, new_h * new_w, dim).to(grid.dtype)


def pos_embed_prefix_tokens(model: nn.Module) -> int:
    """How many leading ``pos_embed`` slots belong to prefix tokens rather than the patch grid."""
    if getattr(model, "no_embed_class", False):
        return 0
    return int(getattr(model, "num_prefix_tokens", 1))


def check_image_size(img_size: tuple[int, int], patch_size: tuple[int, int]) -> None:
    """Raise a :class:`GridError` unless the image splits into whole patches."""
    if img_size[0] % patch_size[0] or img_size[1] % patch_size[1]:
        h, w = img_size
        ph, pw = patch_size
        # The nearest multiples of the patch size on the axis that does not fit.
        size, patch = (h, ph) if h % ph else (w, pw)
        good = sorted({max(patch, size // patch * patch), (size // patch + 1) * patch})
        raise GridError(
            f"Image size {h}x{w} is not divisible by the patch size {ph}x{pw}.",
            f"Use an image size that is a multiple of the patch size (e.g. {' or '.join(map(str, good))}),"
            " or choose another patch size.",
        )


# What carries position in each family timm offers, and so which pos_embed_mode it takes. The
# mode shapes an *absolute* embedding only: rotary embeddings are recomputed for the new grid and
# relative tables are resized by timm's own interpolation, with no choice of method.
#
# | family (timm class)                         | position                          | pos_embed_mode        |
# |---------------------------------------------|-----------------------------------|-----------------------|
# | ViT, DeiT (+distilled, III), DINOv2, CLIP,  | absolute (any prefix / registers) | all five, antialias   |
# |   SigLIP, FlexiViT (VisionTransformer)      |                                   |                       |
# | EVA-02 (Eva)                                | absolute + rotary                 | all five (absolute)   |
# | BEiT (Beit)                                 | relative tables (+ optional abs.) | bicubic only, unless  |
# |                                             |                                   | it has an absolute one|
# | Swin, Swin V2                               | relative tables / continuous bias | bicubic only          |
#
# The test of record is tests/test_families.py.
_WINDOWED = "shifted attention windows"


def position_encodings(model: nn.Module) -> list[str]:
    """What carries position in ``model``, in words: ``["absolute position embedding (pos_embed)",
    "rotary embedding (rope)", "relative position bias tables", ...]``."""
    found = []
    if isinstance(getattr(model, "pos_embed", None), torch.Tensor):
        found.append("absolute position embedding (pos_embed)")
    if getattr(model, "rope", None) is not None:
        found.append("rotary embedding (rope)")
    names = [name for name, _ in model.named_parameters()]
    if any(n.endswith("relative_position_bias_table") for n in names):
        found.append("relative position bias tables")
    if any(".cpb_mlp." in n for n in names):
        found.append("continuous position bias (cpb_mlp)")
    if _is_windowed(model):
        found.append(_WINDOWED)
    return found


def _is_windowed(model: nn.Module) -> bool:
    """Whether attention runs in (shifted) windows, as in Swin: blocks with a window and a shift."""
    return any(hasattr(m, "window_size") and hasattr(m, "shift_size") for m in model.modules())


def _is_vit(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def supported_modes(model: nn.Module) -> tuple[str, ...]:
    """The ``pos_embed_mode`` values ``model`` can be resized in: all of :data:`POS_EMBED_MODES`
    when it has an absolute embedding (which the mode shapes), else timm's own ``bicubic`` only."""
    if isinstance(getattr(model, "pos_embed", None), torch.Tensor):
        return POS_EMBED_MODES
    return ("bicubic",)


def _arch(model: nn.Module) -> str:
    return getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__


def check_resize_mode(model: nn.Module, mode: str, antialias: bool) -> None:
    """Raise a :class:`GridError` unless ``model``'s input can be resized, in ``mode``.

    Raises:
        GridError: an unknown mode; a model with no patch embedding or no ``set_input_size`` (not
            a ViT-family model); a mode other than the default, or ``antialias=False``, on a
            model with no absolute embedding for it to shape.
    """
    if mode not in POS_EMBED_MODES:
        raise GridError(f"Unknown position-embedding mode {mode!r}.", f"Use one of: {', '.join(POS_EMBED_MODES)}.")
    if getattr(model, "patch_embed", None) is None or not (_is_vit(model) or hasattr(model, "set_input_size")):
        raise GridError(
            f"Cannot resize the input of {_arch(model)} ({type(model).__name__}): finetune resizes ViT-family models "
            "(ViT, DeiT, DINOv2, CLIP, SigLIP, FlexiViT, EVA, BEiT, Swin) through timm's set_input_size, "
            "which this model does not have.",
            "Load it at its own size (no img_size / patch_size), or choose a ViT-family architecture.",
        )
    if mode in supported_modes(model) and (antialias or "absolute position embedding (pos_embed)" in position_encodings(model)):
        return
    asked = f"pos_embed_mode={mode!r}" if mode != "bicubic" else "antialias=False"
    raise GridError(
        f"{asked} cannot be used with {_arch(model)}: it has no absolute position embedding for it to shape. Its "
        f"position comes from {', '.join(position_encodings(model)) or 'nothing that a resize changes'}, which timm "
        "resizes by its own method (set_input_size) at any new size.",
        "Use pos_embed_mode='bicubic' (the default) with antialias on; the new size itself is fine.",
    )


def resize_model_input(
    model: nn.Module,
    img_size: int | tuple[int, int] | None = None,
    *,
    patch_size: int | tuple[int, int] | None = None,
    mode: PosEmbedMode = "bicubic",
    antialias: bool = True,
) -> nn.Module:
    """Make a timm ViT accept a new image size and/or patch size, in place.

    timm's ``set_input_size`` does the work: when the patch size changes, the patch-embedding
    kernel is resampled with ``resample_patch_embed`` (FlexiViT's pseudo-inverse resize), and
    ``patch_embed``'s image size, grid and patch count follow. ``pos_embed`` is refitted to the new
    grid by timm's model-level ``set_input_size`` in the default mode (bicubic, antialiased), and by
    :func:`resize_pos_embed` in every other (timm's method knows only that one: no ``bilinear``,
    ``nearest``, ``antialias=False``, ``truncate`` or ``crop``).

    EVA, BEiT, Swin and Swin V2 go through their own ``set_input_size`` (rotary embeddings
    recomputed, relative tables resized by ``resize_rel_pos_bias_table``, index buffers and masks
    rebuilt, Swin's windows set by :func:`stage_window_sizes`, Swin V2's continuous bias kept on the
    offsets it learned by :func:`keep_pretrained_windows`); an absolute embedding is then
    refitted in ``mode`` as on ViT. Raises ``GridError`` (:func:`check_resize_mode`, :func:`check_image_size`).

    Example:
        >>> model = timm.create_model("deit_tiny_patch16_224", num_classes=10)
        >>> resize_model_input(model, 32, mode="truncate").pos_embed.shape
        torch.Size([1, 5, 192])
    """
    check_resize_mode(model, mode, antialias)
    patch_embed = model.patch_embed
    new_patch = (_grid_arg(patch_size, "patch_size", high=1024, unit="pixels") if patch_size is not None
                 else to_2tuple(patch_embed.patch_size))
    new_img = (_grid_arg(img_size, "img_size", high=MAX_GRID_SIDE * 16, unit="pixels") if img_size is not None
               else to_2tuple(patch_embed.img_size))
    # A convolutional tokenizer (timm's HybridEmbed) shrinks the image by its feature_ratio before
    # the patch projection: a token then covers patch x ratio pixels.
    ratio = to_2tuple(getattr(patch_embed, "feature_ratio", 1))
    check_image_size(new_img, (new_patch[0] * ratio[0], new_patch[1] * ratio[1]))
    if not _is_vit(model):
        return _resize_family(model, new_img, new_patch, mode=mode, antialias=antialias)
    if mode == "bicubic" and antialias and hasattr(model, "set_input_size"):
        model.set_input_size(img_size=new_img, patch_size=new_patch)  # timm's resample, the same tensors
        return model
    old_grid = to_2tuple(patch_embed.grid_size)
    patch_embed.set_input_size(img_size=new_img, patch_size=new_patch)
    new_grid = to_2tuple(patch_embed.grid_size)
    if getattr(model, "pos_embed", None) is not None and new_grid != old_grid:
        old = model.pos_embed
        with torch.no_grad():
            resized = resize_pos_embed(old.detach(), new_grid, old_grid=old_grid,
                                       num_prefix_tokens=pos_embed_prefix_tokens(model), mode=mode, antialias=antialias)
        model.pos_embed = nn.Parameter(resized.clone(), requires_grad=old.requires_grad)
    try:  # timm >= 1.0.22 records constructor args for re-creation; keep them truthful, as set_input_size does
        from timm.models._input import update_model_input_size

        update_model_input_size(model, new_img, patch_size=new_patch)
    except ImportError:
        pass
    return model


def stage_window_sizes(model: nn.Module, new_grid: tuple[int, int]) -> tuple[tuple[int, int], ...] | None:
    """Each Swin stage's window for a new patch grid, chosen so that no stage is padded by more
    than it needs. ``None`` for a model without stage windows (timm's default then applies).

    A stage's base window ``w`` is timm's ratio rule (keeping the window-to-grid ratio, as Swin's
    384-px checkpoints have 12-px windows for 7 at 224), never below the checkpoint's own: shrinking
    with the grid would leave 1x1 windows at 32 px, no attention at all. A stage grid of ``r``
    tokens per side is then split into ``n = max(1, r // w)`` windows of ``ceil(r / n)`` (per
    axis; :func:`fit_window`), which is ``w`` itself whenever ``w`` divides ``r``. timm pads a grid
    up to a multiple of its window with zero tokens and masks none of them, so a 7-token window on
    Swin-T's 8x8 stage at 32 px would be padded to 14x14: 64 real tokens of 196, each attending to
    the zeros. With this rule that stage is one 8x8 window, and any stage is padded by fewer
    tokens per side than it has windows (always less than one window's worth).
    """
    ref, ref_grid = getattr(model, "_ref_window_sizes", None), getattr(model, "_ref_grid_size", None)
    if ref is None or ref_grid is None:
        return None
    from timm.models.swin_transformer import calc_stage_window_sizes

    scaled = calc_stage_window_sizes(tuple(new_grid), ref, ref_grid)
    windows, resolution = [], tuple(new_grid)
    for stage, (s, r) in enumerate(zip(scaled, ref)):
        if stage > 0:  # each stage after the first merges 2x2 patches (timm pads an odd side first)
            resolution = ((resolution[0] + 1) // 2, (resolution[1] + 1) // 2)
        windows.append((fit_window(resolution[0], max(s[0], r[0])), fit_window(resolution[1], max(s[1], r[1]))))
    return tuple(windows)


def fit_window(side: int, window: int) -> int:
    """The window for a stage ``side`` tokens long, near ``window`` and padded as little as it needs:
    ``side`` split into ``n = max(1, side // window)`` windows of ``ceil(side / n)``.

    The result is in ``[window, 2 * window)`` when ``side >= window`` (``side`` itself when it is
    under two windows, ``window`` when ``window`` divides it) and pads fewer than ``n`` tokens;
    a side shorter than ``window`` is one window of ``side``, as timm's blocks clip it.

    Example:
        >>> fit_window(8, 7), fit_window(16, 7), fit_window(56, 7), fit_window(4, 7)
        (8, 8, 7, 4)
    """
    count = max(1, side // window)
    return -(-side // count)


def keep_pretrained_windows(model: nn.Module) -> None:
    """Fix each Swin V2 attention's ``pretrained_window_size`` at the window it has now, where it is unset.

    Swin V2's continuous position bias (``cpb_mlp``) reads offsets divided by ``pretrained_window_size - 1``,
    or, when that is (0, 0), by the *current* window's ``- 1``. A checkpoint with (0, 0) learned its bias
    on offsets divided by its own window's ``- 1``; if its window then grows from 8 to 10, each offset
    would be divided by 9 instead of 7 and read the bias learned for a smaller one. Fixing the
    pretrained window first (as timm's own 384-px Swin V2 configs do, ``pretrained_window_sizes``) keeps
    every offset the checkpoint knew at the value it learned; the new, larger offsets extrapolate.
    """
    for module in model.modules():
        pretrained = getattr(module, "pretrained_window_size", None)
        if pretrained is not None and hasattr(module, "cpb_mlp") and not any(pretrained):
            module.pretrained_window_size = to_2tuple(module.window_size)


def pretrained_window_sizes(model: nn.Module) -> list[list[int]] | None:
    """Swin V2's per-stage ``pretrained_window_size`` as ``[[h, w], ...]`` (timm's
    ``pretrained_window_sizes``), for ``config.json``; ``None`` for other models."""
    sizes = []
    for stage in getattr(model, "layers", ()):
        attn = getattr(stage.blocks[0], "attn", None) if hasattr(stage, "blocks") and len(stage.blocks) else None
        if attn is None or getattr(attn, "pretrained_window_size", None) is None:
            return None
        sizes.append(list(to_2tuple(attn.pretrained_window_size)))
    return sizes or None


def _resize_family(model: nn.Module, new_img: tuple[int, int], new_patch: tuple[int, int], *, mode: str,
                   antialias: bool) -> nn.Module:
    """:func:`resize_model_input` for EVA, BEiT and Swin: timm's ``set_input_size`` resizes what
    the family carries; an absolute embedding is then refitted in ``mode`` from the original."""
    old_grid, old_img = to_2tuple(model.patch_embed.grid_size), to_2tuple(model.patch_embed.img_size)
    old_pos = model.pos_embed.detach().clone() if isinstance(getattr(model, "pos_embed", None), torch.Tensor) else None
    new_grid = (new_img[0] // new_patch[0], new_img[1] // new_patch[1])
    windows = stage_window_sizes(model, new_grid) if _is_windowed(model) else None
    extra = {"window_size": windows} if windows is not None else {}
    keep_pretrained_windows(model)  # before any window changes (Swin V2)
    try:
        model.set_input_size(img_size=new_img, patch_size=new_patch, **extra)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:  # timm's own refusal, in words
        raise GridError(
            f"timm cannot resize {_arch(model)} to {new_img[0]}x{new_img[1]} px with {new_patch[0]}-px patches "
            f"({type(exc).__name__}: {exc}).",
            f"Load it at its own size ({old_img[0]}x{old_img[1]} px) or try another size.",
        ) from None
    pretrained = pretrained_window_sizes(model)
    if pretrained is not None:
        try:  # timm >= 1.0.22 records constructor args for re-creation: a rebuild needs these too
            from timm.models._input import update_model_args

            update_model_args(model, pretrained_window_sizes=pretrained)
        except ImportError:
            pass
    grid = to_2tuple(model.patch_embed.grid_size)
    if old_pos is not None and (mode, antialias) != ("bicubic", True) and grid != old_grid:
        with torch.no_grad():  # timm refitted it bicubically: redo it from the original in the mode asked
            resized = resize_pos_embed(old_pos, grid, old_grid=old_grid, num_prefix_tokens=pos_embed_prefix_tokens(model),
                                       mode=mode, antialias=antialias)
        model.pos_embed = nn.Parameter(resized, requires_grad=model.pos_embed.requires_grad)
    return model


def check_runs_at_input_size(model: nn.Module, old_size: tuple[int, int]) -> None:
    """The load-time guarantee for the families timm resizes (EVA, BEiT, Swin): one forward pass
    of a blank image at the model's new input size, without gradients, in eval mode (the model's
    mode is restored; no random number is drawn). ViT needs no such check: its resize is shape
    arithmetic on one tensor, and :func:`resize_model_input` refuses what would not fit.

    Raises:
        GridError: the adapted model does not run, naming what could not be resized and
            ``old_size``, at which the checkpoint runs.
    """
    h, w = to_2tuple(model.patch_embed.img_size)
    in_chans = getattr(getattr(model.patch_embed, "proj", None), "in_channels", 3)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_chans, h, w))
    except (RuntimeError, ValueError, AssertionError, IndexError) as exc:
        reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise GridError(
            f"{_arch(model)} cannot be adapted to {h}x{w} px: after resizing its "
            f"{', '.join(position_encodings(model)) or 'input'}, a forward pass fails ({reason}).",
            f"Use another image size, e.g. its own {old_size[0]}x{old_size[1]} or a multiple of it, or another patch size.",
        ) from None
    finally:
        model.train(was_training)
