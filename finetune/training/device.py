"""Where a model runs and with which numerics: device choice, autocast, memory and environment facts.

Training, ``finetune eval`` and ``finetune predict`` all choose their device and precision here.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
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


PRECISION_BUDGET_S = 5.0
"""Seconds ``train.precision: auto`` may spend timing bf16 against fp32 at start-up (plus at most
the one step under way when the bound is reached)."""
PRECISION_MIN_ROUNDS = 6
"""Interleaved rounds (one fp32 and one bf16 step each) needed before bf16 can be chosen: with 6,
two equally fast precisions put every bf16 step below every fp32 step by chance 1 time in 924,
and a bf16 3% faster under +-10% noise was chosen in 0.15% of simulated start-ups (2% with 4)."""
PRECISION_MAX_ROUNDS = 20
"""Rounds after which the measurement stops even when it is still unclear (then fp32 is kept)."""
BF16_MIN_GAIN = 0.05
"""Median gain bf16 needs besides beating fp32 in every round: a smaller one is not worth
leaving exact fp32 for."""
PRECISION_PROBE_BATCH = 32
"""Largest batch the measurement times: enough rows for the matrix products to behave as in
training, small enough that several rounds fit in the time bound."""


def measure_cpu_precision(
    model: torch.nn.Module, batch: int, image_size: tuple[int, int], *,
    budget_s: float = PRECISION_BUDGET_S, clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Any]:
    """Time training steps of ``model`` on the CPU in fp32 and under bf16 autocast, interleaved,
    and choose bf16 only when it is faster well beyond the noise: at width 64 a ViT is bound by
    small fp32 matrix products and bf16 only adds casts, while at width 256 bf16 halves the memory
    traffic (see the README's CPU figures).

    The steps run forward and backward on a copy of the model with random images, after one
    untimed step each, under a forked random state: the run's weights, gradients and random
    numbers are untouched. How long it runs and how it decides: :func:`time_interleaved`.

    Returns:
        :func:`time_interleaved`'s record, with the ``batch`` timed.
    """
    import copy

    probe = copy.deepcopy(model).train()  # trains what the run trains: a frozen backbone has no backward
    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        x = torch.randn(batch, 3, *image_size)

        def step(name: str) -> None:
            with autocast(torch.device("cpu"), dtypes[name]):
                out = probe(x)
            out.float().square().mean().backward()
            probe.zero_grad(set_to_none=True)

        record = time_interleaved(step, budget_s=budget_s, clock=clock)
    return {**record, "batch": batch}


def time_interleaved(
    step: Callable[[str], None], *, budget_s: float = PRECISION_BUDGET_S,
    clock: Callable[[], float] = time.perf_counter, min_rounds: int = PRECISION_MIN_ROUNDS,
    max_rounds: int = PRECISION_MAX_ROUNDS,
) -> dict[str, Any]:
    """Time ``step("fp32")`` against ``step("bf16")`` in interleaved rounds and decide.

    One untimed step of each warms caches and the allocator; then each round times one step of
    each, the order alternating between rounds, so a machine that slows down or speeds up weighs on
    both alike. Rounds go on until the answer is clear (after ``min_rounds``: bf16 separated from
    fp32, or not faster at all), ``max_rounds`` are done, or ``budget_s`` seconds have passed
    since the start; the bound is checked before every step, so it is passed by at most one step.
    The decision is :func:`decide_precision`'s.

    Args:
        step: runs one training step in the precision it is given.
        budget_s: time bound of the whole measurement, warm-up included.
        clock: seconds, monotonic (a fake one in tests).
        min_rounds: rounds before bf16 can be chosen or the measurement can stop early.
        max_rounds: rounds after which it stops.

    Returns:
        ``{"chosen", "reason", "fp32_ms", "bf16_ms", "fp32_ms_range", "bf16_ms_range", "rounds",
        "seconds", "budget_s"}``: median and [fastest, slowest] step times in milliseconds of the
        rounds completed, and the seconds the measurement took.
    """
    start = clock()
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}

    def timed_round(order: tuple[str, ...]) -> dict[str, float] | None:
        """One step of each in ``order``, timed; ``None`` when the bound is reached first."""
        spent = {}
        for name in order:
            if clock() - start >= budget_s:
                return None  # keep only complete (paired) rounds
            began = clock()
            step(name)
            spent[name] = clock() - began
        return spent

    rounds = 0
    if timed_round(("fp32", "bf16")) is not None:  # the warm-up, not counted
        while rounds < max_rounds:
            spent = timed_round(("fp32", "bf16") if rounds % 2 == 0 else ("bf16", "fp32"))
            if spent is None:
                break
            for name, seconds in spent.items():
                times[name].append(seconds)
            rounds += 1
            if rounds >= min_rounds and _settled(times["fp32"], times["bf16"]):
                break
    chosen, reason = decide_precision(times["fp32"], times["bf16"], min_rounds=min_rounds)
    if rounds < min_rounds:
        reason = f"only {rounds} round(s) fit in the {budget_s:g} s bound, too few to tell: fp32 kept"
    return {"chosen": chosen, "reason": reason, **_step_times(times), "rounds": rounds,
            "seconds": round(clock() - start, 3), "budget_s": budget_s}


def _step_times(times: dict[str, list[float]]) -> dict[str, Any]:
    """Median and ``[fastest, slowest]`` step time of each precision in milliseconds (``None``
    when none was timed)."""
    out: dict[str, Any] = {}
    for name, spent in times.items():
        ms = [1000 * t for t in spent]
        out[f"{name}_ms"] = round(statistics.median(ms), 3) if ms else None
        out[f"{name}_ms_range"] = [round(min(ms), 3), round(max(ms), 3)] if ms else None
    return out


def decide_precision(fp32_s: Sequence[float], bf16_s: Sequence[float], *,
                     min_rounds: int = PRECISION_MIN_ROUNDS) -> tuple[str, str]:
    """``("bf16" or "fp32", why)`` from interleaved step times.

    bf16 only when, over at least ``min_rounds`` rounds, its slowest step was faster than fp32's
    fastest and its median gain is larger than the noise (the wider of the two spreads, slowest
    minus fastest over the median) and than :data:`BF16_MIN_GAIN`; otherwise exact fp32, so that
    a busy machine's noise never decides.
    """
    rounds = min(len(fp32_s), len(bf16_s))
    if rounds < min_rounds:
        return "fp32", f"{rounds} round(s) are too few to tell: fp32 kept"
    fp32_median, bf16_median = statistics.median(fp32_s), statistics.median(bf16_s)
    gain = 1 - bf16_median / fp32_median
    noise = max((max(fp32_s) - min(fp32_s)) / fp32_median, (max(bf16_s) - min(bf16_s)) / bf16_median)
    if gain <= 0:
        return "fp32", "bf16 is not faster"
    if gain < BF16_MIN_GAIN:
        return "fp32", f"bf16 only {100 * gain:.1f}% faster on the median (at least {100 * BF16_MIN_GAIN:.0f}% needed)"
    if max(bf16_s) >= min(fp32_s) or gain <= noise:
        return "fp32", (f"bf16 {100 * gain:.0f}% faster on the median, within the noise (step times spread "
                        f"{100 * noise:.0f}%)")
    return "bf16", (f"bf16 {100 * gain:.0f}% faster on the median, beyond the noise (spread {100 * noise:.0f}%; "
                    "every bf16 step beat every fp32 step)")


def _settled(fp32_s: Sequence[float], bf16_s: Sequence[float]) -> bool:
    """Whether more rounds cannot be expected to change the answer: bf16 already chosen, or bf16
    not faster than fp32 on the median."""
    return decide_precision(fp32_s, bf16_s, min_rounds=0)[0] == "bf16" or \
        statistics.median(bf16_s) >= statistics.median(fp32_s)


def describe_precision_choice(choice: dict[str, Any]) -> str:
    """One line on what ``train.precision: auto`` measured and chose."""
    def times(name: str) -> str:
        if choice.get(f"{name}_ms") is None:
            return f"{name} not timed"
        low, high = choice.get(f"{name}_ms_range") or (choice[f"{name}_ms"],) * 2
        return f"{name} {choice[f'{name}_ms']:.3g} ms/step ({low:.3g}-{high:.3g})"

    return (f"precision auto: {choice.get('chosen')}: {choice.get('reason', 'measured')} ({times('fp32')}, "
            f"{times('bf16')}; {choice.get('rounds', '?')} interleaved rounds at batch {choice.get('batch', '?')} in "
            f"{choice.get('seconds', 0):.1f} s)")


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
