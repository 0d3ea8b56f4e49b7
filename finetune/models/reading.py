"""Reading weights files safely, and checking what a checkpoint says about itself.

Everything here returns plain CPU state dicts (wrapper keys and ``module.`` / ``_orig_mod.``
prefixes removed) and checked metadata; finding a source is :mod:`finetune.models.sources`' job.
Pickled files are read with ``torch.load(weights_only=True)``: a checkpoint that carries code is
refused before any of it runs. ``config.json`` and saved metadata are data, checked for types and
bounds before timm sees them (as are ``load_model``'s keywords and class count), and the weights'
values are checked before they load (:func:`check_weight_values`: no integers cast, no NaN).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from timm.models import clean_state_dict  # drops DDP's "module." and torch.compile's "_orig_mod."

from ..errors import CheckpointError, FinetuneError, SourceNotFoundError
from ..recipe.model_args import MAX_CLASSES, arg_problem, number_in, short, size_in


def read_checkpoint(path: str | Path, *, use_ema: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a weights file safely.

    Args:
        path: ``.safetensors``, or a pickled ``.pth``/``.pt``/``.bin``/``.ckpt`` file: a bare state
            dict, the original DeiT release ``{"model": state_dict}``, or a timm training
            checkpoint ``{"state_dict": ..., "state_dict_ema": ..., "arch": ...}``.
        use_ema: take ``state_dict_ema`` (or ``model_ema``) when the checkpoint has one.

    Returns:
        ``(state_dict, meta)``: meta holds ``arch`` when the file records it, and ``finetune``
        (a dict) for files this toolkit wrote.

    Raises:
        SourceNotFoundError: the file does not exist.
        CheckpointError: the file is corrupt, not a checkpoint, or carries pickled code.
    """
    path = Path(path)
    if not path.is_file():
        raise SourceNotFoundError(
            f"Checkpoint file not found: {path}.",
            "Check the path, or pass a timm model name (e.g. deit_tiny_patch16_224) to download weights.",
        )
    if path.suffix == ".safetensors":
        if use_ema:
            raise CheckpointError(
                f"{path} is a safetensors file, which holds one set of weights and no EMA copy.",
                "Load it without use_ema, or pass the timm training checkpoint that has state_dict_ema.",
            )
        return _read_safetensors(path)
    raw = _torch_load_safely(path)
    return _unwrap(raw, path, use_ema=use_ema)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            state_dict = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({exc}).",
            "The file is probably truncated or corrupt: download or save it again.",
        ) from None
    meta: dict[str, Any] = {}
    if "arch" in metadata:
        meta["arch"] = metadata["arch"]
    if "finetune" in metadata:
        try:
            meta["finetune"] = json.loads(metadata["finetune"])
        except json.JSONDecodeError:
            raise CheckpointError(
                f"{path} has unreadable finetune metadata (not JSON).",
                "Save the model again with finetune.save_model, or strip the file's metadata.",
            ) from None
    return clean_state_dict(state_dict), meta


def _torch_load_safely(path: Path) -> Any:
    # timm's train.py stores its argparse.Namespace under "args"; a Namespace only sets attributes,
    # so allowing it keeps real timm checkpoints loadable without allowing arbitrary code.
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch words every weights_only failure alike; only an unsupported GLOBAL is a payload
        # (a class or function to call), anything else is a damaged file.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        payload = next((line for line in lines if "unsupported global" in line.lower()), None)
        if payload is not None:
            raise CheckpointError(
                f"Refused to load {path}: it contains pickled Python objects other than tensors "
                f"(torch.load with weights_only=True said: {payload}). Such objects can run code "
                "when loaded, so the file was not loaded and none of its code ran.",
                "If you trust its origin, load it yourself, save only its tensors with "
                "safetensors.torch.save_file, and pass that file.",
            ) from None
        raise _corrupt(path, exc) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise _corrupt(path, exc) from None


def _pickled_globals(path: Path, limit: int = 64 << 20) -> list[str]:
    """What a plain pickle file (not torch's zip format) would import when loaded: the classes and
    functions it names, read from its opcodes with ``pickletools`` without running any of them.

    torch's ``get_unsafe_globals_in_checkpoint`` does this for ``torch.save``'s zip files only (it
    refuses a plain pickle, and reads no protocol above 2), and there ``torch.load`` already names
    the global; this is the case torch's legacy reader calls a corrupt file."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit)
        names, strings = [], []
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST"):
                names.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL":
                names.append(".".join(strings[-2:]) if len(strings) >= 2 else "(a name built on the stack)")
            elif isinstance(arg, str):
                strings.append(arg)
        return names
    except Exception:  # noqa: BLE001 - not a readable pickle: no names to report
        return []


def _corrupt(path: Path, exc: Exception) -> CheckpointError:
    # torch's legacy reader calls any file without its magic number corrupt, but a plain pickle of
    # an object is a payload, not damage: say so.
    payload = [name for name in _pickled_globals(path) if not name.startswith(("torch.", "collections.OrderedDict"))]
    if payload:
        return CheckpointError(
            f"Refused to load {path}: it is a pickle that would import {', '.join(payload[:3])} when loaded, "
            "which can run code. The file was not loaded and none of its code ran.",
            "If you trust its origin, load it yourself, save only its tensors with "
            "safetensors.torch.save_file, and pass that file.",
        )
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # torch's weights_only errors wrap the one useful line ("Unsupported operand 149") in advice.
    reason = next((line for line in lines if "unsupported" in line.lower()), lines[0] if lines else "")
    return CheckpointError(
        f"{path} is not a readable PyTorch checkpoint ({reason or type(exc).__name__}).",
        "The file is probably truncated or corrupt: download or save it again.",
    )


def _unwrap(raw: Any, path: Path, *, use_ema: bool) -> tuple[dict[str, torch.Tensor], dict]:
    if not isinstance(raw, dict):
        raise CheckpointError(
            f"{path} holds a {type(raw).__name__}, not a state dict.",
            "Save the model's state_dict() (or a dict with a 'model' or 'state_dict' key).",
        )
    meta: dict[str, Any] = {}
    if isinstance(raw.get("arch"), str):  # timm training checkpoint
        meta["arch"] = raw["arch"]
    # With use_ema only the EMA copy will do: falling back to the live weights would hand the
    # caller a model other than the one asked for.
    keys = ("state_dict_ema", "model_ema") if use_ema else ("state_dict", "model")
    for key in keys:
        if isinstance(raw.get(key), dict):
            raw = raw[key]
            break
    else:
        if use_ema:
            raise CheckpointError(
                f"{path} has no EMA weights (no 'state_dict_ema' or 'model_ema' key).",
                "Load it without use_ema.",
            )
    bad = [k for k, v in raw.items() if not isinstance(v, torch.Tensor)]
    if bad or not raw:
        raise CheckpointError(
            f"{path} does not look like model weights: "
            + (f"entries {bad[:5]} are not tensors." if bad else "it is empty."),
            "Pass a state dict, a DeiT release file ({'model': ...}) or a timm training checkpoint.",
        )
    return clean_state_dict(raw), meta


CONFIG_MAX_BYTES = 1 << 20  # a config.json is a few kB; a larger one is not a model's config


def read_config(path: Path) -> dict[str, Any]:
    """Read a hub-style ``config.json`` into ``{"architecture", "pretrained_cfg", "model_args",
    "weights_sha256"}``, checking it as data: types and bounds (see :func:`check_model_args`)."""
    try:
        if path.stat().st_size > CONFIG_MAX_BYTES:
            raise CheckpointError(
                f"{path} is {path.stat().st_size:,} bytes, far more than a model's config.json.",
                "Use the config.json that came with the weights.",
            )
        cfg = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, RecursionError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({type(exc).__name__}: {exc}).", "Fix or re-download the file.") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("architecture"), str):
        raise CheckpointError(
            f"{path} does not name an architecture (no 'architecture' text).",
            "A timm hub config.json has one; pass arch=... or add it.",
        )
    if isinstance(cfg.get("pretrained_cfg"), dict):
        pretrained_cfg = dict(cfg["pretrained_cfg"])
    else:  # older single-dict layout
        pretrained_cfg = {k: v for k, v in cfg.items() if k not in ("architecture", "num_features", "pretrained_cfg")}
    for key in ("num_classes", "label_names", "label_descriptions", "stored_size"):
        if key in cfg:
            pretrained_cfg[key] = cfg[key]
    model_args = cfg.get("model_args") or {}
    if not isinstance(model_args, dict):
        raise CheckpointError(f"{path}: model_args must be a mapping, got {type(model_args).__name__}.", _CONFIG_FIX)
    check_pretrained_cfg(pretrained_cfg, str(path))
    sha = cfg.get("weights_sha256")
    if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        raise CheckpointError(f"{path}: weights_sha256 is not a SHA-256 hex digest.", _CONFIG_FIX)
    return {"architecture": cfg["architecture"], "pretrained_cfg": pretrained_cfg, "model_args": dict(model_args),
            "weights_sha256": sha}


_CONFIG_FIX = "Use the config.json that came with the weights, or save the model again with finetune.save_model."

def check_num_classes(num_classes: Any, call: str) -> None:
    """Raise a :class:`FinetuneError` unless ``num_classes`` is a whole number from 1 to :data:`MAX_CLASSES`.

    The bound is the one a model folder's ``config.json`` is held to: a head for 10**9 classes
    would ask the allocator for 128 GB (ViT-B) and fail with its own traceback."""
    if not (isinstance(num_classes, int) and not isinstance(num_classes, bool) and 1 <= num_classes <= MAX_CLASSES):
        raise FinetuneError(
            f"{call}: num_classes must be a whole number of classes, 1 or more (at most {MAX_CLASSES:,}); got {num_classes!r}.",
            "Pass the new task's class count" + (", or num_classes=None to keep the checkpoint's head."
                                                 if call.startswith("load_model") else "."),
        )


def check_model_args(
    args: dict[str, Any], state_dict: dict[str, torch.Tensor], origin: str, *, keywords: bool = False
) -> None:
    """Check a model folder's ``model_args`` (or ``load_model``'s keyword arguments, with
    ``keywords``) before anything is built from them (a recipe's ``model.args`` are checked by the
    same rules when the recipe validates: :mod:`finetune.recipe.model_args`).

    Only :data:`finetune.recipe.model_args.ALLOWED_MODEL_ARGS` are accepted, each of its type and within bounds, and the
    ones the weights pin down (``depth``, ``embed_dim``, ``patch_size``, ``num_heads`` dividing
    ``embed_dim``) must agree with the tensors' shapes. So a config.json can neither make timm read
    another file nor build a model far larger than its weights.

    Raises:
        CheckpointError: naming the argument, what it should be, and the file (or, with
            ``keywords``, the keyword argument).
    """
    problems = [p for p in (arg_problem(key, value) for key, value in args.items()) if p is not None]
    if not problems:
        problems = _disagreements(args, state_dict)
    if problems and keywords:
        raise CheckpointError(
            f"load_model({origin!r}, ...): keyword arguments that cannot be used: {'; '.join(problems)}.",
            "Pass only ViT constructor arguments within their bounds (e.g. drop_path_rate=0.1); the architecture's "
            "shape comes from the weights.",
        )
    if problems:
        raise CheckpointError(f"{origin}: config.json's model_args cannot be used: {'; '.join(problems)}.", _CONFIG_FIX)


def _disagreements(args: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> list[str]:
    """The model_args that contradict the shapes of the weights they come with."""
    problems = []
    blocks = {int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    if "depth" in args and blocks and args["depth"] != max(blocks) + 1:
        problems.append(f"depth={args['depth']} but the weights have {max(blocks) + 1} blocks")
    width = next((state_dict[k].shape[-1] for k in ("cls_token", "pos_embed") if k in state_dict), None)
    if "embed_dim" in args and width is not None and args["embed_dim"] != width:
        problems.append(f"embed_dim={args['embed_dim']} but the weights are {width} wide")
    stages = {}  # Swin's layers.{stage}.blocks.{block}: blocks per stage
    for key in state_dict:
        parts = key.split(".")
        if len(parts) > 3 and parts[0] == "layers" and parts[2] == "blocks" and parts[1].isdigit() and parts[3].isdigit():
            stages[int(parts[1])] = max(stages.get(int(parts[1]), 0), int(parts[3]) + 1)
    depths = args.get("depths")
    if isinstance(depths, (list, tuple)) and stages and list(depths) != [stages.get(i, 0) for i in range(max(stages) + 1)]:
        problems.append(f"depths={short(depths)} but the weights have {[stages.get(i, 0) for i in range(max(stages) + 1)]} "
                        "blocks per stage")
    if isinstance(args.get("num_heads"), int) and (args.get("embed_dim") or width or 0) % args["num_heads"]:
        problems.append(f"num_heads={args['num_heads']} does not divide the width {args.get('embed_dim') or width}")
    proj = state_dict.get("patch_embed.proj.weight")
    if "patch_size" in args and proj is not None and proj.ndim == 4:
        patch = args["patch_size"]
        if tuple(patch if isinstance(patch, (list, tuple)) else (patch, patch)) != tuple(proj.shape[-2:]):
            problems.append(f"patch_size={short(patch)} but the patch kernel is {proj.shape[-2]}x{proj.shape[-1]}")
    return problems


def check_weight_values(state_dict: dict[str, torch.Tensor], model_state: dict[str, torch.Tensor], origin: str) -> None:
    """Refuse weights that loading would silently turn into other numbers.

    ``load_state_dict`` copies an int8 tensor into a float parameter by casting it (a quantized
    file's integers without their scales: a wrong model) and copies NaN or infinity as they are (a
    model whose every output is NaN). A checksum catches neither in a folder that has none, nor in
    a file saved that way. Half and double precision are fine: casting them keeps their values.

    The finite check sums each tensor (one pass, no mask as large as the weights, as an elementwise
    ``isfinite`` would allocate): a NaN or an infinity makes the sum one. Only a tensor whose sum is
    not finite is looked at element by element, to tell damage from a sum that overflowed.

    Raises:
        CheckpointError: naming every tensor of an integer or boolean type where the model has
            floating point, or holding NaN or infinite values (with how many).
    """
    integral = [f"{k} ({str(v.dtype).removeprefix('torch.')})" for k, v in state_dict.items()
                if k in model_state and model_state[k].is_floating_point() and not v.is_floating_point()]
    if integral:
        raise CheckpointError(
            f"{origin} holds {len(integral)} tensors of whole numbers where the model's weights are floating point: "
            f"{', '.join(integral[:6])}{', ...' if len(integral) > 6 else ''}. Casting them would give a different "
            "model without a word (a quantized file's integers mean nothing without their scales).",
            "Use the floating-point weights (float32, float16 or bfloat16) the model was released or saved with; "
            "dequantize a quantized file yourself before loading it.",
        )
    non_finite = []
    for key, value in state_dict.items():
        if key not in model_state or not value.is_floating_point() or value.numel() == 0:
            continue
        wide = torch.float32 if value.dtype in (torch.float16, torch.bfloat16) else None
        if torch.isfinite(value.sum(dtype=wide)):
            continue  # every element is finite (a NaN or an infinity would make the sum one)
        count = int((~torch.isfinite(value)).sum())
        if count:  # else the sum itself overflowed: large but finite weights
            non_finite.append(f"{key} ({count:,} of {value.numel():,})")
    if non_finite:
        raise CheckpointError(
            f"{origin} holds NaN or infinite weights in {len(non_finite)} tensors: "
            f"{', '.join(non_finite[:6])}{', ...' if len(non_finite) > 6 else ''}. Such a model outputs NaN.",
            "The file is damaged or was saved from a run that diverged: use another copy, or an earlier checkpoint.",
        )


def check_pretrained_cfg(cfg: dict[str, Any], origin: str) -> None:
    """Check the parts of a pretrained config that finetune uses: normalisation and class names."""
    problems = []
    for key in ("mean", "std"):
        value = cfg.get(key)
        if value is not None and not (isinstance(value, (list, tuple)) and len(value) in (1, 3)
                                      and all(number_in(v, -1e3, 1e3) for v in value)):
            problems.append(f"{key}={short(value)} should be 3 numbers")
        elif key == "std" and value is not None and min(value) <= 0:
            problems.append(f"std={short(value)} should be positive")
    names = cfg.get("label_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        problems.append("label_names should be a list of class names")
    stored = cfg.get("stored_size")  # finetune's own key: the size a run kept its images at
    if stored is not None and not (isinstance(stored, list) and len(stored) == 2 and size_in(stored, 2, 4096)):
        problems.append(f"stored_size={short(stored)} should be [height, width], each from 2 to 4096")
    if problems:
        raise CheckpointError(f"{origin}: its pretrained config cannot be used: {'; '.join(problems)}.", _CONFIG_FIX)


def file_sha256(path: Path) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
