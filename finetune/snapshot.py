"""Nested training state in one safetensors file, written atomically.

A training checkpoint is nested: model and EMA weights, an optimizer state dict keyed by integers
with tuples inside, scheduler and GradScaler settings, RNG states, counters. safetensors stores a
flat table of named tensors plus string metadata, and reading it never runs code. :func:`pack`
moves every tensor into the table and writes everything else as JSON that names its tensors, so
the whole state is one safetensors file: no pickle, nothing that needs ``weights_only``.

One file also makes the write atomic: it is written under a temporary name, flushed to disk and
renamed over the previous checkpoint, so a crash at any moment leaves either the old file or the
new one, never a mixture. The file also carries a SHA-256 of its state (skeleton and every
tensor's bytes), checked on reading, so a bit flipped on the disk is an error, not a silently
different run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, excerpt

FORMAT = "finetune-state/1"
_UMASK = os.umask(0o022)  # read once (reading it means setting it), and put back at once
os.umask(_UMASK)
_META_KEY = "finetune_state"
_SHA_KEY = "finetune_sha256"  # of the state; files written before it existed have none and are read unchecked
# The header metadata of a state file: with the SHA-256, or (written before it existed) without.
_METADATA_KEYS = ({"format", _META_KEY, _SHA_KEY}, {"format", _META_KEY})
# Markers for what JSON cannot say directly. A dict whose keys are not all plain strings (the
# optimizer's integer parameter ids) or that could be mistaken for a marker is stored as pairs.
_TENSOR, _TUPLE, _FLOAT, _PAIRS = "__tensor__", "__tuple__", "__float__", "__pairs__"


def pack(tree: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split nested state into a name -> tensor table and a JSON-compatible skeleton.

    Args:
        tree: ``None``, bools, ints, floats (NaN and infinities too), strings, tensors, and
            lists, tuples and dicts of these (dict keys: any of the scalar kinds).

    Returns:
        ``(tensors, skeleton)``: contiguous CPU copies of every tensor, named by where they sit
        (``optimizer/state/3/exp_avg``), and the rest of the tree with ``{"__tensor__": name}``
        in their places.

    Raises:
        TypeError: something that is none of the kinds above (a NumPy array, an object).
    """
    tensors: dict[str, torch.Tensor] = {}

    def name_for(path: list[str]) -> str:
        base = "/".join(path) or "tensor"
        name, n = base, 1
        while name in tensors:
            name, n = f"{base}#{n}", n + 1
        return name

    def encode(value: Any, path: list[str]) -> Any:
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {_FLOAT: repr(value)}  # 'nan', 'inf', '-inf'
        if isinstance(value, torch.Tensor):
            name = name_for(path)
            # A copy: safetensors refuses tensors that share memory, and the caller keeps training.
            tensors[name] = value.detach().to("cpu", copy=True).contiguous()
            return {_TENSOR: name}
        if isinstance(value, tuple):
            return {_TUPLE: [encode(v, [*path, str(i)]) for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [encode(v, [*path, str(i)]) for i, v in enumerate(value)]
        if isinstance(value, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in value):
                return {k: encode(v, [*path, k]) for k, v in value.items()}
            return {_PAIRS: [[encode(k, path), encode(v, [*path, str(k)])] for k, v in value.items()]}
        raise TypeError(f"cannot store a {type(value).__name__} at {'/'.join(path) or 'the top'} in a state file")

    return tensors, encode(tree, [])


def unpack(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`pack`.

    Raises:
        KeyError: the skeleton names a tensor the table does not have.
    """
    if isinstance(skeleton, list):
        return [unpack(v, tensors) for v in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if _TENSOR in skeleton:
        return tensors[skeleton[_TENSOR]]
    if _TUPLE in skeleton:
        return tuple(unpack(v, tensors) for v in skeleton[_TUPLE])
    if _FLOAT in skeleton:
        return float(skeleton[_FLOAT])
    if _PAIRS in skeleton:
        return {unpack(k, tensors): unpack(v, tensors) for k, v in skeleton[_PAIRS]}
    return {k: unpack(v, tensors) for k, v in skeleton.items()}


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through ``write(tmp_path)``: a temporary file beside it, fsync, then rename.

    Readers see the old file or the complete new one. If ``write`` or the flush fails (a full
    disk), the temporary file is removed, ``path`` is untouched and the error propagates.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        # Created here with the usual permissions (mkstemp's would be owner-only); a unique name,
        # so two writers never share a temporary file.
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # writers such as safetensors' make owner-only files
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)  # the rename itself must reach the disk before we rely on it


def write_text_atomically(path: str | Path, text: str) -> None:
    """:func:`write_atomically` for UTF-8 text."""
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_new_text_synced(path: str | Path, text: str) -> None:
    """Create ``path`` (it must not exist) holding ``text``, and flush it to disk: for files of a
    folder that is assembled under a temporary name and renamed into place whole."""
    with open(path, "x", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (files created, renamed or removed in it) to disk; best effort."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms that cannot open folders (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def state_sha256(state_json: str, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state file's content: its JSON skeleton, then each tensor (by name) with its
    dtype, shape and raw bytes. Any flipped bit in the skeleton or a tensor changes it."""
    digest = hashlib.sha256(state_json.encode("utf-8"))
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode("utf-8"))
        # the bytes as stored, read in place: (numel * element_size,) uint8
        digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def save_state(path: str | Path, tree: Any) -> None:
    """Write nested state to one safetensors file, atomically, with its SHA-256 in the metadata
    (see the module docstring)."""
    from safetensors.torch import save_file

    tensors, skeleton = pack(tree)
    state_json = json.dumps({"format": FORMAT, "state": skeleton}, allow_nan=False)
    metadata = {"format": "pt", _META_KEY: state_json, _SHA_KEY: state_sha256(state_json, tensors)}
    write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_state(path: str | Path) -> Any:
    """Read what :func:`save_state` wrote.

    Raises:
        CheckpointError: the file is missing, truncated, not a safetensors file, not a finetune
            state file, or does not match the SHA-256 it carries (files without one, from before
            it was recorded, are read unchecked).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    # json.JSONDecodeError is a ValueError; a missing key, a malformed skeleton or one nested
    # deeper than Python recurses is damage too.
    unreadable = (SafetensorError, OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        state_json = metadata[_META_KEY]
    except unreadable as exc:
        raise _unreadable(path, exc) from None
    recorded = metadata.get(_SHA_KEY)
    # The SHA-256 covers the state and every tensor's name, dtype, shape and bytes; the rest of the
    # header is these metadata entries, exactly. A flipped bit in their names (which would hide the
    # SHA-256 and let the file be read unchecked) or in the format makes the header inconsistent.
    if metadata.get("format") != "pt" or set(metadata) not in _METADATA_KEYS:
        raise CheckpointError(
            f"{path} is damaged: its header's metadata entries are {excerpt(', '.join(sorted(metadata)), 120)}, not "
            f"{', '.join(sorted(_METADATA_KEYS[0]))} as finetune writes them (a bit flipped on the disk or in a copy, "
            "or an edit).",
            "Restore the file from a copy if you have one; otherwise start the run again (output.overwrite=true).",
        )
    if recorded is not None and recorded != state_sha256(state_json, tensors):
        raise CheckpointError(
            f"{path} is damaged: its contents do not match the SHA-256 recorded in it when it was written "
            "(a bit flipped on the disk or in a copy, or an edit).",
            "Restore the file from a copy if you have one; otherwise start the run again (output.overwrite=true).",
        )
    try:
        doc = json.loads(state_json)
        if doc.get("format") != FORMAT:
            raise ValueError(f"format {doc.get('format')!r}, expected {FORMAT!r}")
        return unpack(doc["state"], tensors)
    except unreadable as exc:
        raise _unreadable(path, exc) from None


def _unreadable(path: Path, exc: BaseException) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a readable finetune checkpoint ({type(exc).__name__}: {excerpt(exc, 200)}).",
        "It is truncated or damaged, or was written by something else.",
    )
