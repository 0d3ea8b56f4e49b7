"""Host memory: how much this process can allocate now, and refusing images that would not fit
before they are allocated (the allocator's own failure is a traceback; Linux may kill instead)."""

from __future__ import annotations

from pathlib import Path

import psutil

from ..errors import DataError

# cgroup v2, then v1: (limit, usage) files under /sys/fs/cgroup; v2's "max" (no limit) is not a number
_CGROUP_FILES = (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"))


def host_available_memory() -> int:
    """Bytes of memory this process can allocate now: what the operating system can give without
    swapping (psutil's ``available``: Linux's ``MemAvailable``, free memory plus the page cache it
    can drop), and at most what is left under the memory limit of the process's control group (a
    container's limit, which psutil does not see)."""
    available = psutil.virtual_memory().available
    for limit, usage in _CGROUP_FILES:
        try:
            left = int(Path("/sys/fs/cgroup", limit).read_text()) - int(Path("/sys/fs/cgroup", usage).read_text())
        except (OSError, ValueError):
            continue
        return max(0, min(available, left))
    return available


def available_memory() -> int:
    """Bytes of memory this process can allocate now (:func:`host_available_memory`)."""
    return host_available_memory()


def host_memory_budget() -> int:
    """Bytes of decoded images this machine can hold: half its available memory."""
    return available_memory() // 2


def check_memory(nbytes: int, what: str, fix: str) -> None:
    """Refuse, before allocating, ``nbytes`` of images that the available memory cannot hold: the
    allocator's own failure is a traceback, and Linux may instead kill the process later.

    Raises:
        DataError: ``"{what} needs about N GB of memory ..."`` followed by ``fix``.
    """
    available = available_memory()
    if nbytes > available:
        raise DataError(
            f"{what} needs about {_gigabytes(nbytes)} of memory, and this machine has {_gigabytes(available)} available.",
            fix,
        )


def _gigabytes(nbytes: int) -> str:
    return f"{nbytes / 1e9:.3g} GB"
