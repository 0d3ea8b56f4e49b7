"""Which parameters train, and how: head-only, full, last-k blocks, parameter groups."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import FinetuneError
from .build import head_names
from ..recipe import TRAIN_MODES, TrainMode


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


def set_trainable(model: nn.Module, mode: TrainMode, *, last_k: int = 0, bitfit_norms: bool = False) -> ParamCounts:
    """Freeze and unfreeze parameters for a training mode, in place.

    Args:
        model: a timm ViT/DeiT (for ``lora``, wrapped by :func:`add_lora`).
        mode: ``head`` trains only the classifier head(s) (a linear probe); ``full`` and
            ``scratch`` train everything; ``last_k`` trains the last ``last_k`` transformer blocks,
            the final norm(s) and the head; ``bitfit`` every bias (and with ``bitfit_norms`` every
            norm weight) and the head; ``attn`` the attention layers' weights and biases (``qkv``,
            ``proj``) and the head; ``lora`` the adapters and the head.
        last_k: number of trailing blocks to train in ``last_k`` mode.
        bitfit_norms: in ``bitfit`` mode, train the norm layers too.

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
    if mode == "lora":
        if not hasattr(model, "peft_config"):
            raise FinetuneError("train.mode lora needs the model wrapped with adapters.", "Call finetune.models.params.add_lora first.")
        return count_parameters(model)  # peft marked the adapters and the saved head trainable
    model.requires_grad_(False)
    trained: list[nn.Module] = head_modules(model)
    if mode == "bitfit":
        for name, param in model.named_parameters():
            if name.endswith(".bias") or (bitfit_norms and _in_norm(model, name)):
                param.requires_grad_(True)
    elif mode == "attn":
        trained += [m for name, m in model.named_modules() if name.endswith((".attn.qkv", ".attn.proj"))]
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


def _in_norm(model: nn.Module, name: str) -> bool:
    """Whether parameter ``name`` belongs to a normalisation layer."""
    owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    return isinstance(owner, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)) or "norm" in type(owner).__name__.lower()


def add_lora(model: nn.Module, *, r: int, alpha: float, dropout: float, target_modules: tuple[str, ...]) -> nn.Module:
    """Wrap a timm ViT with low-rank adapters (Hugging Face peft) on the Linear layers named
    ``target_modules`` (by the last part of their name; the heads excepted).

    timm fuses q, k and v in one ``qkv`` Linear per block, so ``("qkv",)`` adapts all three; add
    ``proj``, ``fc1``, ``fc2`` for the attention output and the MLP. The new head(s) train in full
    (peft's ``modules_to_save``). The result is a ``peft.PeftModel``; unknown attributes
    (``num_classes``, ``patch_embed``...) reach the timm model through it. :func:`merge_lora` turns
    it back into a plain timm model.

    Raises:
        FinetuneError: no Linear layer of the model matches ``target_modules``.
    """
    import peft

    heads = set(head_names(model))
    linears = {name: name.rsplit(".", 1)[-1] for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name not in heads}
    missing = [t for t in target_modules if t not in linears.values()]
    if missing:
        raise FinetuneError(
            f"train.lora.target_modules names {', '.join(missing)}, which are not Linear layers of this model.",
            f"Its Linear layers are named: {', '.join(sorted(set(linears.values())))}.",
        )
    # Full names of the Linear layers only: peft matches by name suffix, and "proj" would also
    # catch the patch embedding's convolution (patch_embed.proj).
    targets = [name for name, short in linears.items() if short in target_modules]
    # EVA, BEiT and Swin V2 attention with q/v biases calls F.linear on qkv.weight, bypassing the
    # qkv module and so its adapter; timm's qkv_bias_separate makes them call qkv(x) + bias instead.
    for name, module in model.named_modules():
        if getattr(module, "q_bias", None) is not None and f"{name}.qkv" in targets and hasattr(module, "qkv_bias_separate"):
            module.qkv_bias_separate = True
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                             modules_to_save=sorted(heads))
    return peft.get_peft_model(model, config)


def merge_lora(model: nn.Module) -> nn.Module:
    """A plain timm model equal to ``model``: adapters merged into the weights they adapt (on a
    copy), heads unwrapped. Any other model is returned as it is."""
    if not hasattr(model, "merge_and_unload"):
        return model
    import copy

    return copy.deepcopy(model).merge_and_unload()


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

    if hasattr(model, "get_base_model"):  # a peft model: its adapters live in the timm model's own names
        model = model.get_base_model()
    no_decay = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    if layer_decay is not None:
        return param_groups_layer_decay(
            model, weight_decay=weight_decay, no_weight_decay_list=no_decay, layer_decay=layer_decay
        )
    return param_groups_weight_decay(model, weight_decay=weight_decay, no_weight_decay_list=no_decay)
