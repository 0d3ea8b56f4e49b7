"""Many processes, one run: torchrun's process group as the engine sees it.

``torchrun --nproc_per_node=N -m finetune run RECIPE`` (or ``finetune run RECIPE --nproc N``,
which calls it) starts N processes with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set. Each
builds the same model from the same seed; DistributedDataParallel averages their gradients.
:class:`Processes` is the little the engine needs from the group: sums across processes, an
agreement on stopping, and telling rank 0 (which alone writes the run folder) apart. One process
gets the same object with every operation a no-op, so the loop has one code path.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from .errors import FinetuneError

T = TypeVar("T")


@dataclass(frozen=True)
class Processes:
    """This process's place in the run: ``rank`` of ``world_size``, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes the run folder and prints progress."""
        return self.rank == 0

    def sum_(self, *tensors: torch.Tensor) -> None:
        """Add each tensor up across processes, in place (nothing to do for one process)."""
        if self.distributed:
            for tensor in tensors:
                torch.distributed.all_reduce(tensor)

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every process if ``flag`` is true on any (one collective and one host read)."""
        if not self.distributed:
            return flag
        value = torch.tensor([float(flag)], device=device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())

    def barrier(self) -> None:
        """Wait until every process gets here. Used before leaving the group after a run that
        went well: a process that exits while another still talks to it can crash gloo's teardown."""
        if self.distributed:
            torch.distributed.barrier()

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """Run ``fn`` on rank 0 only; if it raises a :class:`FinetuneError`, raise it on every
        process, so that none is left waiting for the others. Returns ``fn()`` on rank 0."""
        if not self.distributed:
            return fn()
        result, failure = None, None
        if self.is_main:
            try:
                result = fn()
            except FinetuneError as exc:
                failure = exc
        box: list[Any] = [None if failure is None else (failure.problem, failure.fix, type(failure).__name__)]
        torch.distributed.broadcast_object_list(box, src=0)
        if box[0] is not None:
            if failure is not None:
                raise failure
            problem, fix, _ = box[0]
            raise FinetuneError(problem, fix)
        return result


SINGLE = Processes()


def check_global_batch(batch_size: int, world_size: int) -> None:
    """``data.batch_size`` is the global batch, split evenly between the processes.

    Raises:
        FinetuneError: it does not divide by ``world_size``.
    """
    if batch_size % world_size:
        raise FinetuneError(
            f"data.batch_size is {batch_size}, which does not divide among {world_size} processes.",
            f"data.batch_size is the global batch, split evenly: use a multiple of {world_size} "
            f"(e.g. {max(world_size, batch_size // world_size * world_size)}), or another number of processes.",
        )


def from_environment(timeout_s: float, device_type: str) -> Processes:
    """Join the process group torchrun describes in the environment; one process without it.

    Args:
        timeout_s: how long a collective may wait for a process that has stopped answering before
            it fails (``train.dist_timeout``).
        device_type: ``cuda`` (NCCL) or anything else (gloo).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group(
            backend="nccl" if device_type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return Processes(rank=rank, world_size=world_size, local_rank=local_rank)


def shutdown(processes: Processes) -> None:
    if processes.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch(command: Sequence[str], nproc: int) -> int:
    """Run ``python -m finetune COMMAND ...`` in ``nproc`` processes on this machine through torchrun
    (``torch.distributed.run --standalone``); return its exit code. For several machines, call
    torchrun yourself with its ``--nnodes`` and ``--rdzv-*`` options (see the README).

    Args:
        command: the finetune command and its arguments, e.g. ``["run", "recipe.yaml", "optim.lr=1e-3"]``.
        nproc: processes to start (one per GPU; any number on a CPU).
    """
    return subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc-per-node={nproc}", "-m", "finetune", *command])
