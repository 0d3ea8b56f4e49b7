"""Finding and reading pretrained weights: hub downloads, local files and folders.

Everything here returns plain CPU state dicts plus what the source says about itself
(architecture, pretrained config); adapting them to a new task is ``finetune.models``' job.
Pickled files are read with ``torch.load(weights_only=True)``: a checkpoint that carries code is
refused before any of it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import socket
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from .errors import CheckpointError, FinetuneError, OfflineError, SourceNotFoundError

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


def _corrupt(path: Path, exc: Exception) -> CheckpointError:
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


def read_config(path: Path) -> dict[str, Any]:
    """Read a hub-style ``config.json`` into ``{"architecture", "pretrained_cfg", "model_args"}``."""
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}).", "Fix or re-download the file.") from None
    if not isinstance(cfg, dict) or "architecture" not in cfg:
        raise CheckpointError(
            f"{path} does not name an architecture (no 'architecture' key).",
            "A timm hub config.json has one; pass arch=... or add it.",
        )
    if "pretrained_cfg" in cfg:
        pretrained_cfg = dict(cfg["pretrained_cfg"])
    else:  # older single-dict layout
        pretrained_cfg = {k: v for k, v in cfg.items() if k not in ("architecture", "num_features")}
    for key in ("num_classes", "label_names", "label_descriptions"):
        if key in cfg:
            pretrained_cfg[key] = cfg[key]
    return {
        "architecture": cfg["architecture"],
        "pretrained_cfg": pretrained_cfg,
        "model_args": dict(cfg.get("model_args") or {}),
    }


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
            state_dict, _ = read_checkpoint(folder / name, use_ema=use_ema)
            break
    else:
        raise SourceNotFoundError(
            f"{folder} has a config.json but no weights ({SAFETENSORS_NAME} or pytorch_model.bin).",
            "Copy the weights file into the folder.",
        )
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
