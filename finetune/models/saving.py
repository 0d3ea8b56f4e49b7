"""Saving a model as a hub-style folder, and building an architecture back from its config.

:func:`save_model` writes ``config.json`` (:func:`model_config`, timm's layout plus the weights'
SHA-256) and ``model.safetensors``; :func:`~finetune.models.build.load_model` reads them back like
any other source. :func:`model_from_config` rebuilds the bare architecture from a config alone,
for loading a training checkpoint's state dict.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import FinetuneError
from ..snapshot import write_atomically, write_text_atomically
from .build import CONFIG_NAME, architecture_args, materialise, sync_pretrained_cfg, timm_create
from .pos_embed import to_2tuple
from .presets import PRESETS
from .reading import check_model_args, file_sha256
from .sources import SAFETENSORS_NAME


PLAIN_VIT = "vit_tiny_patch16_224"
"""The timm name a from-scratch preset is saved under when it is nothing but timm's
``VisionTransformer`` with other arguments: ``model_args`` then set every one of them, so plain
``timm.create_model("local-dir:FOLDER")`` builds it without finetune."""


def plain_timm(arch: str, args: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A preset's architecture as a timm name and complete arguments (``vit_lab`` ->
    ``vit_tiny_patch16_224`` with ``embed_dim=64, depth=12, ...``); any other architecture as it is.
    A preset with a conv tokenizer keeps its name: only finetune can build it."""
    preset = PRESETS.get(arch)
    if preset is None or "stem_channels" in {**preset[0], **args}:  # a conv tokenizer, the preset's or given
        return arch, args
    return PLAIN_VIT, {**{k: v for k, v in preset[0].items() if k not in ("img_size", "patch_size")}, **args}


def model_config(model: nn.Module) -> dict[str, Any]:
    """A timm-style ``config.json`` that rebuilds ``model`` with :func:`load_model` and, unless it
    needs finetune's own layers (a conv tokenizer), with plain ``timm.create_model("local-dir:...")``."""
    spec = getattr(model, "finetune_spec", None) or {
        # A model built with timm.create_model: timm (>= 1.0.22) records its constructor arguments.
        "arch": model.pretrained_cfg.get("architecture"),
        "model_args": {
            k: v for k, v in architecture_args(dict(getattr(model, "_model_args", {}))).items()
            if k not in ("num_classes", "img_size", "patch_size")
        },
    }
    args = dict(spec["model_args"])
    if hasattr(model, "patch_embed"):
        args["img_size"] = list(to_2tuple(model.patch_embed.img_size))
        args["patch_size"] = list(to_2tuple(model.patch_embed.patch_size))
    keep = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std", "first_conv",
            "classifier", "hf_hub_id", "tag")
    cfg = {k: model.pretrained_cfg[k] for k in keep if model.pretrained_cfg.get(k) is not None}
    arch, args = plain_timm(spec["arch"], args)
    config = {
        "architecture": arch,
        "num_classes": model.num_classes,
        "num_features": getattr(model, "num_features", None),
        "global_pool": getattr(model, "global_pool", None),
        "model_args": args,
        "pretrained_cfg": cfg,
    }
    if model.pretrained_cfg.get("label_names") is not None:
        # Beside pretrained_cfg, where timm writes and reads them and transformers' timm wrapper
        # takes its id2label from.
        config["label_names"] = list(model.pretrained_cfg["label_names"])
    if model.pretrained_cfg.get("stored_size") is not None:
        # finetune's own key, beside pretrained_cfg too: timm builds its PretrainedCfg from every key
        # inside it and refuses one it does not know, but ignores top-level keys it does not read.
        config["stored_size"] = list(model.pretrained_cfg["stored_size"])
    return config


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
            {"arch": config["architecture"], "model_args": config["model_args"],
             "pretrained_cfg": {**config["pretrained_cfg"],
                                **{k: config[k] for k in ("label_names", "stored_size") if k in config}}}
        ),
    }
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write_atomically(directory / SAFETENSORS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        config["weights_sha256"] = file_sha256(directory / SAFETENSORS_NAME)
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
        model = timm_create(arch, **build_args)
    model = materialise(model, arch, build_args)
    model.pretrained_cfg = dict(model.pretrained_cfg, **config.get("pretrained_cfg", {}))
    for key in ("label_names", "stored_size"):
        if config.get(key) is not None:
            model.pretrained_cfg[key] = list(config[key])
    model.finetune_spec = {"arch": arch, "model_args": args}
    sync_pretrained_cfg(model)
    return model
