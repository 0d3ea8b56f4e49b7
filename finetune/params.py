"""Which parameters train, and how: head-only, full, last-k blocks, parameter groups."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import FinetuneError
from .models import head_names
from .recipe import TRAIN_MODES, TrainMode


@dataclass(frozen=True)
class ParamCounts:
    """Trainable and total parameter counts (elements, not tensors)."""

    trainable: int
    total: int

    def __str__(self) -> str:
        share = 100.0 * self.trainable / max(self.total, 1)
        return f"{self.trainable:,} of {self.total:,} parameters trainable ({share:.2f}%)"


def count_parameters(model: nn.Module) -> ParamCounts:
    """Count trainable (``requires_grad``) and total parameters."""
    params = list(model.parameters())
    return ParamCounts(
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(p.numel() for p in params),
    )


def head_modules(model: nn.Module) -> list[nn.Module]:
    """The classifier head(s): ``head`` and, on distilled DeiT, ``head_dist``."""
    return [model.get_submodule(name) for name in head_names(model)]


def set_trainable(model: nn.Module, mode: TrainMode, *, last_k: int = 0) -> ParamCounts:
    """Freeze and unfreeze parameters for a training mode, in place.

    Args:
        model: a timm ViT/DeiT.
        mode: ``head`` trains only the classifier head(s) (a linear probe); ``full`` and
            ``scratch`` train everything; ``last_k`` trains the last ``last_k`` transformer blocks,
            the final norm(s) and the head.
        last_k: number of trailing blocks to train in ``last_k`` mode.

    Returns:
        The trainable and total parameter counts after the change.

    Example:
        >>> set_trainable(model, "head")
        ParamCounts(trainable=1930, total=5526346)
    """
    if mode not in TRAIN_MODES:
        raise FinetuneError(f"Unknown training mode {mode!r}.", f"Use one of: {', '.join(TRAIN_MODES)}.")
    if mode in ("full", "scratch"):
        model.requires_grad_(True)
        return count_parameters(model)
    model.requires_grad_(False)
    trained: list[nn.Module] = head_modules(model)
    if mode == "last_k":
        blocks = getattr(model, "blocks", None)
        depth = len(blocks) if blocks is not None else 0
        if not 1 <= last_k <= depth:
            raise FinetuneError(
                f"last_k={last_k} is out of range: the model has {depth} blocks.",
                f"Choose last_k between 1 and {depth} (train.last_k), or use mode 'full'.",
            )
        trained += list(blocks[depth - last_k:])
        # The final norms sit after the last block; they must adapt with it.
        trained += [getattr(model, n) for n in ("norm", "fc_norm") if isinstance(getattr(model, n, None), nn.Module)]
    for module in trained:
        module.requires_grad_(True)
    return count_parameters(model)


def param_groups(
    model: nn.Module, *, weight_decay: float, layer_decay: float | None = None
) -> list[dict]:
    """Optimizer parameter groups over the trainable parameters.

    Norm weights, biases and the position embedding / cls / dist tokens get no weight decay
    (timm's ``param_groups_weight_decay`` with the model's ``no_weight_decay()`` set). With
    ``layer_decay``, block ``i`` of ``L`` gets ``lr_scale = layer_decay ** (L - i)`` through timm's
    ``param_groups_layer_decay``; timm's schedulers multiply each group's lr by its ``lr_scale``.
    """
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    no_decay = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    if layer_decay is not None:
        return param_groups_layer_decay(
            model, weight_decay=weight_decay, no_weight_decay_list=no_decay, layer_decay=layer_decay
        )
    return param_groups_weight_decay(model, weight_decay=weight_decay, no_weight_decay_list=no_decay)
