"""From-scratch ViT presets, registered with timm so ``timm.create_model("vit_lab")`` works.

Each preset is timm's ``VisionTransformer`` with CIFAR-sized defaults; registering them means a
from-scratch model is saved, reloaded and resized through exactly the same path as a pretrained
DeiT.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn
from timm.layers import HybridEmbed
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from ..errors import GridError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# name -> (VisionTransformer arguments, description)
PRESETS: dict[str, tuple[dict[str, Any], str]] = {
    "vit_lab": (
        # The course lab's model: 32 px, 4-px patches (8x8 grid), width 64, depth 12, 8 heads,
        # MLP ratio 4, cls token kept but the head reads the mean of the patch tokens through
        # LayerNorm + Linear (timm's global_pool="avg" with fc_norm).
        dict(img_size=32, patch_size=4, embed_dim=64, depth=12, num_heads=8, mlp_ratio=4.0, global_pool="avg"),
        "course lab ViT: 32 px, patch 4, width 64, depth 12, 8 heads, mean-pooled head (0.6M params)",
    ),
    "vit_cifar_s": (
        # Wider and shallower than the lab model: on small images a width of 256 with 8 heads of
        # 32 dims trains faster per accuracy point than depth 12 at width 64 (cf. Lee et al. 2021,
        # omihub777/ViT-CIFAR use width 192-384 at depth 7-9).
        dict(img_size=32, patch_size=4, embed_dim=256, depth=8, num_heads=8, mlp_ratio=2.0, global_pool="avg"),
        "stronger CIFAR ViT: 32 px, patch 4, width 256, depth 8, 8 heads, MLP ratio 2 (4.2M params)",
    ),
    "vit_cifar_b": (
        dict(img_size=32, patch_size=4, embed_dim=384, depth=7, num_heads=12, mlp_ratio=2.0, global_pool="avg"),
        "larger CIFAR ViT: 32 px, patch 4, width 384, depth 7, 12 heads, MLP ratio 2 (8.3M params)",
    ),
    "vit_cifar_xs": (
        # Small enough to pretrain and fine-tune on a CPU: the transfer-learning study's model.
        dict(img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0, global_pool="avg"),
        "small CIFAR ViT for the transfer study: 32 px, patch 4, width 128, depth 6, 4 heads (0.8M params)",
    ),
    "vit_cifar_conv": (
        # A ViT with a convolutional tokenizer (Hassani et al. 2021, "Escaping the Big Data Paradigm
        # with Compact Transformers"): two 3x3 conv + BN + ReLU + 2x max-pool stages turn 32 px into
        # an 8x8 grid of 128-channel features, a 1x1 projection makes them tokens, then 4 blocks at
        # width 128. The convolutions give the locality a patch-4 ViT must learn from data, which is
        # what a short CPU budget cannot afford; no class token, mean-pooled head.
        dict(img_size=32, patch_size=1, embed_dim=128, depth=4, num_heads=4, mlp_ratio=2.0, global_pool="avg",
             class_token=False, stem_channels=(64, 128)),
        "ViT with a conv tokenizer for CPU budgets: 32 px, two conv stages to an 8x8 grid, width 128, depth 4",
    ),
    "vit_tiny_test": (
        dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, global_pool="avg"),
        "toy ViT for tests and CPU smoke runs: 32 px, patch 8, width 32, depth 2",
    ),
}


def _cfg(mean: tuple[float, ...], std: tuple[float, ...]) -> dict[str, Any]:
    return dict(
        url="",
        num_classes=10,
        input_size=(3, 32, 32),
        fixed_input_size=True,
        interpolation="bilinear",
        crop_pct=1.0,
        mean=mean,
        std=std,
        first_conv="patch_embed.proj",
        classifier="head",
    )


# timm looks up `default_cfgs` in the module that registers a model.
default_cfgs = generate_default_cfgs(
    {
        # The lab normalises with 0.5; the others with CIFAR-10's own statistics.
        "vit_lab": _cfg((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        "vit_cifar_s": _cfg(CIFAR10_MEAN, CIFAR10_STD),
        "vit_cifar_b": _cfg(CIFAR10_MEAN, CIFAR10_STD),
        "vit_cifar_xs": _cfg(CIFAR10_MEAN, CIFAR10_STD),
        "vit_cifar_conv": {**_cfg(CIFAR10_MEAN, CIFAR10_STD), "first_conv": "patch_embed.backbone.0"},
        "vit_tiny_test": _cfg((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    }
)


def conv_stem(in_chans: int, channels: tuple[int, ...]) -> nn.Sequential:
    """3x3 conv + BatchNorm + ReLU + 3x3/2 max-pool per stage: each stage halves the grid."""
    layers: list[nn.Module] = []
    for out in channels:
        layers += [nn.Conv2d(in_chans, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True),
                   nn.MaxPool2d(3, stride=2, padding=1)]
        in_chans = out
    stem = nn.Sequential(*layers)
    stem.num_features = in_chans  # what timm's HybridEmbed reads for the feature width
    return stem


class ConvTokenizer(HybridEmbed):
    """timm's ``HybridEmbed`` over :func:`conv_stem`: the feature grid is computed, not probed with
    a forward pass, so the model can be built (and resized) on the meta device."""

    def __init__(self, *, img_size: Any = 32, patch_size: Any = 1, in_chans: int = 3,
                 stem_channels: tuple[int, ...] = (64, 128), **kwargs: Any) -> None:
        ratio = 2 ** len(stem_channels)
        grid = _feature_size(img_size, (ratio, ratio))
        patch = patch_size if isinstance(patch_size, (tuple, list)) else (patch_size, patch_size)
        if grid[0] % patch[0] or grid[1] % patch[1]:
            raise GridError(
                f"The conv stem's {len(stem_channels)} stages turn the image into a {grid[0]}x{grid[1]} grid, which "
                f"{patch[0]}-px patches do not divide.",
                "Use fewer stem_channels stages, a larger image, or a preset whose patch size is 1 (vit_cifar_conv).")
        super().__init__(conv_stem(in_chans, tuple(stem_channels)), img_size=img_size, patch_size=patch_size,
                         feature_size=grid, feature_ratio=ratio, in_chans=in_chans, **kwargs)

    def set_input_size(self, img_size: Any = None, patch_size: Any = None, feature_size: Any = None,
                       feature_ratio: Any = None, feature_dim: int | None = None) -> None:
        """timm's resize, given the feature grid the stem's stride makes of ``img_size``."""
        if feature_size is None:
            feature_ratio = self.feature_ratio
            feature_size = _feature_size(img_size if img_size is not None else self.img_size, feature_ratio)
        super().set_input_size(img_size, patch_size, feature_size, feature_ratio, feature_dim)


def _feature_size(img_size: Any, ratio: tuple[int, int]) -> tuple[int, int]:
    """The stem's output grid for ``img_size`` (int or (H, W)); a :class:`GridError` unless it divides."""
    img = img_size if isinstance(img_size, (tuple, list)) else (img_size, img_size)
    if img[0] % ratio[0] or img[1] % ratio[1]:
        raise GridError(f"Image size {img[0]}x{img[1]} is not a multiple of the conv stem's stride {ratio[0]}.",
                        f"Use an image size that is a multiple of {ratio[0]} (e.g. 32 or 64).")
    return img[0] // ratio[0], img[1] // ratio[1]


def _build(variant: str, pretrained: bool, **kwargs: Any) -> VisionTransformer:
    args = dict(PRESETS[variant][0], num_classes=10)
    args.update(kwargs)
    stem = args.pop("stem_channels", None)
    if stem is not None:
        args["embed_layer"] = functools.partial(ConvTokenizer, stem_channels=tuple(stem))
    return build_model_with_cfg(VisionTransformer, variant, pretrained, **args)


@register_model
def vit_lab(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """The course lab's from-scratch ViT (see ``PRESETS``)."""
    return _build("vit_lab", pretrained, **kwargs)


@register_model
def vit_cifar_s(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """A stronger from-scratch CIFAR ViT (see ``PRESETS``)."""
    return _build("vit_cifar_s", pretrained, **kwargs)


@register_model
def vit_cifar_b(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """A larger from-scratch CIFAR ViT (see ``PRESETS``)."""
    return _build("vit_cifar_b", pretrained, **kwargs)


@register_model
def vit_cifar_xs(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """The transfer study's small CIFAR ViT (see ``PRESETS``)."""
    return _build("vit_cifar_xs", pretrained, **kwargs)


@register_model
def vit_cifar_conv(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """A ViT with a convolutional tokenizer for short CPU budgets (see ``PRESETS``)."""
    return _build("vit_cifar_conv", pretrained, **kwargs)


@register_model
def vit_tiny_test(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """A toy ViT for tests and CPU smoke runs (see ``PRESETS``)."""
    return _build("vit_tiny_test", pretrained, **kwargs)
