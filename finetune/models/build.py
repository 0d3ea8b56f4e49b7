"""Building models: from scratch, or from pretrained weights adapted on load; and a fresh head.

``load_model`` always works in three steps, whatever the source:

1. read the weights and what the source says about itself (:mod:`finetune.models.sources`);
2. build the architecture at the checkpoint's *own* shape (its class count, grid and patch size)
   and load every tensor exactly, reporting by name anything that does not fit;
3. adapt: a fresh head for ``num_classes``, ``pos_embed`` refitted to ``img_size`` and the patch
   kernel resampled for ``patch_size`` (:mod:`finetune.models.pos_embed`).

Because step 2 loads at the checkpoint's own shape, every weight outside the new head equals the
checkpoint's (or is the documented resize of it), for hub weights and local files alike; timm's
``checkpoint_path=`` would instead refuse a checkpoint with another head or grid.
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import get_norm_layer
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter_fn
from torch import nn

from ..errors import CheckpointError, FinetuneError
from . import presets  # noqa: F401  (registers the from-scratch presets with timm)
from .pos_embed import (PosEmbedMode, check_image_size, check_runs_at_input_size, pos_embed_prefix_tokens,
                        pretrained_window_sizes, resize_model_input, to_2tuple)
from .reading import check_model_args, check_num_classes, check_weight_values, describe_checkpoint
from .sources import HUB_PREFIX, ResolvedSource, check_arch, resolve_source

CONFIG_NAME = "config.json"


@dataclass
class LoadReport:
    """What ``load_model`` did, attached to the model as ``model.load_report``.

    Attributes:
        source: the source as given.
        origin: the file, folder or hub repository the weights came from.
        arch: the timm architecture built.
        loaded: names of the checkpoint tensors loaded into the model.
        missing: model tensors the checkpoint did not have (left at their initial values).
        unexpected: checkpoint tensors the model has no place for (ignored).
        new_head: tensors of the freshly initialised head.
        resized: name -> (checkpoint shape, new shape) for resized tensors.
    """

    source: str
    origin: str
    arch: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    new_head: list[str] = field(default_factory=list)
    resized: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for logs: ``loaded 152 tensors from ...; new head: head.weight, ...``."""
        parts = [f"loaded {len(self.loaded)} tensors of {self.arch} from {self.origin}"]
        if self.new_head:
            parts.append(f"new head: {', '.join(self.new_head)}")
        for name, (old, new) in self.resized.items():
            parts.append(f"resized {name} {list(old)} -> {list(new)}")
        if self.missing:
            parts.append(f"NOT in checkpoint (left initialised): {', '.join(self.missing)}")
        if self.unexpected:
            parts.append(f"NOT loaded (no place in the model): {', '.join(self.unexpected)}")
        return "; ".join(parts)


def timm_create(arch: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(arch, pretrained=False, **kwargs)``; an unknown name or argument is a message."""
    check_arch(arch)
    if "norm_eps" in kwargs:  # timm takes a norm layer, not its eps (transformers' ViT uses 1e-12, timm's 1e-6)
        kwargs = dict(kwargs)
        eps = kwargs.pop("norm_eps")
        kwargs["norm_layer"] = partial(get_norm_layer(kwargs.get("norm_layer")) or nn.LayerNorm, eps=eps)
    try:
        return timm.create_model(arch, pretrained=False, **kwargs)
    except FinetuneError:
        raise  # already one paragraph (a conv stem's grid that the patches do not divide)
    except (TypeError, AssertionError, KeyError, ValueError) as exc:
        # timm refuses an argument it does not take (TypeError), a combination it cannot build
        # (AssertionError: a width that the heads do not divide, a pooling without its token) and
        # an unknown layer name (KeyError): all of them a model.args or config.json to fix.
        why = f"no layer named {exc}" if isinstance(exc, KeyError) else (str(exc).rstrip(".") or type(exc).__name__)
        raise FinetuneError(
            f"Cannot build '{arch}' with {kwargs}: {why}.",
            "Remove or fix the model argument: num_heads must divide embed_dim, layer names are timm's "
            "('gelu', 'layernorm'), token pooling needs class_token.",
        ) from None


def non_persistent_buffers(model: nn.Module) -> list[str]:
    """Names of the buffers no state dict holds (``register_buffer(..., persistent=False)``): values
    computed at construction, such as Swin's ``relative_position_index`` and ``attn_mask``."""
    return [f"{prefix}.{name}" if prefix else name
            for prefix, module in model.named_modules() for name in module._non_persistent_buffers_set]


def materialise(meta_model: nn.Module, arch: str, build_args: dict[str, Any]) -> nn.Module:
    """``meta_model`` (built on the meta device) on the CPU, its weights about to be loaded.

    ``to_empty`` gives storage without values, which the state dict then fills. It cannot fill
    non-persistent buffers, so a model that has any is built for real (on a forked random state, so
    that this build does not move the run's random numbers): Swin-T takes 0.39 s, as timm's own init
    does, on one CPU thread. ViT and DeiT have none and keep the fast path (ViT-B: 0.06 s instead of
    0.95 s; DeiT-tiny: 0.06 s either way).
    """
    if not non_persistent_buffers(meta_model):
        return meta_model.to_empty(device="cpu")
    with torch.random.fork_rng(devices=[]):
        return timm_create(arch, **build_args)


def head_names(model: nn.Module) -> list[str]:
    """Module names of the classifier head(s): ``head``, and ``head_dist`` on distilled DeiT."""
    heads = model.get_classifier()
    heads = heads if isinstance(heads, tuple) else (heads,)
    names = {id(module): name for name, module in model.named_modules()}
    return [names[id(h)] for h in heads if id(h) in names]


def architecture_args(args: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments that shape the weights: ``args`` without the dropout rates."""
    # Regularisation rates change training, not the weights' layout; keep them out of saved specs.
    return {k: v for k, v in args.items() if not k.startswith(("drop", "attn_drop", "proj_drop"))}


def create_model(
    arch: str,
    *,
    num_classes: int = 10,
    img_size: int | tuple[int, int] | None = None,
    patch_size: int | None = None,
    **model_kwargs: Any,
) -> nn.Module:
    """Build a randomly initialised model: a timm architecture or a finetune preset.

    Example:
        >>> model = create_model("vit_lab", num_classes=10)       # the course lab's ViT
        >>> model = create_model("vit_cifar_s", num_classes=100, drop_path_rate=0.1)
    """
    check_num_classes(num_classes, f"create_model({arch!r}, num_classes={num_classes!r})")
    kwargs = dict(model_kwargs, num_classes=num_classes)
    if img_size is not None:
        kwargs["img_size"] = img_size
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    model = timm_create(arch, **kwargs)
    if hasattr(model, "patch_embed"):  # timm would silently drop the pixels that do not fill a patch
        check_image_size(to_2tuple(model.patch_embed.img_size), to_2tuple(model.patch_embed.patch_size))
    model.pretrained_cfg = dict(model.pretrained_cfg)
    model.finetune_spec = {"arch": arch, "model_args": architecture_args(model_kwargs)}
    sync_pretrained_cfg(model)
    return model


def checkpoint_input_size(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> tuple | None:
    """(img_size, patch_size) at which ``model`` matches the checkpoint's pos_embed and kernel."""
    pos = state_dict.get("pos_embed")
    proj = state_dict.get("patch_embed.proj.weight")
    if pos is None or getattr(model, "pos_embed", None) is None or pos.shape[-1] != model.pos_embed.shape[-1]:
        return None
    patch = tuple(proj.shape[-2:]) if proj is not None and proj.ndim == 4 else to_2tuple(model.patch_embed.patch_size)
    num_grid = pos.shape[1] - pos_embed_prefix_tokens(model)
    grid = to_2tuple(model.patch_embed.grid_size)
    if grid[0] * grid[1] != num_grid:
        side = math.isqrt(max(num_grid, 0))
        if side * side != num_grid:
            return None  # not this architecture's layout; the exact load names the mismatch
        grid = (side, side)
    if grid == to_2tuple(model.patch_embed.grid_size) and patch == to_2tuple(model.patch_embed.patch_size):
        return None
    return (grid[0] * patch[0], grid[1] * patch[1]), patch


def _filter_fn(arch: str):
    module = sys.modules[timm.models.model_entrypoint(arch).__module__]
    return getattr(module, "checkpoint_filter_fn", None)


def _rename_layer_scale(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """DeiT-III release files name layer scale ``blocks.N.gamma_1``; timm names it ``blocks.N.ls1.gamma``.

    The renaming is timm's own (its ViT ``checkpoint_filter_fn`` with ``adapt_layer_scale``, as
    timm's DeiT-III entries use it), given the layer-scale tensors alone: on the whole state dict
    the filter would also resample ``pos_embed`` and the patch kernel to the model's default grid,
    where ``load_model`` loads them at the checkpoint's own grid and resizes once, as asked.
    """
    gammas = {k: v for k, v in state_dict.items() if ".gamma_" in k}
    if not gammas or not any(".ls1.gamma" in k for k in model.state_dict()):
        return state_dict
    renamed = vit_checkpoint_filter_fn(gammas, model, adapt_layer_scale=True)  # same order, same tensors
    new_names = dict(zip(gammas, renamed))
    return {new_names.get(k, k): v for k, v in state_dict.items()}


def _convert_layout(resolved: ResolvedSource, model: nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under the names ``model`` (built on the meta device) uses."""
    model_keys = set(model.state_dict())
    state_dict = _rename_layer_scale(resolved.state_dict, model)
    filter_fn = _filter_fn(resolved.arch)
    if filter_fn is not None and len(model_keys & set(state_dict)) < len(model_keys) / 2:
        # Mostly foreign names (OpenAI CLIP, DINOv2, big_vision...): let timm's converter rename
        # them. timm-layout checkpoints skip it, so nothing is resized behind our back.
        try:
            state_dict = filter_fn(state_dict, model)
        except Exception as exc:  # noqa: BLE001  (any failure means: not this architecture)
            raise CheckpointError(
                f"{resolved.origin} is not in a layout {resolved.arch} can read "
                f"({describe_checkpoint(state_dict)}; timm's converter said: {exc}).",
                "Pass the architecture the checkpoint was made for (arch=... / model.arch).",
            ) from None
    return state_dict


def load_state_dict_exact(
    model: nn.Module, state_dict: dict[str, torch.Tensor], *, strict: bool = True, source: str = "checkpoint"
) -> tuple[list[str], list[str], list[str]]:
    """Load ``state_dict`` into ``model`` without any resizing; return (loaded, missing, unexpected).

    Raises:
        CheckpointError: a tensor's shape differs (another architecture), or, with ``strict``,
            a tensor is missing or unexpected. Every offending name is listed.
    """
    model_sd = model.state_dict()
    mismatched = [
        f"{k}: checkpoint {list(v.shape)} vs model {list(model_sd[k].shape)}"
        for k, v in state_dict.items()
        if k in model_sd and v.shape != model_sd[k].shape
    ]
    missing = [k for k in model_sd if k not in state_dict]
    unexpected = [k for k in state_dict if k not in model_sd]
    arch = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
    hint = ""
    if "dist_token" in unexpected:
        hint = " It is a distilled DeiT checkpoint: use a *_distilled_* architecture."
    elif "dist_token" in missing:
        hint = " The architecture is distilled but the checkpoint is not: drop '_distilled'."
    if mismatched:
        raise CheckpointError(
            f"{source} does not fit {arch}: {len(mismatched)} tensors have other shapes "
            f"({'; '.join(mismatched[:6])}{'; ...' if len(mismatched) > 6 else ''}). "
            f"The checkpoint has {describe_checkpoint(state_dict)}; it was made for another architecture."
            + hint,
            "Pass the architecture it was trained with (arch=... / model.arch).",
        )
    check_weight_values(state_dict, model_sd, source)
    if strict and (missing or unexpected):
        raise CheckpointError(
            (f"{source} does not match {arch}: "
             + (f"missing from the checkpoint: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}. " if missing else "")
             + (f"not in the model: {', '.join(unexpected[:10])}{' ...' if len(unexpected) > 10 else ''}." if unexpected else "")
             + hint).rstrip(),
            "Use the architecture the checkpoint was made for, or pass strict=False (model.strict: false) "
            "to load what fits and report the rest.",
        )
    if missing or unexpected:
        warnings.warn(
            f"{source}: left initialised (not in checkpoint): {missing}; ignored (not in model): {unexpected}",
            stacklevel=3,
        )
    model.load_state_dict(state_dict, strict=False)
    return [k for k in state_dict if k in model_sd], missing, unexpected


def reset_head(model: nn.Module, num_classes: int) -> list[str]:
    """Replace the classifier head(s) with fresh ones for ``num_classes``; return their tensor names.

    Uses ``model.reset_classifier`` (which resets both ``head`` and ``head_dist`` on distilled
    DeiT) and initialises new linear layers as timm does for a fine-tuning head: truncated normal
    (std 0.02) weights, zero bias.
    """
    model.reset_classifier(num_classes)
    names = head_names(model)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
    model.pretrained_cfg = dict(model.pretrained_cfg, num_classes=num_classes)
    model.pretrained_cfg.pop("label_names", None)
    model.pretrained_cfg.pop("label_descriptions", None)
    return [f"{n}.{p}" for n in names for p, _ in model.get_submodule(n).named_parameters()]


def sync_pretrained_cfg(model: nn.Module) -> None:
    """Set ``model.pretrained_cfg``'s ``input_size`` and ``num_classes`` to the model's own."""
    # Keep pretrained_cfg's input size and class count describing the model as it now is, so
    # timm.data.resolve_data_config(model=model) and saved configs stay truthful.
    cfg = dict(model.pretrained_cfg)
    if hasattr(model, "patch_embed"):
        h, w = to_2tuple(model.patch_embed.img_size)
        cfg["input_size"] = (3, h, w)
    cfg["num_classes"] = model.num_classes
    model.pretrained_cfg = cfg


def load_model(
    source: str | Path | ResolvedSource,
    *,
    num_classes: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    patch_size: int | None = None,
    pos_embed_mode: PosEmbedMode = "bicubic",
    arch: str | None = None,
    antialias: bool = True,
    strict: bool = True,
    use_ema: bool = False,
    cache_dir: str | Path | None = None,
    **model_kwargs: Any,
) -> nn.Module:
    """Load a pretrained model from any source and adapt it to a new task.

    Args:
        source: timm name with or without tag (``deit_tiny_patch16_224``,
            ``deit_tiny_patch16_224.fb_in1k``), ``hf-hub:org/name``, a weights file
            (``.safetensors``; ``.pth``/``.pt``/``.bin`` including the DeiT release format
            ``{"model": ...}`` and timm training checkpoints), or a hub-style folder
            (``config.json`` + weights), such as a finetune run directory; or what
            :func:`resolve_source` read from one (then ``arch``, ``use_ema`` and ``cache_dir`` are not used).
        num_classes: classes of the new task; the checkpoint's head (both heads for distilled
            DeiT) is dropped and a fresh one made. ``None`` keeps the checkpoint's head.
        img_size: new input size (int or (H, W)); ``pos_embed`` is refitted to the new grid.
        patch_size: new patch size; the patch-embedding kernel is resampled (PI-resize).
        pos_embed_mode: ``bicubic``, ``bilinear``, ``nearest``, ``truncate`` or ``crop``
            (see :func:`finetune.resize_pos_embed`).
        arch: timm architecture, for weights files that do not record it.
        antialias: antialias interpolating resizes when shrinking.
        strict: raise when a checkpoint tensor does not load or a model tensor is not in the
            checkpoint; with ``False`` they are loaded as far as they fit and reported (warning and
            ``model.load_report``).
        use_ema: take the EMA weights of a timm training checkpoint.
        cache_dir: hub cache folder (default ``HF_HUB_CACHE``).
        **model_kwargs: passed to ``timm.create_model`` (e.g. ``drop_path_rate=0.1``).

    Returns:
        The model, in train mode, on the CPU, with ``model.load_report`` (a :class:`LoadReport`)
        and ``model.pretrained_cfg`` describing its normalisation, input size and classes.

    Example:
        >>> model = load_model("deit_tiny_patch16_224.fb_in1k", num_classes=10, img_size=32,
        ...                    patch_size=4, pos_embed_mode="bicubic")
        >>> model.load_report.summary()
    """
    name = source.origin if isinstance(source, ResolvedSource) else str(source)
    _check_load_args(name, num_classes, model_kwargs, {"strict": strict, "use_ema": use_ema, "antialias": antialias})
    if not isinstance(source, ResolvedSource):
        source = resolve_source(source, arch=arch, use_ema=use_ema, cache_dir=cache_dir)
    model, report = _load_at_checkpoint_shape(source, name, model_kwargs, keep_head=num_classes is None, strict=strict)
    if num_classes is not None:
        report.new_head = reset_head(model, num_classes)
        report.loaded = [k for k in report.loaded if k not in report.new_head]
    if img_size is not None or patch_size is not None:
        report.resized = _resize_input(model, img_size, patch_size, mode=pos_embed_mode, antialias=antialias)
    model.load_report = report
    sync_pretrained_cfg(model)
    return model


def _check_load_args(name: str, num_classes: Any, model_kwargs: dict[str, Any], flags: dict[str, Any]) -> None:
    if num_classes is not None:
        check_num_classes(num_classes, f"load_model({name!r}, num_classes={num_classes!r})")
    for flag, value in flags.items():  # strict='no' would be true: any non-empty string is
        if not isinstance(value, bool):
            raise FinetuneError(
                f"load_model({name!r}, {flag}={value!r}): {flag} must be True or False, not a "
                f"{type(value).__name__} (Python would read any non-empty text, 'no' and 'false' included, as True).",
                f"Pass {flag}=True or {flag}=False.",
            )
    # The keywords go to timm's constructor: the same checks as a config.json's model_args, so that
    # they can neither make timm open a file (checkpoint_path=) nor build without bound (depth=100000).
    check_model_args(model_kwargs, {}, name, keywords=True)


def _load_at_checkpoint_shape(
    resolved: ResolvedSource, name: str, model_kwargs: dict[str, Any], *, keep_head: bool, strict: bool
) -> tuple[nn.Module, LoadReport]:
    """Step 2 of :func:`load_model`: ``resolved.arch`` built at the checkpoint's own head, grid and
    patch size, every tensor loaded exactly; returns the model and its report."""
    head_classes = _head_classes(resolved)
    if keep_head:
        _check_label_names(resolved, head_classes)
    build_args = {**resolved.model_args, **model_kwargs, "num_classes": head_classes}
    if model_kwargs:  # and they must agree with the weights' shapes
        check_model_args({**resolved.model_args, **model_kwargs}, resolved.state_dict, name, keywords=True)
    # Build on the meta device first: random init of a ViT costs seconds on a CPU and is wasted
    # when the checkpoint overwrites every tensor.
    with torch.device("meta"):
        model = timm_create(resolved.arch, **build_args)
    state_dict = _convert_layout(resolved, model)
    if set(model.state_dict()) <= set(state_dict):
        model = materialise(model, resolved.arch, build_args)  # every tensor is about to be loaded
    else:
        model = timm_create(resolved.arch, **build_args)  # keep a real init for what stays unloaded
    model.pretrained_cfg = dict(resolved.pretrained_cfg)
    native = checkpoint_input_size(model, state_dict)
    if native is not None:
        _check_recorded_size(resolved, model, state_dict, native[0])
        resize_model_input(model, native[0], patch_size=native[1])
    loaded, missing, unexpected = load_state_dict_exact(model, state_dict, strict=strict, source=resolved.origin)
    model.finetune_spec = {"arch": resolved.arch, "model_args": architecture_args(build_args)}
    model.finetune_spec["model_args"].pop("num_classes", None)
    return model, LoadReport(name, resolved.origin, resolved.arch, loaded, missing, unexpected)


def _check_recorded_size(resolved: ResolvedSource, model: nn.Module, state_dict: dict[str, torch.Tensor],
                         weights_size: tuple[int, int]) -> None:
    """A source that records its input size (``model_args.img_size`` in config.json or in a saved
    file's metadata) must agree with the grid its ``pos_embed`` holds.

    A bare weights file records none, and is built at its ``pos_embed``'s own grid (a DeiT file at
    384 px loads as 384 px); a folder whose config says 32 px while ``pos_embed`` holds a 16-px grid
    was changed or damaged after it was saved, and loading it at either size would hide that."""
    recorded = resolved.model_args.get("img_size")
    if recorded is None or to_2tuple(recorded) == to_2tuple(weights_size):
        return
    rh, rw = to_2tuple(recorded)
    ph, pw = to_2tuple(model.patch_embed.patch_size)
    gh, gw = to_2tuple(model.patch_embed.grid_size)
    wh, ww = to_2tuple(weights_size)
    slots = state_dict["pos_embed"].shape[1] - pos_embed_prefix_tokens(model)
    raise CheckpointError(
        f"{resolved.origin}: its config records img_size {rh}x{rw} ({gh}x{gw} patches of {ph}x{pw} px, "
        f"{gh * gw} positions) but its weights' pos_embed holds {slots} grid positions, a "
        f"{wh // ph}x{ww // pw} grid ({wh}x{ww} px). The config and the weights disagree: one of them was "
        "changed or damaged after the model was saved.",
        f"Use the folder as it was saved (copy or download it again); if the weights are right, set "
        f"model_args.img_size to [{wh}, {ww}] in its config.json, and pass img_size=... to load_model to run "
        "it at another size.",
    )


def _head_classes(resolved: ResolvedSource) -> int:
    """Outputs of the checkpoint's (first) classifier head; 0 when it has none."""
    classifier = resolved.pretrained_cfg.get("classifier") or "head"
    first_head = classifier[0] if isinstance(classifier, (list, tuple)) else classifier
    # A file that lost its head's weight still says the head's size in its bias: built with that head,
    # the exact load then names head.weight as missing (built headless, it would name head.bias as extra).
    for name in (f"{first_head}.weight", f"{first_head}.bias"):
        tensor = resolved.state_dict.get(name)
        if tensor is not None and tensor.ndim >= 1:
            return int(tensor.shape[0])
    return 0


def _resize_input(model: nn.Module, img_size: Any, patch_size: Any, *, mode: PosEmbedMode,
                  antialias: bool) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Step 3's resize; returns name -> (old shape, new shape) of the tensors it changed.

    Families other than ViT (EVA, BEiT, Swin) are then run once at the new size
    (:func:`check_runs_at_input_size`), so that a model that cannot be adapted is refused here,
    not at its first batch; a Swin's new stage windows (and a Swin V2's pretrained windows) join
    ``finetune_spec``, so that a saved copy is rebuilt with them."""
    before = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    old_size = to_2tuple(model.patch_embed.img_size) if getattr(model, "patch_embed", None) is not None else None
    resize_model_input(model, img_size, patch_size=patch_size, mode=mode, antialias=antialias)
    if not isinstance(model, VisionTransformer):
        check_runs_at_input_size(model, old_size)
        windows = getattr(model, "_ref_window_sizes", None)
        if windows is not None and hasattr(model, "finetune_spec"):
            model.finetune_spec["model_args"]["window_size"] = [list(w) for w in windows]
            pretrained = pretrained_window_sizes(model)  # Swin V2: the windows its position bias was learned on
            if pretrained is not None:
                model.finetune_spec["model_args"]["pretrained_window_sizes"] = pretrained
    return {k: (before[k], tuple(v.shape)) for k, v in model.state_dict().items()
            if k in before and before[k] != tuple(v.shape)}


def _check_label_names(resolved: ResolvedSource, head_classes: int) -> None:
    """The class names a kept head comes with must name each of its outputs, once."""
    names = resolved.pretrained_cfg.get("label_names")
    if names is None or not head_classes or len(names) == head_classes:
        return
    origin = Path(resolved.origin)
    if origin.is_dir():
        where = str(origin / CONFIG_NAME)
    else:  # a hub repository's config.json, or a weights file's metadata
        where = f"the config.json of {resolved.origin}" if resolved.origin.startswith(HUB_PREFIX) else resolved.origin
    raise CheckpointError(
        f"{where} lists {len(names)} class names (label_names) but the model's head has {head_classes} "
        f"outputs, so {'some classes would have no name' if len(names) < head_classes else 'some names fit no class'}.",
        f"Give label_names one name per class, in the head's order (or delete it, to number the classes 0-"
        f"{head_classes - 1}); or pass num_classes=... to replace the head.",
    )
