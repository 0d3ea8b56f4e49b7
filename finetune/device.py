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
