"""Where a model runs and with which numerics: device choice, autocast, memory and environment facts.

Training, ``finetune eval`` and ``finetune predict`` all choose their device and precision here.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from typing import Any

import torch

from ..data.memory import host_available_memory
from ..errors import FinetuneError


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

    ``auto`` is bf16 on a GPU that has it (else fp16) and fp32 elsewhere; a training run on a CPU
    decides ``auto`` by measurement instead (:func:`measure_cpu_precision`). ``bf16`` asked for
    explicitly runs bf16 on a CPU too (AVX-512 BF16 and AMX CPUs have it); ``fp16`` falls back to
    fp32 there, where it is slow or missing.
    """
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if precision == "bf16" else None
    return torch.bfloat16 if precision == "bf16" else torch.float16


def precision_name(dtype: torch.dtype | None) -> str:
    """``fp32``, ``bf16`` or ``fp16``: what a run with autocast ``dtype`` computes in."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def precision_fallback(precision: str, device: torch.device) -> str | None:
    """Why ``precision`` does not apply on ``device`` (a sentence), or ``None`` when it does."""
    if precision in ("fp32", "auto") or autocast_dtype(precision, device) is not None:
        return None
    return (f"train.precision is {precision}, but this run trains on the {device.type.upper()}, where half-precision "
            "matrix products are slow or missing, so it trains in fp32 (summary.json records precision fp32). "
            "Set train.precision=fp32 to say so, train.precision=auto to let finetune measure bf16 against fp32, "
            "or train on a GPU.")


def physical_cores() -> int:
    """Physical cores this process may run on: hardware threads of one core share its vector units,
    so more threads than cores slow small matrix products down."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topology = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            with open(f"{topology}/physical_package_id") as f, open(f"{topology}/core_id") as g:
                cores.add((f.read().strip(), g.read().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))  # no topology (not Linux, or hidden): count each CPU
    return max(1, len(cores))


def cpu_threads(asked: int | None, local_processes: int = 1) -> int:
    """Threads for one training process on a CPU: ``asked``, or the physical cores shared among the
    processes on this machine (at least one each)."""
    if asked is not None:
        return asked
    return max(1, physical_cores() // max(1, local_processes))


def measure_cpu_precision(
    model: torch.nn.Module, batch: int, image_size: tuple[int, int], *, steps: int = 3
) -> dict[str, Any]:
    """Time training steps of ``model`` on the CPU in fp32 and under bf16 autocast, and choose the
    faster: at width 64 a ViT is bound by small fp32 matrix products and bf16 only adds casts, while
    at width 256 bf16 halves the memory traffic (see the README's CPU figures).

    The steps run forward and backward on a copy of the model with random images, after one
    untimed step each, under a forked random state: the run's weights, gradients and random
    numbers are untouched. bf16 must be at least 5% faster to be chosen (fp32 is exact).

    Returns:
        ``{"fp32_ms": ..., "bf16_ms": ..., "chosen": "fp32"|"bf16", "batch": ..., "steps": ...}``:
        the median step times in milliseconds and the choice.
    """
    import copy
    import statistics
    import time

    probe = copy.deepcopy(model).train()  # trains what the run trains: a frozen backbone has no backward
    times: dict[str, float] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        x = torch.randn(batch, 3, *image_size)
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            spent = []
            for i in range(steps + 1):
                start = time.perf_counter()
                with autocast(torch.device("cpu"), dtype):
                    out = probe(x)
                out.float().square().mean().backward()
                if i:  # the first step warms caches and the allocator
                    spent.append(time.perf_counter() - start)
                probe.zero_grad(set_to_none=True)
            times[name] = statistics.median(spent) * 1000
    return {"fp32_ms": round(times["fp32"], 2), "bf16_ms": round(times["bf16"], 2),
            "chosen": faster_precision(times["fp32"], times["bf16"]), "batch": batch, "steps": steps}


def faster_precision(fp32_ms: float, bf16_ms: float) -> str:
    """``bf16`` when its step is at least 5% shorter than fp32's, else ``fp32`` (exact, and a
    machine's noise is a few percent)."""
    return "bf16" if bf16_ms < 0.95 * fp32_ms else "fp32"


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
    operating system can give without swapping on a CPU (:func:`host_available_memory`), the
    recommended working set on Apple MPS; ``None`` when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "mps":
        recommended = getattr(getattr(torch, "mps", None), "recommended_max_memory", None)
        return int(recommended()) if recommended is not None else None
    return host_available_memory()


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

    from .. import __version__

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
