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

from ..data.plan import check_global_batch
from ..errors import FinetuneError

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


    def broadcast_object(self, value: T) -> T:
        """Rank 0's ``value`` on every process (a small picklable object, such as a measurement)."""
        if not self.distributed:
            return value
        box: list[Any] = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


SINGLE = Processes()


def check_batch_split(batch_size: int, world_size: int, *, pairs: bool = False) -> None:
    """:func:`check_global_batch`, and with ``pairs`` (Mixup/CutMix, which mix each image with
    another of the same batch) that each process's share of the batch is even.

    Raises:
        FinetuneError: either does not hold; raised before anything loads.
    """
    check_global_batch(batch_size, world_size)
    local = batch_size // world_size
    if not pairs or local % 2 == 0:
        return
    if world_size == 1:
        problem = f"Mixup/CutMix pair images within a batch, so data.batch_size must be even (got {batch_size})."
    else:
        problem = (f"Mixup/CutMix pair images within each process's batch, so it must be even: data.batch_size "
                   f"{batch_size} among {world_size} processes is {local} images each.")
    good = max(2 * world_size, (batch_size // (2 * world_size)) * 2 * world_size)
    raise FinetuneError(
        problem,
        f"Use a data.batch_size that is a multiple of {2 * world_size} (e.g. {good}), or set train.mixup_alpha "
        "and train.cutmix_alpha to 0.",
    )


def model_rng_seed(seed: int, rank: int) -> int:
    """The seed of process ``rank``'s torch random state while it trains: ``seed + rank``.

    That state draws dropout and drop-path masks, which must differ between processes: with one
    seed everywhere each process would drop the same units of its own images, and N processes
    would regularise like one. What must not depend on the number of processes draws from its own
    generators instead: the data order and the augmentation (``data.BatchLoader``, from the seed,
    the epoch and the batch), the model's initial weights (built before this seeding, the same on
    every process) and Mixup/CutMix (NumPy's state, seeded with ``seed`` everywhere).
    """
    return seed + rank


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


# ---------------------------------------------------------------------------------------------
# A peer that died


_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "ProcessGroupNCCL",
              "ProcessGroupGloo")


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another process of the run stopped
    answering (killed, out of memory, its machine lost), as gloo and NCCL report it. Only under
    torchrun: a lone process has no peers, and its errors keep their traceback."""
    if not launched_by_torchrun():
        return False
    if isinstance(exc, getattr(torch.distributed, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "gloo" in text.lower() or "nccl" in text.lower() or any(marker in text for marker in _PEER_LOST))


def peer_failure_error(exc: BaseException, run_dir: Any) -> FinetuneError:
    """The one-paragraph error of a process whose peer died, in place of gloo's or NCCL's traceback."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    reason = reason.split("] ", 1)[-1].split(". ")[0][:160]  # gloo prefixes its source file and line
    world = int(os.environ.get("WORLD_SIZE", "2"))
    return FinetuneError(
        f"Another process of this {world}-process run stopped answering, so this one stopped too ({reason}). "
        "A process dies like this when it is killed, runs out of memory or loses its machine; its own "
        f"output, above, may say which. The run folder {run_dir} keeps its last checkpoint.",
        f"Continue from it with `finetune resume {run_dir} --nproc {world}` (any number of processes works).",
    )


# ---------------------------------------------------------------------------------------------
# Launching


@dataclass(frozen=True)
class ProcessExit:
    """How one process of a launch ended badly: its exit code, or the signal that killed it."""

    rank: int
    exitcode: int
    signal: str | None  # "SIGKILL" when killed by a signal (exitcode -9), else None


@dataclass(frozen=True)
class Launch:
    """The outcome of :func:`run_processes`: torchrun's exit code and the processes that failed,
    the first failure first."""

    code: int
    failures: tuple[ProcessExit, ...] = ()

    def error(self, nproc: int, run_dir: Any) -> FinetuneError | None:
        """One paragraph on how the run failed, or ``None`` when it did not (or was interrupted)."""
        if self.code in (0, 130):  # 130: interrupted, and the processes said so
            return None
        resume = f"Continue with `finetune resume {run_dir} --nproc {nproc}`."
        first = self.failures[0] if self.failures else None
        if first is not None and first.signal is not None:
            cause = " (sent by hand, or by the system when memory runs out)" if first.signal == "SIGKILL" else ""
            return FinetuneError(
                f"Process {first.rank} of the {nproc}-process run was killed by {first.signal}{cause}, and the run "
                f"stopped. The run folder {run_dir} keeps its last checkpoint.",
                resume,
            )
        exitcode = first.exitcode if first is not None else self.code
        return FinetuneError(
            f"The {nproc}-process run failed (process {first.rank if first else '?'} exited with code {exitcode}); "
            "its processes' errors are above.",
            f"Fix what they say; if the run had started, continue it with `finetune resume {run_dir} --nproc {nproc}`.",
        )


def run_processes(command: Sequence[str], nproc: int) -> Launch:
    """Run ``python -m finetune COMMAND ...`` in ``nproc`` processes on this machine through torchrun
    (``torch.distributed.run --standalone``). For several machines, call torchrun yourself with its
    ``--nnodes`` and ``--rdzv-*`` options (see the README).

    torchrun runs in a child process that keeps its own report to itself (a traceback and a
    failure table): the processes print their errors, and :meth:`Launch.error` words the rest.

    Args:
        command: the finetune command and its arguments, e.g. ``["run", "recipe.yaml", "optim.lr=1e-3"]``.
        nproc: processes to start (one per GPU; any number on a CPU).
    """
    import json
    import tempfile

    with tempfile.TemporaryDirectory(prefix="finetune-launch-") as tmp:
        report = os.path.join(tmp, "failures.json")
        code = subprocess.call([sys.executable, "-c", _LAUNCHER, report, str(nproc), *command])
        try:
            with open(report) as f:
                failures = tuple(ProcessExit(**entry) for entry in json.load(f))
        except (OSError, ValueError, TypeError):
            failures = ()
    return Launch(code, failures)


def launch(command: Sequence[str], nproc: int) -> int:
    """:func:`run_processes`, returning only the exit code."""
    return run_processes(command, nproc).code


_LAUNCHER = "import sys; from finetune.training.distributed import _torchrun_quietly; sys.exit(_torchrun_quietly(sys.argv[1:]))"


def _torchrun_quietly(argv: Sequence[str]) -> int:
    """torchrun (``torch.distributed.run``), with its failure report written as JSON to ``argv[0]``
    instead of printed with a traceback. ``argv``: the report file, ``nproc``, then the finetune
    command."""
    import json
    import logging
    import signal as signals

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    report, nproc, command = argv[0], int(argv[1]), list(argv[2:])
    # The agent logs each process it stops and each failure; the processes and the parent say it better.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    # One machine needs only its loopback address; by default torchrun looks its hostname up, and
    # where that does not resolve (many containers) the processes wait for each other until killed.
    args = get_args_parser().parse_args(["--standalone", "--local-addr=127.0.0.1", f"--nproc-per-node={nproc}",
                                         "-m", "finetune", *command])
    try:
        run(args)
    except ChildFailedError as exc:
        def order(item):  # the earliest first; at the same second, a SIGTERM the agent sent comes last
            rank, failure = item
            return failure.timestamp, failure.exitcode == -signals.SIGTERM, rank

        failures = [
            {"rank": rank, "exitcode": f.exitcode, "signal": f.signal_name() if f.exitcode < 0 else None}
            for rank, f in sorted(exc.failures.items(), key=order)
        ]
        with open(report, "w") as out:
            json.dump(failures, out)
        return 1
    except SignalException as exc:  # torchrun was interrupted (Ctrl-C, SIGTERM) and stopped the processes
        return 128 + int(exc.sigval)
    return 0
