"""Creating models, loading pretrained weights from any source, and adapting them on load.

``load_model`` always works in three steps, whatever the source:

1. read the weights and what the source says about itself (``finetune.checkpoint``);
2. build the architecture at the checkpoint's *own* shape (its class count, grid and patch size)
   and load every tensor exactly, reporting by name anything that does not fit;
3. adapt: a fresh head for ``num_classes``, ``pos_embed`` refitted to ``img_size`` and the patch
   kernel resampled for ``patch_size`` (``finetune.pos_embed``).

Because step 2 loads at the checkpoint's own shape, every weight outside the new head equals the
checkpoint's (or is the documented resize of it), for hub weights and local files alike; timm's
``checkpoint_path=`` would instead refuse a checkpoint with another head or grid.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from . import presets  # noqa: F401  (registers the from-scratch presets with timm)
from .sources import (
    HUB_PREFIX,
    PICKLE_SUFFIXES,
    ResolvedSource,
    check_model_args,
    check_pretrained_cfg,
    file_sha256,
    read_checkpoint,
    resolve_folder,
    resolve_hub,
)
from ..errors import CheckpointError, FinetuneError, SourceNotFoundError
from .pos_embed import PosEmbedMode, check_image_size, pos_embed_prefix_tokens, resize_model_input, to_2tuple
from ..snapshot import write_atomically, write_text_atomically

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


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


# --------------------------------------------------------------------------------------------
# Names and sources


def check_arch(arch: str) -> None:
    """Raise a :class:`SourceNotFoundError` with close matches unless timm knows ``arch``."""
    if not timm.is_model(arch):
        raise SourceNotFoundError(
            f"Unknown model architecture '{arch}'.", _suggest(arch, timm.list_models())
        )


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    if close:
        return f"Did you mean: {', '.join(close)}? (`timm.list_models('*deit*')` lists more.)"
    return "See `timm.list_models('*vit*')` or `timm.list_models('*deit*')` for valid names."


def _looks_like_path(source: str) -> bool:
    return (
        os.sep in source
        or source.startswith(".")
        or source.endswith(".safetensors")
        or source.endswith(PICKLE_SUFFIXES)
    )


def resolve_source(
    source: str | Path,
    *,
    arch: str | None = None,
    use_ema: bool = False,
    cache_dir: str | Path | None = None,
) -> ResolvedSource:
    """Find the weights of ``source`` and what it says about itself.

    Args:
        source: a timm name with or without tag (``deit_tiny_patch16_224.fb_in1k``),
            ``hf-hub:org/name``, a weights file, or a hub-style folder (``config.json`` + weights;
            a finetune run directory is one).
        arch: the timm architecture, when the source does not record it (bare weights files).
        use_ema: prefer EMA weights in timm training checkpoints.
        cache_dir: hub cache folder (default: the hub client's, ``HF_HUB_CACHE``).
    """
    text = str(source)
    path = Path(text).expanduser()
    if text.startswith(HUB_PREFIX):
        repo_id, _, revision = text[len(HUB_PREFIX):].partition("@")
        resolved = resolve_hub(repo_id, revision=revision or None, cache_dir=cache_dir)
    elif path.is_dir():
        resolved = resolve_folder(path, use_ema=use_ema)
    elif path.is_file():
        resolved = _resolve_file(path, arch=arch, use_ema=use_ema)
    elif _looks_like_path(text):
        hint = "Check the path; or pass a timm model name such as deit_tiny_patch16_224 to download weights."
        if re.fullmatch(r"[\w.-]+/[\w.-]+", text):
            hint = f"For a Hugging Face hub repository write hf-hub:{text}. " + hint
        raise SourceNotFoundError(f"No such file or folder: {path}.", hint)
    else:
        resolved = _resolve_timm_name(text, cache_dir=cache_dir)
    if arch is not None:
        resolved.arch = arch
    if resolved.arch is None:
        raise CheckpointError(
            f"Cannot tell which architecture {resolved.origin} is for: the file does not record it "
            f"({describe_checkpoint(resolved.state_dict)}).",
            "Pass arch=..., e.g. arch='deit_tiny_patch16_224' (in a recipe: model.arch).",
        )
    check_arch(resolved.arch)
    base_cfg = timm.models.get_pretrained_cfg(resolved.arch)
    cfg = base_cfg.to_dict() if base_cfg is not None else {}
    cfg.update(resolved.pretrained_cfg)
    cfg["architecture"] = resolved.arch
    resolved.pretrained_cfg = cfg
    return resolved


def _resolve_file(path: Path, *, arch: str | None, use_ema: bool) -> ResolvedSource:
    state_dict, meta = read_checkpoint(path, use_ema=use_ema)
    saved = meta.get("finetune", {})
    if saved:  # a file finetune saved carries its config in its metadata: data, checked like config.json
        if not isinstance(saved, dict) or not isinstance(saved.get("model_args", {}), dict) or not isinstance(
                saved.get("pretrained_cfg", {}), dict):
            raise CheckpointError(f"{path} has malformed finetune metadata.", "Save the model again with finetune.save_model.")
        check_model_args(saved.get("model_args", {}), state_dict, str(path))
        check_pretrained_cfg(saved.get("pretrained_cfg", {}), str(path))
    found_arch = arch or saved.get("arch") or meta.get("arch") or _arch_from_filename(path)
    return ResolvedSource(
        state_dict,
        found_arch,
        dict(saved.get("pretrained_cfg", {})),
        dict(saved.get("model_args", {})),
        origin=str(path),
    )


def _arch_from_filename(path: Path) -> str | None:
    # Release files are named after the model (deit_tiny_patch16_224-a1311bcf.pth); take the
    # longest leading run of "_"-separated words that timm knows.
    words = path.name.split(".")[0].split("-")[0].split("_")
    for end in range(len(words), 0, -1):
        if timm.is_model("_".join(words[:end])):
            return "_".join(words[:end])
    return None


def _resolve_timm_name(name: str, *, cache_dir: str | Path | None) -> ResolvedSource:
    arch, tag = timm.models.split_model_name_tag(name)
    check_arch(arch)
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:
        tags = timm.list_pretrained(f"{arch}.*")
        raise SourceNotFoundError(
            f"'{arch}' has no pretrained weights tagged '{tag}'.",
            f"Valid names: {', '.join(tags) or '(none)'}.",
        ) from None
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise SourceNotFoundError(
            f"timm has no pretrained weights for '{name}'.",
            "Train it from scratch (train.mode=scratch with model.arch=...) or pass a weights file.",
        )
    if not cfg.hf_hub_id:
        raise SourceNotFoundError(
            f"The weights of '{name}' are not on the Hugging Face hub (only at {cfg.url or cfg.file}).",
            "Download that file and pass its path as the source, with arch=...",
        )
    repo_id, _, revision = cfg.hf_hub_id.partition("@")
    resolved = resolve_hub(repo_id, revision=revision or None, cache_dir=cache_dir)
    resolved.arch = arch
    resolved.pretrained_cfg = {**cfg.to_dict(), **resolved.pretrained_cfg}
    return resolved


def describe_checkpoint(state_dict: dict[str, torch.Tensor]) -> str:
    """A short description of a ViT state dict's shape, for error messages."""
    facts = []
    if "cls_token" in state_dict:
        facts.append(f"embed dim {state_dict['cls_token'].shape[-1]}")
    blocks = {int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    if blocks:
        facts.append(f"{max(blocks) + 1} blocks")
    proj = state_dict.get("patch_embed.proj.weight")
    if proj is not None and proj.ndim == 4:
        facts.append(f"patch {proj.shape[-2]}x{proj.shape[-1]}")
    if "pos_embed" in state_dict:
        facts.append(f"{state_dict['pos_embed'].shape[1]} position slots")
    if "dist_token" in state_dict:
        facts.append("distilled (dist_token, head_dist)")
    if "head.weight" in state_dict:
        facts.append(f"{state_dict['head.weight'].shape[0]} classes")
    return ", ".join(facts) or f"{len(state_dict)} tensors"


# --------------------------------------------------------------------------------------------
# Building and loading


def _timm_create(arch: str, **kwargs: Any) -> nn.Module:
    check_arch(arch)
    try:
        return timm.create_model(arch, pretrained=False, **kwargs)
    except TypeError as exc:
        raise FinetuneError(
            f"Cannot build '{arch}' with {kwargs}: {exc}.", "Remove or fix the unsupported model argument."
        ) from None


def non_persistent_buffers(model: nn.Module) -> list[str]:
    """Names of the buffers no state dict holds (``register_buffer(..., persistent=False)``): values
    computed at construction, such as Swin's ``relative_position_index`` and ``attn_mask``."""
    return [f"{prefix}.{name}" if prefix else name
            for prefix, module in model.named_modules() for name in module._non_persistent_buffers_set]


def _materialise(meta_model: nn.Module, arch: str, build_args: dict[str, Any]) -> nn.Module:
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
        return _timm_create(arch, **build_args)


def head_names(model: nn.Module) -> list[str]:
    """Module names of the classifier head(s): ``head``, and ``head_dist`` on distilled DeiT."""
    heads = model.get_classifier()
    heads = heads if isinstance(heads, tuple) else (heads,)
    names = {id(module): name for name, module in model.named_modules()}
    return [names[id(h)] for h in heads if id(h) in names]


def _architecture_args(args: dict[str, Any]) -> dict[str, Any]:
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
    kwargs = dict(model_kwargs, num_classes=num_classes)
    if img_size is not None:
        kwargs["img_size"] = img_size
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    model = _timm_create(arch, **kwargs)
    if hasattr(model, "patch_embed"):  # timm would silently drop the pixels that do not fill a patch
        check_image_size(to_2tuple(model.patch_embed.img_size), to_2tuple(model.patch_embed.patch_size))
    model.pretrained_cfg = dict(model.pretrained_cfg)
    model.finetune_spec = {"arch": arch, "model_args": _architecture_args(model_kwargs)}
    _sync_cfg(model)
    return model


def _native_shape_kwargs(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> tuple | None:
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


def _rename_layer_scale(state_dict: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """DeiT-III release files name layer scale ``blocks.N.gamma_1``; timm names it ``blocks.N.ls1.gamma``."""
    if not any(".gamma_" in k for k in state_dict) or not any(".ls1.gamma" in k for k in model_keys):
        return state_dict
    return {re.sub(r"\.gamma_([12])$", r".ls\1.gamma", k): v for k, v in state_dict.items()}


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
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{source} does not match {arch}: "
            + (f"missing from the checkpoint: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}. " if missing else "")
            + (f"not in the model: {', '.join(unexpected[:10])}{' ...' if len(unexpected) > 10 else ''}." if unexpected else "")
            + hint,
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


def _sync_cfg(model: nn.Module) -> None:
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
    if num_classes is not None and not (
            isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes >= 1):
        raise FinetuneError(
            f"load_model({name!r}, num_classes={num_classes!r}): num_classes must be a whole number of classes, "
            "1 or more.",
            "Pass the new task's class count, or num_classes=None to keep the checkpoint's head.",
        )
    # The keywords go to timm's constructor: the same checks as a config.json's model_args, so that
    # they can neither make timm open a file (checkpoint_path=) nor build without bound (depth=100000).
    check_model_args(model_kwargs, {}, name, keywords=True)
    if isinstance(source, ResolvedSource):
        resolved, source = source, name
    else:
        resolved = resolve_source(source, arch=arch, use_ema=use_ema, cache_dir=cache_dir)
    arch_name = resolved.arch
    state_dict = resolved.state_dict
    classifier = resolved.pretrained_cfg.get("classifier") or "head"
    first_head = classifier[0] if isinstance(classifier, (list, tuple)) else classifier
    head_weight = state_dict.get(f"{first_head}.weight")
    ckpt_classes = int(head_weight.shape[0]) if head_weight is not None else 0
    if num_classes is None:
        _check_label_names(resolved, ckpt_classes)

    build_args = {**resolved.model_args, **model_kwargs, "num_classes": ckpt_classes}
    if model_kwargs:  # and they must agree with the weights' shapes
        check_model_args({**resolved.model_args, **model_kwargs}, state_dict, name, keywords=True)
    # Build on the meta device first: random init of a ViT costs seconds on a CPU and is wasted
    # when the checkpoint overwrites every tensor.
    with torch.device("meta"):
        model = _timm_create(arch_name, **build_args)
    model_keys = set(model.state_dict())
    state_dict = _rename_layer_scale(state_dict, model_keys)
    filter_fn = _filter_fn(arch_name)
    if filter_fn is not None and len(model_keys & set(state_dict)) < len(model_keys) / 2:
        # Mostly foreign names (OpenAI CLIP, DINOv2, big_vision...): let timm's converter rename
        # them. timm-layout checkpoints skip it, so nothing is resized behind our back.
        try:
            state_dict = filter_fn(state_dict, model)
        except Exception as exc:  # noqa: BLE001  (any failure means: not this architecture)
            raise CheckpointError(
                f"{resolved.origin} is not in a layout {arch_name} can read "
                f"({describe_checkpoint(state_dict)}; timm's converter said: {exc}).",
                "Pass the architecture the checkpoint was made for (arch=... / model.arch).",
            ) from None
    if model_keys <= set(state_dict):
        model = _materialise(model, arch_name, build_args)  # every tensor is about to be loaded
    else:
        model = _timm_create(arch_name, **build_args)  # keep a real init for what stays unloaded
    model.pretrained_cfg = dict(resolved.pretrained_cfg)
    native = _native_shape_kwargs(model, state_dict)
    if native is not None:
        resize_model_input(model, native[0], patch_size=native[1])

    loaded, missing, unexpected = load_state_dict_exact(
        model, state_dict, strict=strict, source=resolved.origin
    )
    report = LoadReport(str(source), resolved.origin, arch_name, loaded, missing, unexpected)

    if num_classes is not None:
        report.new_head = reset_head(model, num_classes)
        report.loaded = [k for k in report.loaded if k not in report.new_head]
    if img_size is not None or patch_size is not None:
        before = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        resize_model_input(model, img_size, patch_size=patch_size, mode=pos_embed_mode, antialias=antialias)
        for k, v in model.state_dict().items():
            if k in before and before[k] != tuple(v.shape):
                report.resized[k] = (before[k], tuple(v.shape))

    model.finetune_spec = {"arch": arch_name, "model_args": _architecture_args(build_args)}
    model.finetune_spec["model_args"].pop("num_classes", None)
    model.load_report = report
    _sync_cfg(model)
    return model


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


# --------------------------------------------------------------------------------------------
# Shapes, before anything is allocated


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
        model = _timm_create(arch, **{**resolved.model_args, **model_kwargs, "num_classes": 1})
    shape = model_shape(model)
    if shape is None:
        return None
    native = _native_shape_kwargs(model, resolved.state_dict)  # the checkpoint's own grid and patch
    native_img, native_patch = native if native is not None else (shape.img_size, shape.patch_size)
    new_img = to_2tuple(img_size) if img_size is not None else to_2tuple(native_img)
    new_patch = to_2tuple(patch_size) if patch_size is not None else to_2tuple(native_patch)
    check_image_size(new_img, new_patch)
    return ModelShape(new_img, new_patch, shape.width, shape.depth, shape.prefix_tokens)


# --------------------------------------------------------------------------------------------
# Saving


def model_config(model: nn.Module) -> dict[str, Any]:
    """A timm-style ``config.json`` that rebuilds ``model`` with :func:`load_model`."""
    spec = getattr(model, "finetune_spec", None) or {
        # A model built with timm.create_model: timm (>= 1.0.22) records its constructor arguments.
        "arch": model.pretrained_cfg.get("architecture"),
        "model_args": {
            k: v for k, v in _architecture_args(dict(getattr(model, "_model_args", {}))).items()
            if k not in ("num_classes", "img_size", "patch_size")
        },
    }
    args = dict(spec["model_args"])
    if hasattr(model, "patch_embed"):
        args["img_size"] = list(to_2tuple(model.patch_embed.img_size))
        args["patch_size"] = list(to_2tuple(model.patch_embed.patch_size))
    keep = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std", "first_conv",
            "classifier", "label_names", "hf_hub_id", "tag")
    cfg = {k: model.pretrained_cfg[k] for k in keep if model.pretrained_cfg.get(k) is not None}
    return {
        "architecture": spec["arch"],
        "num_classes": model.num_classes,
        "num_features": getattr(model, "num_features", None),
        "global_pool": getattr(model, "global_pool", None),
        "model_args": args,
        "pretrained_cfg": cfg,
    }


def save_model(model: nn.Module, directory: str | Path, *, class_names: list[str] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` so that ``load_model(directory)`` rebuilds it.

    The weights file also carries the config in its metadata, so the ``.safetensors`` file alone
    loads too; ``config.json`` records the weights' SHA-256, which :func:`load_model` checks. Each
    file is written under a temporary name, flushed to disk and renamed, so an interrupted save
    never leaves a half-written file.

    Raises:
        FinetuneError: the folder cannot be created or written (it is under a file, read-only, full).
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    if class_names is not None:
        model.pretrained_cfg = dict(model.pretrained_cfg, label_names=list(class_names))
    config = model_config(model)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {
        "format": "pt",
        "arch": config["architecture"],
        "finetune": json.dumps(
            {"arch": config["architecture"], "model_args": config["model_args"], "pretrained_cfg": config["pretrained_cfg"]}
        ),
    }
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write_atomically(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        config["weights_sha256"] = file_sha256(directory / WEIGHTS_NAME)
        write_text_atomically(directory / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    except OSError as exc:
        raise FinetuneError(
            f"Cannot save the model to {directory}: {exc.strerror or exc}.",
            "Pass a folder you can write to (not one under a file, nor on a read-only or full disk).",
        ) from None
    return directory


def model_from_config(
    config: dict[str, Any], state_dict: dict[str, torch.Tensor] | None = None, **model_kwargs: Any
) -> nn.Module:
    """The architecture a :func:`model_config` dict describes, with uninitialised weights (and
    non-persistent buffers, which no state dict holds, computed as at construction).

    For loading a state dict saved from the same model (a training checkpoint): nothing is read
    from the model's original source, so a run resumes even where that source is not available.

    Args:
        config: :func:`model_config`'s output.
        state_dict: the weights it will be loaded with; its shapes are checked against ``config``
            before anything is built.
        **model_kwargs: constructor arguments it leaves out (``drop_path_rate``).
    """
    arch = config["architecture"]
    args = dict(config.get("model_args") or {})
    check_model_args(args, state_dict or {}, "the checkpoint's model config")
    build_args = {"num_classes": config["num_classes"], **args, **model_kwargs}
    with torch.device("meta"):  # no random init: every tensor is about to be loaded
        model = _timm_create(arch, **build_args)
    model = _materialise(model, arch, build_args)
    model.pretrained_cfg = dict(model.pretrained_cfg, **config.get("pretrained_cfg", {}))
    model.finetune_spec = {"arch": arch, "model_args": args}
    _sync_cfg(model)
    return model
