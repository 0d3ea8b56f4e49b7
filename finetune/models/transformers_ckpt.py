"""Hugging Face transformers ViT and DeiT checkpoints, read as the timm models they are (but for
LayerNorm's eps, see below).

A folder (or hub repository) that transformers saved has a ``config.json`` with a ``model_type``
(``vit``, ``deit``) and ``model.safetensors`` or ``pytorch_model.bin``. Its config maps onto a timm
architecture and constructor arguments, and its tensors onto timm's names, one by one: no
transformers code is imported or run, so loading such a checkpoint does not need transformers.

What each transformers class becomes (logits equal transformers' own in eval mode, to about 1e-6
relative with trained weights):

- ``ViTModel``, ``ViTForImageClassification``: ``vit_*``, class token, ``token`` pooling, ``head``.
- ``DeiTModel``, ``DeiTForImageClassification``: ``deit_*`` with ``reg_tokens=1``; the distillation
  token is a register token that no head reads, as in transformers.
- ``DeiTForImageClassificationWithTeacher``: ``deit_*_distilled_*``, ``head`` and ``head_dist``,
  averaged at inference as transformers does.

Names follow timm's where the shape has one (``deit_base_distilled_patch16_384``); otherwise the
family's base model, with every shape argument set from ``config.json``. transformers' LayerNorm
eps (1e-12) becomes timm's (1e-6), so every saved copy is a model plain timm builds; logits move by
about 1e-6 relative for trained weights (more at random init, where activations are tiny).

The bare models' tanh pooler (``pooler.dense``) and mask token have no timm counterpart and are
dropped: the class token, normalised, is what a new head reads, as in the classification models.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import timm
import torch

from ..errors import CheckpointError
from .reading import CONFIG_MAX_BYTES, check_model_args, check_pretrained_cfg, read_checkpoint

SUPPORTED_TYPES = ("vit", "deit")
# transformers class -> what it holds: a bare backbone, one classifier, or DeiT's two heads.
ARCHITECTURES = {
    "ViTModel": "backbone",
    "ViTForImageClassification": "classifier",
    "DeiTModel": "backbone",
    "DeiTForImageClassification": "classifier",
    "DeiTForImageClassificationWithTeacher": "teacher",
}
# transformers' ``hidden_act`` -> timm's activation name (None: timm's default, exact GELU).
ACTIVATIONS = {"gelu": None, "gelu_python": None, "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "quick_gelu": "quick_gelu", "relu": "relu", "silu": "silu", "swish": "silu"}
# What transformers' image processors default to when a folder has no preprocessor_config.json.
FAMILY_DEFAULTS = {
    "vit": {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear", "crop_pct": 1.0},
    "deit": {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "interpolation": "bicubic",
             "crop_pct": 0.875},
}
PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
# (width, depth, heads) -> the size word in timm's names, to name the architecture as timm would.
SIZE_NAMES = {(192, 12, 3): "tiny", (384, 12, 6): "small", (768, 12, 12): "base", (1024, 24, 16): "large",
              (1280, 32, 16): "huge"}
_SUPPORTED_TEXT = ("finetune reads transformers checkpoints of model_type 'vit' and 'deit' (ViTModel, "
                   "ViTForImageClassification, DeiTModel, DeiTForImageClassification, "
                   "DeiTForImageClassificationWithTeacher)")


# --------------------------------------------------------------------------------------------
# The config


def read_transformers_config(path: Path) -> dict[str, Any] | None:
    """The ``config.json`` at ``path`` when transformers wrote it (a ``model_type``, no timm
    ``architecture``); ``None`` for any other file, which the timm config reader then reads."""
    cfg = _read_json(path)
    if isinstance(cfg, dict) and "model_type" in cfg and "architecture" not in cfg:
        return cfg
    return None


def _read_json(path: Path) -> Any:
    try:
        if path.stat().st_size > CONFIG_MAX_BYTES:
            return None
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, RecursionError, json.JSONDecodeError):
        return None


def _kind(config: dict[str, Any], state_dict: dict[str, torch.Tensor], where: str) -> str:
    """``backbone``, ``classifier`` or ``teacher``: from ``architectures``, else from the tensors."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_TYPES:
        raise CheckpointError(
            f"{where} is a transformers config of model_type {_short(model_type)}; {_SUPPORTED_TEXT}.",
            "For other families load timm's own weights (a timm name such as swin_tiny_patch4_window7_224, "
            "or hf-hub:timm/...), which finetune adapts at load time.",
        )
    names = config.get("architectures")
    if names is None:
        if any(k.endswith("distillation_classifier.weight") for k in state_dict):
            return "teacher"
        return "classifier" if any(k.split(".")[0].endswith("classifier") for k in state_dict) else "backbone"
    if not (isinstance(names, list) and len(names) == 1 and names[0] in ARCHITECTURES
            and names[0].lower().startswith(model_type)):
        raise CheckpointError(
            f"{where} names the transformers class(es) {_short(names)} for model_type '{model_type}'; "
            f"{_SUPPORTED_TEXT}.",
            "Save the model as one of those classes (e.g. ViTForImageClassification.from_pretrained(...)"
            ".save_pretrained(folder)), or load timm's weights of the architecture instead.",
        )
    return ARCHITECTURES[names[0]]


def _config_values(config: dict[str, Any], where: str) -> dict[str, Any]:
    """The config's shape values, checked (transformers' defaults for the ones it leaves out)."""
    problems: list[str] = []

    def get(key: str, default: Any, ok: Any, what: str) -> Any:
        value = config.get(key, default)
        if not ok(value):
            problems.append(f"{key}={_short(value)} should be {what}")
        return value

    def whole(low: int, high: int):
        return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high

    def size(high: int):
        return lambda v: whole(1, high)(v) or (
            isinstance(v, list) and len(v) == 2 and all(whole(1, high)(x) for x in v))

    values = {
        "width": get("hidden_size", 768, whole(1, 16384), "a whole number from 1 to 16384"),
        "depth": get("num_hidden_layers", 12, whole(1, 256), "a whole number from 1 to 256"),
        "heads": get("num_attention_heads", 12, whole(1, 1024), "a whole number from 1 to 1024"),
        "mlp": get("intermediate_size", 3072, whole(1, 1 << 20), "a whole number from 1 to 1048576"),
        "img": get("image_size", 224, size(16384), "a whole number (or two) from 1 to 16384"),
        "patch": get("patch_size", 16, size(1024), "a whole number (or two) from 1 to 1024"),
        "chans": get("num_channels", 3, whole(1, 64), "a whole number from 1 to 64"),
        "qkv_bias": get("qkv_bias", True, lambda v: isinstance(v, bool), "true or false"),
        "act": get("hidden_act", "gelu", lambda v: v in ACTIVATIONS, f"one of {', '.join(ACTIVATIONS)}"),
        # Checked so that a broken config is refused by name, though the model uses timm's eps.
        "eps": get("layer_norm_eps", 1e-12, lambda v: _number(v) and 0 < v <= 0.1, "a number in (0, 0.1]"),
    }
    if not problems and values["width"] % values["heads"]:
        problems.append(f"num_attention_heads={values['heads']} does not divide hidden_size={values['width']}")
    if not problems and int(values["width"] * (values["mlp"] / values["width"])) != values["mlp"]:
        problems.append(f"intermediate_size={values['mlp']} is not a width timm's MLP can be built with")
    if problems:
        raise CheckpointError(
            f"{where} cannot be read as a transformers {config.get('model_type')} model: {'; '.join(problems)}.",
            "Use the config.json that came with the weights (transformers' save_pretrained writes one).",
        )
    return values


def _model_args(values: dict[str, Any], kind: str, model_type: str) -> dict[str, Any]:
    """timm constructor arguments for the config's ``values`` (see :func:`_config_values`)."""
    args = {
        "img_size": values["img"], "patch_size": values["patch"], "embed_dim": values["width"],
        "depth": values["depth"], "num_heads": values["heads"], "mlp_ratio": values["mlp"] / values["width"],
        "qkv_bias": values["qkv_bias"], "in_chans": values["chans"],
    }
    # transformers' LayerNorm eps (1e-12) is not carried over: timm builds LayerNorm with its own
    # (1e-6) and config.json cannot name another, so a model that kept 1e-12 could be saved but not
    # loaded by plain timm. For trained weights the difference is far below fp32 noise: features
    # entering a LayerNorm have a variance of order 1, and eps/(2 var) ~ 5e-7 of each output.
    if ACTIVATIONS[values["act"]] is not None:
        args["act_layer"] = ACTIVATIONS[values["act"]]
    if model_type == "deit" and kind != "teacher":
        args["reg_tokens"] = 1  # DeiT's distillation token, which no head of these classes reads
    return args


def _timm_arch(values: dict[str, Any], kind: str, model_type: str) -> str:
    """The timm name of this shape (``deit_base_distilled_patch16_384``) when timm has one, else
    the family's base model, whose every shape argument the model args then set."""
    size = SIZE_NAMES.get((values["width"], values["depth"], values["heads"]), "base")
    img, patch = values["img"], values["patch"]
    square = isinstance(img, int) and isinstance(patch, int)
    family = {"teacher": "deit_{}_distilled", "classifier": "{}_{}", "backbone": "{}_{}"}[kind]
    stem = family.format(size) if kind == "teacher" else family.format(model_type, size)
    if square and timm.is_model(f"{stem}_patch{patch}_{img}"):
        return f"{stem}_patch{patch}_{img}"
    return "deit_base_distilled_patch16_224" if kind == "teacher" else f"{model_type}_base_patch16_224"


def _pretrained_cfg(config: dict[str, Any], model_type: str, head_rows: int, folder: Path, where: str) -> dict:
    """Normalisation, resize and class names; timm's provenance fields cleared (these are not its weights)."""
    cfg: dict[str, Any] = dict(FAMILY_DEFAULTS[model_type])
    cfg.update(_preprocessor(folder / PREPROCESSOR_NAME))
    cfg.update(hf_hub_id=None, url=None, file=None, tag=None, license=None, num_classes=head_rows)
    names = _label_names(config.get("id2label"), head_rows, where)
    if names is not None:
        cfg["label_names"] = names
    check_pretrained_cfg(cfg, where)
    return cfg


PREPROCESSOR_NAME = "preprocessor_config.json"  # where transformers keeps a model's image statistics


def _preprocessor(path: Path) -> dict[str, Any]:
    """Mean, std, interpolation and crop fraction from transformers' ``preprocessor_config.json``.

    Raises:
        CheckpointError: a value finetune would use that is not what transformers allows (a mean
            of 2 numbers, a negative std, an unknown resample), named with the fix, rather than
            the family's defaults in its place without a word.
    """
    if not path.is_file():
        return {}
    proc = _read_json(path)
    if not isinstance(proc, dict):
        raise CheckpointError(f"{path} cannot be read as processor settings (not a JSON mapping, or over "
                              f"{CONFIG_MAX_BYTES:,} bytes).",
                              "Use the preprocessor_config.json that came with the model, or delete it.")
    found: dict[str, Any] = {}
    problems = []
    for key, ours in (("image_mean", "mean"), ("image_std", "std")):
        value = proc.get(key)
        if value is None:
            continue
        values = [value] * 3 if _number(value) else value  # transformers broadcasts one number
        if not (isinstance(values, list) and len(values) == 3 and all(_number(v) and abs(v) <= 1e3 for v in values)):
            problems.append(f"{key}={_short(value)} should be 3 numbers (one per channel) or one number")
        elif ours == "std" and min(values) <= 0:
            problems.append(f"{key}={_short(value)} should be positive")
        else:
            found[ours] = tuple(float(v) for v in values)
    resample = proc.get("resample")
    if resample in PIL_RESAMPLE:
        found["interpolation"] = PIL_RESAMPLE[resample]
    elif resample is not None and not (type(resample) is int and 0 <= resample <= 5):
        problems.append(f"resample={_short(resample)} should be one of PIL's resampling filters (0 to 5)")
    elif resample is not None:  # LANCZOS, BOX or HAMMING: valid, but not a mode finetune resizes with
        warnings.warn(f"{path}: resample={resample} is a PIL filter finetune does not resize with; the family's "
                      "default interpolation is used instead.", stacklevel=2)
    if problems:
        raise CheckpointError(f"{path}: {'; '.join(problems)}.",
                              "Fix the value (transformers' image processors write image_mean and image_std as "
                              "lists of 3 numbers), or delete the key to use the family's defaults.")
    crop, resize = proc.get("crop_size"), proc.get("size")
    if proc.get("do_center_crop") and isinstance(crop, dict) and isinstance(resize, dict):
        crop_h, size_h = crop.get("height"), resize.get("height") or resize.get("shortest_edge")
        if _number(crop_h) and _number(size_h) and 0 < crop_h <= size_h:
            found["crop_pct"] = round(crop_h / size_h, 4)
    elif proc.get("do_center_crop") is False:
        found["crop_pct"] = 1.0
    return found


def _label_names(id2label: Any, head_rows: int, where: str) -> list[str] | None:
    """Class names in the head's order; ``None`` for none or transformers' placeholders (``LABEL_0``...)."""
    if id2label is None or head_rows == 0:
        return None
    ok = isinstance(id2label, dict) and all(isinstance(v, str) and len(v) <= 500 for v in id2label.values())
    if ok and set(id2label) != {str(i) for i in range(head_rows)}:
        ok = False
    if not ok:
        raise CheckpointError(
            f"{where}: id2label should map each of the head's {head_rows} outputs (\"0\" to \"{head_rows - 1}\") "
            f"to a class name; it holds {_short(id2label)}.",
            "Fix id2label (one name per class, in the head's order) or delete it to number the classes; "
            "or pass num_classes=... to replace the head.",
        )
    names = [id2label[str(i)] for i in range(head_rows)]
    return None if names == [f"LABEL_{i}" for i in range(head_rows)] else names


# --------------------------------------------------------------------------------------------
# The tensors

# Inside block N, transformers' module names (4.x layout, and 5.x's own) -> timm's. q, k and v
# are fused into timm's one ``attn.qkv`` projection afterwards.
_BLOCK_PARTS = {
    "attention.attention.query": "q", "attention.attention.key": "k", "attention.attention.value": "v",
    "attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    "layernorm_before": "norm1", "layernorm_after": "norm2",
}
_BLOCK = re.compile(r"(?:encoder\.layer|layers)\.(\d+)\.(.+)")
_MODULES = {"embeddings.patch_embeddings.projection": "patch_embed.proj", "layernorm": "norm",
            "classifier": "head", "cls_classifier": "head", "distillation_classifier": "head_dist"}
_DROPPED = ("pooler.", "embeddings.mask_token")  # no timm counterpart (see the module docstring)


def convert_state_dict(
    state_dict: dict[str, torch.Tensor], *, kind: str, where: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """A transformers ViT/DeiT state dict under timm's names.

    Args:
        state_dict: transformers' tensors, with or without the ``vit.`` / ``deit.`` prefix of the
            classification models; ``query``/``key``/``value`` ((D, D) each) become one
            ``blocks.N.attn.qkv`` ((3D, D), in q, k, v order, as timm splits it).
        kind: ``backbone``, ``classifier`` or ``teacher``; DeiT's distillation token becomes
            ``dist_token`` for ``teacher``, else ``reg_token``.
        where: the file, for messages.

    Raises:
        CheckpointError: a tensor that no transformers ViT/DeiT has, or a block without all of q, k, v.
    """
    tokens = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
              "embeddings.distillation_token": "dist_token" if kind == "teacher" else "reg_token"}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state_dict.items():
        name = re.sub(r"^(?:vit|deit)\.", "", key)
        module, _, param = name.rpartition(".")
        block = _BLOCK.fullmatch(module)
        if name.startswith(_DROPPED):
            continue
        if name in tokens:
            out[tokens[name]] = tensor
        elif module in _MODULES:
            out[f"{_MODULES[module]}.{param}"] = tensor
        elif block is not None and block.group(2) in _BLOCK_PARTS:
            part = _BLOCK_PARTS[block.group(2)]
            if part in ("q", "k", "v"):
                qkv.setdefault((int(block.group(1)), param), {})[part] = tensor
            else:
                out[f"blocks.{block.group(1)}.{part}.{param}"] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"{where} has tensors that no transformers ViT or DeiT has: {', '.join(unknown[:6])}"
            f"{' ...' if len(unknown) > 6 else ''}; it was saved by another model class. {_SUPPORTED_TEXT}.",
            "Pass a folder saved from one of those classes, or load timm's weights of the architecture.",
        )
    for (index, param), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(
                f"{where}: block {index}'s attention has the {param} of {', '.join(sorted(parts))} only, "
                "not of all of query (q), key (k) and value (v).",
                "The file is incomplete: save or download the model again.",
            )
        out[f"blocks.{index}.attn.qkv.{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def load_transformers_checkpoint(config: dict[str, Any], weights: Path, *, config_path: Path,
                                 origin: str) -> dict[str, Any]:
    """Read a transformers ViT/DeiT checkpoint as timm's equivalent model.

    Args:
        config: the parsed ``config.json`` (from :func:`read_transformers_config`).
        weights: ``model.safetensors`` or ``pytorch_model.bin`` (read with
            :func:`finetune.models.reading.read_checkpoint`: no pickled code runs).
        config_path: where ``config`` came from; a ``preprocessor_config.json`` beside it gives
            the mean, std and resize.
        origin: the folder or hub repository, for messages and reports.

    Returns:
        The fields of a :class:`finetune.models.sources.ResolvedSource`: ``state_dict`` (timm's
        names), ``arch``, ``pretrained_cfg``, ``model_args`` and ``origin``.
    """
    where = str(config_path)
    raw, _ = read_checkpoint(weights)
    kind = _kind(config, raw, where)
    values = _config_values(config, where)
    state_dict = convert_state_dict(raw, kind=kind, where=str(weights))
    model_type = config["model_type"]
    model_args = _model_args(values, kind, model_type)
    check_model_args(model_args, state_dict, origin)  # bounds, and agreement with the tensors' shapes
    head = state_dict.get("head.weight")
    head_rows = int(head.shape[0]) if head is not None and head.ndim == 2 else 0
    return {
        "state_dict": state_dict,
        "arch": _timm_arch(values, kind, model_type),
        "pretrained_cfg": _pretrained_cfg(config, model_type, head_rows, config_path.parent, where),
        "model_args": model_args,
        "origin": origin,
    }


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
