"""Where pretrained weights come from: timm names, Hugging Face hub ids, local folders and files.

:func:`resolve_source` turns any of them into a :class:`ResolvedSource` (a CPU state dict and what
the source says about itself: architecture, pretrained config, constructor arguments). Reading a
file safely is :mod:`finetune.models.reading`'s job; adapting the weights to a new task is
:mod:`finetune.models.build`'s.
"""

from __future__ import annotations

import difflib
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch

from ..errors import CheckpointError, FinetuneError, OfflineError, SourceNotFoundError
from ..hub import endpoint_reachable, hub_cache_dir, hub_endpoint, hub_offline_forced
from .reading import check_model_args, check_pretrained_cfg, describe_checkpoint, file_sha256, read_checkpoint, read_config
from .transformers_ckpt import PREPROCESSOR_NAME, load_transformers_checkpoint, read_transformers_config

SAFETENSORS_NAME = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin", "model.pth", "model.pt")
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pth.tar")
HUB_PREFIX = "hf-hub:"
# How long to wait for the hub before declaring the machine offline. The hub client itself retries
# for about 50 s when there is no network; a user waiting for an error deserves better.
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
# Any source


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


def source_unavailable(source: str | Path, *, cache_dir: str | Path | None = None) -> str | None:
    """Why the weights of ``source`` cannot be had on this machine now, or ``None`` when they can
    (a file or model folder that exists, a hub model in the local cache, or one the hub can be
    reached for). Reads no weights and downloads nothing: for ``compare --dry-run``."""
    text = str(source)
    path = Path(text).expanduser()
    if text.startswith(HUB_PREFIX):
        repo_id, _, revision = text[len(HUB_PREFIX):].partition("@")
    elif path.is_dir():
        return None if (path / "config.json").is_file() else (
            f"{path} has no config.json (a run saves its model only when it finishes)")
    elif path.is_file():
        return None
    elif _looks_like_path(text):
        return f"no such file or folder: {path}"
    else:
        try:
            cfg = timm.models.get_pretrained_cfg(text)
        except RuntimeError:
            cfg = None
        if cfg is None or not cfg.hf_hub_id:
            return f"timm has no hub weights named {text!r}"
        repo_id, _, revision = cfg.hf_hub_id.partition("@")
    cache = hub_cache_dir(cache_dir)
    if _cached_hub_file(repo_id, "config.json", revision or None, cache) is not None and any(
            _cached_hub_file(repo_id, name, revision or None, cache) is not None
            for name in (SAFETENSORS_NAME, PICKLE_NAMES[0])):
        return None
    if hub_offline_forced():
        return f"{repo_id} is not in the local hub cache ({cache}) and HF_HUB_OFFLINE is set"
    if not endpoint_reachable(hub_endpoint()):
        return f"{repo_id} is not in the local hub cache ({cache}) and the hub ({hub_endpoint()}) cannot be reached"
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


# --------------------------------------------------------------------------------------------
# Local files and folders


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


def resolve_folder(folder: Path, *, use_ema: bool = False) -> ResolvedSource:
    """A hub-style folder (``config.json`` + weights): a hub snapshot, a finetune run, a save."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise SourceNotFoundError(
            f"{folder} is a folder but has no config.json.",
            "Pass the weights file inside it instead, with arch=..., or add a timm-style config.json.",
        )
    transformers_config = read_transformers_config(config_path)  # a folder transformers saved
    cfg = read_config(config_path) if transformers_config is None else {}
    for name in (SAFETENSORS_NAME, *PICKLE_NAMES):
        if (folder / name).is_file():
            weights = folder / name
            break
    else:
        raise SourceNotFoundError(
            f"{folder} has a config.json but no weights ({SAFETENSORS_NAME} or pytorch_model.bin).",
            "Copy the weights file into the folder.",
        )
    if transformers_config is not None:
        return ResolvedSource(**load_transformers_checkpoint(
            transformers_config, weights, config_path=config_path, origin=str(folder)))
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
        endpoint = hub_endpoint()
        if not endpoint_reachable(endpoint):
            raise _offline_error(repo_id, cache, f"the hub ({endpoint}) cannot be reached")
        config_path, weights_path = _download_hub(repo_id, revision, cache)
    transformers_config = read_transformers_config(config_path)  # a transformers ViT/DeiT repository
    if transformers_config is not None:
        _fetch_preprocessor(repo_id, revision, cache)  # beside config.json, where the reader looks
        return ResolvedSource(**load_transformers_checkpoint(
            transformers_config, weights_path, config_path=config_path, origin=f"hf-hub:{repo_id}"))
    cfg = read_config(config_path)
    state_dict, _ = read_checkpoint(weights_path)
    check_model_args(cfg["model_args"], state_dict, f"hf-hub:{repo_id}")
    cfg["pretrained_cfg"].setdefault("hf_hub_id", repo_id)
    return ResolvedSource(
        state_dict, cfg["architecture"], cfg["pretrained_cfg"], cfg["model_args"], origin=f"hf-hub:{repo_id}"
    )


def _fetch_preprocessor(repo_id: str, revision: str | None, cache: Path) -> None:
    """Bring a transformers repository's ``preprocessor_config.json`` (its mean, std and resize)
    into the hub cache beside its ``config.json``: from the cache when it is there (or known to be
    absent from the repository), else from the hub. Offline with neither, say that the family's
    defaults stand in, rather than use them without a word."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    if try_to_load_from_cache(repo_id, PREPROCESSOR_NAME, cache_dir=str(cache), revision=revision) is not None:
        return  # cached, or cached as missing from the repository
    unreachable = "HF_HUB_OFFLINE is set" if hub_offline_forced() else (
        None if endpoint_reachable(hub_endpoint()) else "the hub cannot be reached")
    if unreachable is None:
        try:
            hf_hub_download(repo_id, PREPROCESSOR_NAME, revision=revision, cache_dir=str(cache))
            return
        except LocalEntryNotFoundError:
            unreachable = "the hub stopped answering"
        except EntryNotFoundError:
            return  # the repository has none: transformers' defaults are its preprocessing too
        except (HfHubHTTPError, OSError) as exc:
            unreachable = f"its download failed ({exc})"
    warnings.warn(f"hf-hub:{repo_id}: {PREPROCESSOR_NAME} is not in the local hub cache and {unreachable}, so the "
                  "model family's default mean, std and resize are used; they may not be the ones it was trained "
                  f"with. Run `hf download {repo_id} {PREPROCESSOR_NAME}` on a machine with internet.", stacklevel=2)


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
