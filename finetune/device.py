"""Where a model runs and with which numerics: device choice, autocast, memory and environment facts.

Training, ``finetune eval`` and ``finetune predict`` all choose their device and precision here.
"""

from __future__ import annotations

import contextlib
import platform
import sys
from typing import Any

import torch

from .errors import FinetuneError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; anything else is taken as given."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FinetuneError(
            f"The recipe asks for device '{name}', but this machine has no CUDA GPU.",
            "Use device=auto (falls back to the CPU) or device=cpu.",
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise FinetuneError(
            f"The recipe asks for device '{name}', but this machine has {torch.cuda.device_count()} GPU(s).",
            "Use device=cuda (the first GPU) or a smaller index.",
        )
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision on a device; ``None`` means plain fp32.

    CPUs run bf16/fp16 matmuls slowly or not at all, so both fall back to fp32 there.
    """
    if device.type == "cpu" or precision == "fp32":
        return None
    return torch.bfloat16 if precision == "bf16" else torch.float16


def precision_fallback(precision: str, device: torch.device) -> str | None:
    """Why ``precision`` does not apply on ``device`` (a sentence), or ``None`` when it does."""
    if precision == "fp32" or autocast_dtype(precision, device) is not None:
        return None
    return (f"train.precision is {precision}, but this run trains on the {device.type.upper()}, where half-precision "
            "matrix products are slow or missing, so it trains in fp32 (summary.json records precision fp32). "
            "Set train.precision=fp32 to say so, or train on a GPU.")


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype``, or a context that does nothing for fp32 (``None``)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a host timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak tensor memory on a GPU since the last reset; on a CPU the process's peak resident size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    except ImportError:  # pragma: no cover - Windows
        return None


def available_memory(device: torch.device) -> int | None:
    """Bytes a new allocation can take on ``device`` now: free GPU memory on CUDA, the memory the
    operating system can give without swapping (``MemAvailable``) on a CPU, the recommended working
    set on Apple MPS; ``None`` when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "mps":
        recommended = getattr(getattr(torch, "mps", None), "recommended_max_memory", None)
        return int(recommended()) if recommended is not None else None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - neither Linux nor POSIX
        return None


def format_bytes(count: float) -> str:
    """``3.84e12 -> '3.8 TB'`` (powers of 1000, as memory is sold)."""
    if count < 1000:
        return f"{int(count)} B"
    for unit in ("kB", "MB", "GB", "TB"):
        count /= 1000
        if count < 1000 or unit == "TB":
            break
    return f"{count:.1f} {unit}"


def environment(device: torch.device) -> dict[str, Any]:
    """Device and library versions, for a run's summary."""
    import timm
    import torchvision

    from . import __version__

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "device": str(device),
        "device_name": name,
        "versions": {
            "finetune": __version__,
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "timm": timm.__version__,
            "cuda": torch.version.cuda,
        },
    }
