"""Finding and reading pretrained weights: hub downloads, local files and folders.

Everything here returns plain CPU state dicts plus what the source says about itself
(architecture, pretrained config); adapting them to a new task is ``finetune.models``' job.
Pickled files are read with ``torch.load(weights_only=True)``: a checkpoint that carries code is
refused before any of it runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pickle
import pickletools
import re
import socket
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from ..errors import CheckpointError, FinetuneError, OfflineError, SourceNotFoundError

SAFETENSORS_NAME = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin", "model.pth", "model.pt")
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pth.tar")
HUB_PREFIX = "hf-hub:"
# How long to wait for the hub before declaring the machine offline. The hub client itself retries
# for about 50 s when there is no network; a user waiting for an error deserves better.
PROBE_TIMEOUT_S = 3.0


@dataclass
class ResolvedSource:
    """Weights and self-description of one pretrained source.

    Attributes:
        state_dict: name -> CPU tensor, with wrapper keys (``model``, ``state_dict``) and
            ``module.`` / ``_orig_mod.`` prefixes removed.
        arch: timm architecture name, when the source names one.
        pretrained_cfg: timm-style pretrained config (mean, std, input_size, label_names...).
        model_args: extra constructor arguments the source records (e.g. ``depth``).
        origin: where the weights came from, for messages and reports.
    """

    state_dict: dict[str, torch.Tensor]
    arch: str | None
    pretrained_cfg: dict[str, Any] = field(default_factory=dict)
    model_args: dict[str, Any] = field(default_factory=dict)
    origin: str = ""


# --------------------------------------------------------------------------------------------
# Local files


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
    return _strip_prefixes(state_dict), meta


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
    functions it names, read from its opcodes with ``pickletools`` without running any of them."""
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
    return _strip_prefixes(raw), meta


def _strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DistributedDataParallel adds "module.", torch.compile adds "_orig_mod.".
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


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
    for key in ("num_classes", "label_names", "label_descriptions"):
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

# What a model folder may ask of timm's ViT constructor: numbers, flags and layer names, each
# bounded. Anything else (checkpoint_path, pretrained_cfg_overlay, pretrained, a class...) could
# make timm open another file or build something unbounded, so it is refused.
_FLAG_ARGS = ("qkv_bias", "qk_norm", "scale_attn_norm", "scale_mlp_norm", "proj_bias", "class_token", "no_embed_class",
              "pre_norm", "final_norm", "pool_include_prefix", "dynamic_img_size", "dynamic_img_pad", "fix_init")
_INT_ARGS = {"depth": (1, 256), "embed_dim": (1, 16384), "num_heads": (1, 1024), "reg_tokens": (0, 64),
             "in_chans": (1, 64), "num_classes": (0, 1_000_000)}
_SIZE_ARGS = {"img_size": (1, 16384), "patch_size": (1, 1024)}
_RATE_ARGS = ("drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate")
_NAME_ARGS = ("global_pool", "pos_embed", "weight_init", "act_layer", "norm_layer", "embed_norm_layer")
ALLOWED_MODEL_ARGS = (*_FLAG_ARGS, *_INT_ARGS, *_SIZE_ARGS, *_RATE_ARGS, *_NAME_ARGS, "mlp_ratio", "init_values", "fc_norm")


def check_model_args(
    args: dict[str, Any], state_dict: dict[str, torch.Tensor], origin: str, *, keywords: bool = False
) -> None:
    """Check a model folder's ``model_args`` (or ``load_model``'s keyword arguments, with
    ``keywords``) before anything is built from them.

    Only :data:`ALLOWED_MODEL_ARGS` are accepted, each of its type and within bounds, and the
    ones the weights pin down (``depth``, ``embed_dim``, ``patch_size``, ``num_heads`` dividing
    ``embed_dim``) must agree with the tensors' shapes. So a config.json can neither make timm read
    another file nor build a model far larger than its weights.

    Raises:
        CheckpointError: naming the argument, what it should be, and the file (or, with
            ``keywords``, the keyword argument).
    """
    problems = []

    def bad(key: str, why: str) -> None:
        problems.append(f"{key}={_short(args[key])} {why}")

    for key, value in args.items():
        if key not in ALLOWED_MODEL_ARGS:
            problems.append(f"{key!r} is not an argument finetune passes on (it accepts {', '.join(ALLOWED_MODEL_ARGS[:8])}, ...)")
        elif key in _FLAG_ARGS and not isinstance(value, bool):
            bad(key, "should be true or false")
        elif key == "fc_norm" and not (value is None or isinstance(value, bool)):
            bad(key, "should be true, false or null")
        elif key in _INT_ARGS and not _int_in(value, *_INT_ARGS[key]):
            bad(key, f"should be a whole number from {_INT_ARGS[key][0]} to {_INT_ARGS[key][1]}")
        elif key in _SIZE_ARGS and not (_int_in(value, *_SIZE_ARGS[key]) or (
                isinstance(value, (list, tuple)) and len(value) == 2 and all(_int_in(v, *_SIZE_ARGS[key]) for v in value))):
            bad(key, f"should be a whole number (or two) from {_SIZE_ARGS[key][0]} to {_SIZE_ARGS[key][1]}")
        elif key in _RATE_ARGS and not _number_in(value, 0.0, 1.0, high_open=True):
            bad(key, "should be a number in [0, 1)")
        elif key in _NAME_ARGS and not (isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_]{0,40}", value)):
            bad(key, "should be a short name such as 'token', 'avg' or 'gelu'")
        elif key == "mlp_ratio" and not _number_in(value, 0.0, 64.0, low_open=True):
            bad(key, "should be a number in (0, 64]")
        elif key == "init_values" and not (value is None or _number_in(value, 0.0, 10.0)):
            bad(key, "should be null or a number in [0, 10]")
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
    if "num_heads" in args and (args.get("embed_dim") or width or 0) % args["num_heads"]:
        problems.append(f"num_heads={args['num_heads']} does not divide the width {args.get('embed_dim') or width}")
    proj = state_dict.get("patch_embed.proj.weight")
    if "patch_size" in args and proj is not None and proj.ndim == 4:
        patch = args["patch_size"]
        if tuple(patch if isinstance(patch, (list, tuple)) else (patch, patch)) != tuple(proj.shape[-2:]):
            problems.append(f"patch_size={_short(patch)} but the patch kernel is {proj.shape[-2]}x{proj.shape[-1]}")
    return problems


def check_pretrained_cfg(cfg: dict[str, Any], origin: str) -> None:
    """Check the parts of a pretrained config that finetune uses: normalisation and class names."""
    problems = []
    for key in ("mean", "std"):
        value = cfg.get(key)
        if value is not None and not (isinstance(value, (list, tuple)) and len(value) in (1, 3)
                                      and all(_number_in(v, -1e3, 1e3) for v in value)):
            problems.append(f"{key}={_short(value)} should be 3 numbers")
        elif key == "std" and value is not None and min(value) <= 0:
            problems.append(f"std={_short(value)} should be positive")
    names = cfg.get("label_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        problems.append("label_names should be a list of class names")
    if problems:
        raise CheckpointError(f"{origin}: its pretrained config cannot be used: {'; '.join(problems)}.", _CONFIG_FIX)


def _int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _number_in(value: Any, low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return (value > low if low_open else value >= low) and (value < high if high_open else value <= high)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def file_sha256(path: Path) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_folder(folder: Path, *, use_ema: bool = False) -> ResolvedSource:
    """A hub-style folder (``config.json`` + weights): a hub snapshot, a finetune run, a save."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise SourceNotFoundError(
            f"{folder} is a folder but has no config.json.",
            "Pass the weights file inside it instead, with arch=..., or add a timm-style config.json.",
        )
    cfg = read_config(config_path)
    for name in (SAFETENSORS_NAME, *PICKLE_NAMES):
        if (folder / name).is_file():
            weights = folder / name
            break
    else:
        raise SourceNotFoundError(
            f"{folder} has a config.json but no weights ({SAFETENSORS_NAME} or pytorch_model.bin).",
            "Copy the weights file into the folder.",
        )
    if cfg["weights_sha256"] is not None and file_sha256(weights) != cfg["weights_sha256"]:
        raise CheckpointError(
            f"{weights} does not match the SHA-256 recorded in {config_path}: the file was changed or damaged "
            "after it was saved (a flipped byte is enough to ruin a model's accuracy without any other sign).",
            "Copy or download the model folder again. If you replaced the weights on purpose, delete "
            "weights_sha256 from config.json.",
        )
    state_dict, _ = read_checkpoint(weights, use_ema=use_ema)
    check_model_args(cfg["model_args"], state_dict, str(folder))
    return ResolvedSource(
        state_dict, cfg["architecture"], cfg["pretrained_cfg"], cfg["model_args"], origin=str(folder)
    )


# --------------------------------------------------------------------------------------------
# Hugging Face hub


def hub_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """The hub cache folder in use (``HF_HUB_CACHE``, usually ``~/.cache/huggingface/hub``)."""
    if cache_dir is not None:
        return Path(cache_dir)
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def hub_offline_forced() -> bool:
    """True when the user told the hub client to stay offline (``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return env in ("1", "on", "yes", "true") or bool(getattr(constants, "HF_HUB_OFFLINE", False))


def endpoint_reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Can a TCP connection be opened to ``url``'s host (or its proxy) within ``timeout``?"""
    from urllib.request import getproxies, proxy_bypass

    parsed = urlparse(url)
    proxies = getproxies()  # HTTPS_PROXY, HTTP_PROXY, ALL_PROXY..., as the HTTP clients read them
    proxy = proxies.get(parsed.scheme) or proxies.get("all")
    if proxy and parsed.hostname and proxy_bypass(parsed.hostname):  # NO_PROXY
        proxy = None
    target = urlparse(proxy if proxy else url)
    host = target.hostname
    port = target.port or (443 if target.scheme == "https" else 80)
    if not host:
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_hub_file(repo_id: str, filename: str, revision: str | None, cache_dir: Path) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=str(cache_dir), revision=revision)
    return Path(found) if isinstance(found, str) else None


def _offline_error(repo_id: str, cache_dir: Path, why: str) -> OfflineError:
    folder = cache_dir / f"models--{repo_id.replace('/', '--')}"
    return OfflineError(
        f"Cannot get the weights of '{repo_id}': {why}, and they are not in the local hub cache "
        f"(looked for {folder}/snapshots/<revision>/config.json and {SAFETENSORS_NAME}).",
        f"On a machine with internet run `hf download {repo_id} config.json {SAFETENSORS_NAME}` "
        f"(or load the model once there) and copy its {folder.name} folder into {cache_dir} "
        "(or point HF_HUB_CACHE at a cache that has it); or pass a local weights file or folder as the source.",
    )


def resolve_hub(repo_id: str, *, revision: str | None = None, cache_dir: str | Path | None = None) -> ResolvedSource:
    """Weights of a hub repository holding a timm model (``config.json`` + weights).

    A repository already in the local hub cache is read with no network access at all. One that
    is not is downloaded; with no network the error comes within a few seconds and says how to
    pre-seed the cache.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise SourceNotFoundError(
            f"'{repo_id}' is not a valid hub repository id.",
            "Write it as hf-hub:org/name, e.g. hf-hub:timm/deit_tiny_patch16_224.fb_in1k.",
        ) from None
    cache = hub_cache_dir(cache_dir)
    config_path = _cached_hub_file(repo_id, "config.json", revision, cache)
    weights_path = None
    for name in (SAFETENSORS_NAME, PICKLE_NAMES[0]):
        weights_path = _cached_hub_file(repo_id, name, revision, cache)
        if weights_path is not None:
            break
    if config_path is None or weights_path is None:
        if hub_offline_forced():
            raise _offline_error(repo_id, cache, "HF_HUB_OFFLINE is set")
        endpoint = _hub_endpoint()
        if not endpoint_reachable(endpoint):
            raise _offline_error(repo_id, cache, f"the hub ({endpoint}) cannot be reached")
        config_path, weights_path = _download_hub(repo_id, revision, cache)
    cfg = read_config(config_path)
    state_dict, _ = read_checkpoint(weights_path)
    check_model_args(cfg["model_args"], state_dict, f"hf-hub:{repo_id}")
    cfg["pretrained_cfg"].setdefault("hf_hub_id", repo_id)
    return ResolvedSource(
        state_dict, cfg["architecture"], cfg["pretrained_cfg"], cfg["model_args"], origin=f"hf-hub:{repo_id}"
    )


def _download_hub(repo_id: str, revision: str | None, cache: Path) -> tuple[Path, Path]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        config_path = hf_hub_download(repo_id, "config.json", revision=revision, cache_dir=str(cache))
        try:
            weights = hf_hub_download(repo_id, SAFETENSORS_NAME, revision=revision, cache_dir=str(cache))
        except EntryNotFoundError as exc:
            if isinstance(exc, LocalEntryNotFoundError):  # the connection failed, not the file
                raise
            weights = hf_hub_download(repo_id, PICKLE_NAMES[0], revision=revision, cache_dir=str(cache))
    except LocalEntryNotFoundError:
        # A subclass of EntryNotFoundError: the hub became unreachable after the probe.
        raise _offline_error(repo_id, cache, "the hub stopped answering during the download") from None
    except RepositoryNotFoundError:
        raise SourceNotFoundError(
            f"The hub has no repository '{repo_id}' (or it is private).",
            "Check the name on the hub; for a private repository log in with `hf auth login`.",
        ) from None
    except EntryNotFoundError:
        raise SourceNotFoundError(
            f"The hub repository '{repo_id}' has no config.json or weights file.",
            "It is probably not a timm model; pass a local weights file with arch=... instead.",
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        raise FinetuneError(
            f"Downloading '{repo_id}' from the hub failed: {exc}.",
            "Check the network, or pass a local weights file or folder as the source.",
        ) from None
    return Path(config_path), Path(weights)
