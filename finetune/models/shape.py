"""The shape that sets a ViT's memory use, found before anything is allocated.

:class:`ModelShape` (input, patch grid, width, depth, prefix tokens) of a built model, or of the
model :func:`~finetune.models.build.create_model` or :func:`~finetune.models.build.load_model`
would build, worked out on the meta device so that sizes which could never run are safe to ask about.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .build import timm_create, checkpoint_input_size, create_model
from .pos_embed import check_image_size, to_2tuple
from .sources import ResolvedSource


@dataclass(frozen=True)
class ModelShape:
    """What sets a ViT's memory use: its input, patch grid, width and depth.

    Attributes:
        img_size: ``(H, W)`` input in pixels.
        patch_size: ``(ph, pw)``.
        width: the token width (``embed_dim``).
        depth: transformer blocks.
        prefix_tokens: class, distillation and register tokens before the patches.
    """

    img_size: tuple[int, int]
    patch_size: tuple[int, int]
    width: int
    depth: int
    prefix_tokens: int

    @property
    def tokens(self) -> int:
        """Tokens per image: the prefix tokens and one per patch."""
        return self.prefix_tokens + (self.img_size[0] // self.patch_size[0]) * (self.img_size[1] // self.patch_size[1])


def model_shape(model: nn.Module) -> ModelShape | None:
    """The :class:`ModelShape` of a timm ViT (on any device, the meta device included); ``None``
    for a model without a patch embedding, blocks and a width."""
    embed, blocks = getattr(model, "patch_embed", None), getattr(model, "blocks", None)
    width = getattr(model, "embed_dim", None)
    if embed is None or blocks is None or not isinstance(width, int) or getattr(embed, "img_size", None) is None:
        return None
    return ModelShape(to_2tuple(embed.img_size), to_2tuple(embed.patch_size), width, len(blocks),
                      int(getattr(model, "num_prefix_tokens", 1)))


def planned_shape(
    arch: str,
    *,
    resolved: ResolvedSource | None = None,
    img_size: int | tuple[int, int] | None = None,
    patch_size: int | None = None,
    **model_kwargs: Any,
) -> ModelShape | None:
    """The shape :func:`create_model` (``resolved`` is ``None``) or :func:`load_model` (from
    ``resolved``) would give, found by building the architecture on the meta device: no memory is
    allocated and no weight initialised, so it is safe for sizes that could never run.

    Raises:
        GridError: the image does not split into whole patches.
    """
    if resolved is None:
        with torch.device("meta"):
            model = create_model(arch, num_classes=1, img_size=img_size, patch_size=patch_size, **model_kwargs)
        return model_shape(model)
    with torch.device("meta"):
        model = timm_create(arch, **{**resolved.model_args, **model_kwargs, "num_classes": 1})
    shape = model_shape(model)
    if shape is None:
        return None
    native = checkpoint_input_size(model, resolved.state_dict)  # the checkpoint's own grid and patch
    native_img, native_patch = native if native is not None else (shape.img_size, shape.patch_size)
    new_img = to_2tuple(img_size) if img_size is not None else to_2tuple(native_img)
    new_patch = to_2tuple(patch_size) if patch_size is not None else to_2tuple(native_patch)
    check_image_size(new_img, new_patch)
    return ModelShape(new_img, new_patch, shape.width, shape.depth, shape.prefix_tokens)
