"""``finetune run`` and ``finetune resume``: a recipe in, a self-describing run folder out.

The recipe reads top to bottom: :func:`prepare` loads the data and the model (raising before
anything is written), ``training.setup.build`` makes the training state, ``RunDir.create`` claims the
run folder, and ``training.loop.fit`` trains with two callbacks, the run folder's recorder and the progress
bar. :func:`resume` does the same from a run folder's last checkpoint.

Signals: the first SIGINT (Ctrl-C) or SIGTERM asks the loop to stop at the next optimizer step;
it saves a checkpoint there, marks the run ``interrupted`` and raises :class:`RunInterrupted`. A
second one stops at once (the last checkpoint on disk stays as it was).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import DivergedError, FinetuneError, RunInterrupted
from ..models.saving import model_from_config
from ..recipe import Recipe, load_recipe
from ..training import distributed, setup
from ..training.callbacks import Callbacks, StopRequested
from ..training.activity import Activity
from ..training.budget import budget_record, describe_budget_use, describe_plan, noisy_warning, recorded_plan
from ..training.components import optimizer_kernel
from ..training.device import describe_precision_choice, environment, reset_peak_memory, resolve_device
from ..training.loop import fit
from ..training.progress import TrainProgress, console
from ..training.setup import Prepared, build
from ..training.state import TrainState
from .folder import check_links, check_run_dir, run_dir_for
from .recorder import RunRecorder
from .rundir import RunDir, read_checkpoint


def prepare(recipe: Recipe) -> Prepared:
    """Check the run folder, load the data and build the model; raise before writing anything."""
    check_run_dir(run_dir_for(recipe), recipe.output.overwrite)
    return setup.prepare(recipe)


def run(
    recipe: Recipe,
    *,
    recipe_path: str | None = None,
    quiet: bool = False,
    prepared: Prepared | None = None,
) -> dict[str, Any]:
    """Train and evaluate as the recipe says; write the run folder; return the summary.

    Under torchrun every process calls this; rank 0 alone checks and writes the run folder and
    prints, and a failure it meets before training (the folder is taken) stops every process.

    Raises:
        FinetuneError: anything wrong with the recipe's data, model or output folder (raised before
            the run folder is created), or a write that failed during the run.
        DivergedError: the loss stopped being finite; the run is marked ``diverged``.
        RunInterrupted: stopped by Ctrl-C or SIGTERM after saving a checkpoint.
    """
    processes = distributed.from_environment(recipe.train.dist_timeout, resolve_device(recipe.device).type)
    try:
        folder = run_dir_for(recipe)
        if prepared is None:
            processes.on_main(lambda: check_run_dir(folder, recipe.output.overwrite))
        _require_extras(recipe)
        quiet = quiet or not processes.is_main
        with _start_up_stops_on_sigterm():
            with _decoding_shown(quiet):
                p = prepared or setup.prepare(recipe, processes=processes)
            _warn_skipped(p, processes.is_main)
            state = build(p, processes)
        if state.precision_choice is not None and not quiet:  # train.precision auto on a CPU
            console.print(describe_precision_choice(state.precision_choice), highlight=False, markup=False)
        _say_plan(state, quiet)
        summary = _initial_summary(state, p, recipe_path)
        rundir = processes.on_main(lambda: RunDir.create(folder, recipe, summary, overwrite=recipe.output.overwrite))
        summary = _train(state, rundir, summary, folder=folder, quiet=quiet, wall_before_s=0.0)
        processes.barrier()
        return summary
    finally:
        distributed.shutdown(processes)


def _say_plan(state: TrainState, quiet: bool) -> None:
    """On the main process: one line on a budgeted run's probe and plan (unless quiet), and one
    warning line, even with -q, when the probe was noisy."""
    if state.budget is None or not state.processes.is_main:
        return
    if not quiet:
        console.print(describe_plan(state.budget, state.recipe), highlight=False, markup=False)
    if state.budget.noisy:
        console.print(noisy_warning(state.budget), highlight=False, markup=False)


def _require_extras(recipe: Recipe) -> None:
    """Check, before anything loads, that the optional packages the recipe asks for are installed."""
    if recipe.output.tensorboard:
        from ..viz.tensorboard import require_tensorboard

        require_tensorboard()


def resume(run_dir: str | Path, *, quiet: bool = False) -> dict[str, Any]:
    """Continue an interrupted, killed or failed run from its last checkpoint.

    The run trains with the ``recipe.yaml`` in its folder; the model is rebuilt from the checkpoint,
    so its pretrained source need not be at hand. Lines that ``metrics.jsonl`` got after the
    checkpoint are dropped and written again. On the CPU in fp32 the resumed run ends with the
    same weights and metrics as a run that was never interrupted. Under torchrun it may use
    another number of processes than the run had (``data.batch_size`` is the global batch).

    Raises:
        RunDirError: not a run folder, in use, finished, diverged, without a checkpoint, or a file it
            reads is a link out of the folder.
        CheckpointError: the checkpoint is damaged or belongs to another recipe.
    """
    run_dir = Path(run_dir)
    if run_dir.is_dir():
        check_links(run_dir)  # before recipe.yaml is read: a link out of the folder is never read
    try:
        recipe = load_recipe(run_dir / "recipe.yaml")
    except FinetuneError:
        RunDir.reopen(run_dir).close()  # the folder's own problem (not a run, in use...) comes first
        raise
    _require_extras(recipe)
    processes = distributed.from_environment(recipe.train.dist_timeout, resolve_device(recipe.device).type)
    rundir = None
    try:
        rundir = processes.on_main(lambda: RunDir.reopen(run_dir))
        # Checked here on every process (a damaged file must stop them all), before any data loads.
        checkpoint = read_checkpoint(run_dir, recipe)
        model = model_from_config(checkpoint["model_config"], checkpoint["model"], **setup.model_kwargs(recipe))
        # The data path the run took (checkpoints from before it was recorded: chosen again).
        quiet = quiet or not processes.is_main
        with _decoding_shown(quiet):
            p = setup.prepare(recipe, model=model, processes=processes, data_path=checkpoint.get("data_path"))
        _warn_skipped(p, processes.is_main)
        # The precision the run chose; checkpoints from before train.precision=auto ran fp32 on a CPU.
        chosen = checkpoint.get("precision") or ("fp32" if p.device.type == "cpu" else None)
        # A budgeted run keeps the plan it recorded: no new probe, the same steps and schedule.
        budget = recorded_plan(recipe, checkpoint)
        state = build(p, processes, precision=chosen, budget=budget)
        state.load_state_dict(checkpoint)
        summary = _resumed_summary(rundir, state, p, checkpoint) if rundir is not None else {}
    except BaseException as exc:
        if rundir is not None:
            rundir.close()
        distributed.shutdown(processes)
        _reraise(_say_where_earlier_runs_are(exc, rundir), exc)
    try:
        summary = _train(state, rundir, summary, folder=run_dir, quiet=quiet,
                         wall_before_s=float(checkpoint.get("wall_time_s", 0.0)))
        processes.barrier()
        return summary
    finally:
        distributed.shutdown(processes)


def _resumed_summary(rundir: RunDir, state: TrainState, p: Prepared, checkpoint: dict[str, Any]) -> dict[str, Any]:
    """On the main process of a resumed run: cut ``metrics.jsonl`` back to the checkpoint, record
    the resume in the summary (rebuilt if it was lost), mark the run running again, write it."""
    rundir.last_checkpoint = (checkpoint["progress"]["epoch"], checkpoint["progress"]["step"])
    # Warnings about what was lost are printed even with -q (which hides progress only).
    warning = rundir.truncate_metrics(checkpoint["metrics_offset"])
    if warning:
        console.print(f"warning: {warning}", highlight=False, markup=False)
    summary = rundir.read_summary()
    if not isinstance(summary.get("name"), str):
        summary = _rebuilt_summary(state, p, summary)
        console.print(f"warning: {summary['summary_rebuilt']}", highlight=False, markup=False)
    summary.pop("replaced_runs", None)  # earlier finetune versions wrote it; nothing reads it
    summary.setdefault("resumed", []).append({
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "epoch": state.progress.epoch,
        "step": state.progress.step,
        "processes": state.processes.world_size,
        "previous_status": rundir.previous_status,
    })
    summary.update(status="running", error=None, **environment(state.device))
    rundir.write_summary(summary)
    return summary


def _warn_skipped(p: Prepared, is_main: bool) -> None:
    """Say which image-folder entries were not read (they are also in summary.json): on the main
    process, even with -q, as every warning about data left out."""
    if p.data.skipped and is_main:
        console.print(f"warning: {p.data.skipped.describe()}", highlight=False, markup=False)


def _initial_summary(state: TrainState, p: Prepared, recipe_path: str | None) -> dict[str, Any]:
    r, model = state.recipe, state.model
    summary: dict[str, Any] = {
        "name": r.name,
        "status": "running",
        "error": None,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "recipe_path": recipe_path,
        "mode": r.train.mode,
        "arch": getattr(model, "finetune_spec", {}).get("arch"),
        "source": r.model.source,
        "epochs": state.epochs,  # a budgeted run's planned epochs
        "selection": "val" if p.data.val is not None else "final",
        "train_images": len(p.data.train),
        "val_images": len(p.data.val) if p.data.val is not None else 0,
        "test_images": len(p.data.test),
        "params_trainable": state.counts.trainable,
        "params_total": state.counts.total,
        "img_size": list(p.out_size),
        "data_path": p.data.path,
        "stored_size": list(p.data.stored_size) if p.data.stored_size else None,
        "precision": state.precision,
        "precision_asked": r.train.precision,
        "precision_choice": state.precision_choice,  # auto on a CPU: fp32 and bf16 step times, measured here
        "cpu_threads": state.cpu_threads,
        "optimizer_kernel": optimizer_kernel(state.optimizer),
        "classes": state.classes,
        **environment(state.device),
    }
    if state.budget is not None:
        summary["time_budget"] = budget_record(state.budget, state.progress, 0.0, done=False)
    if getattr(model, "load_report", None) is not None:
        summary["load_report"] = model.load_report.summary()
    if p.data.skipped:
        summary["skipped_files"] = p.data.skipped.to_dict()
    return summary


def _rebuilt_summary(state: TrainState, p: Prepared, found: dict[str, Any]) -> dict[str, Any]:
    """A summary for a resumed run whose ``summary.json`` is missing or unreadable, made from its
    recipe.yaml, data and checkpoint; the record of earlier resumes is kept when it is readable."""
    summary = _initial_summary(state, p, None)
    summary.update(
        started_at=None,  # unknown: it was in the lost file
        summary_rebuilt=f"{state.recipe.name}: summary.json was missing or unreadable; it was rebuilt from "
        "recipe.yaml and the checkpoint (when the run started and earlier wall time are unknown).",
    )
    if isinstance(found.get("resumed"), list):
        summary["resumed"] = found["resumed"]
    return summary


def _earlier_runs_note(rundir: RunDir | None) -> str:
    """Where the earlier runs that ``output.overwrite`` is replacing are kept, for every message
    about a run that did not finish; empty when there are none."""
    if rundir is None or not rundir.replaced:
        return ""
    where = ", ".join(str(p) for p in rundir.replaced)
    if len(rundir.replaced) == 1:
        return f"The earlier run that output.overwrite is replacing is kept at {where} until this run finishes."
    return f"The earlier runs that output.overwrite is replacing are kept at {where} until this run finishes."


def _say_where_earlier_runs_are(exc: BaseException, rundir: RunDir | None) -> BaseException:
    """``exc``, saying where the earlier runs being replaced are kept (see :func:`_earlier_runs_note`).

    A user error or an interruption gets it in its one-paragraph message; any other exception (a
    bug, with its traceback) gets it as a note under the traceback."""
    note = _earlier_runs_note(rundir)
    if not note:
        return exc
    if isinstance(exc, FinetuneError):
        return type(exc)(f"{exc.problem} {note}", exc.fix)
    if isinstance(exc, RunInterrupted):
        return RunInterrupted(f"{exc} {note}")
    if isinstance(exc, KeyboardInterrupt):
        return KeyboardInterrupt(f"{exc} {note}".strip())
    exc.add_note(note)
    return exc


def _reraise(new: BaseException, exc: BaseException):
    """Raise ``new``, a message-carrying copy of ``exc`` (one paragraph, no chained traceback), or
    ``exc`` itself unchanged, traceback and context included."""
    if new is exc:
        raise exc
    raise new from None


def _train(
    state: TrainState, rundir: RunDir | None, summary: dict[str, Any], *, folder: Path, quiet: bool, wall_before_s: float
) -> dict[str, Any]:
    """Run the loop with the run folder's recorder and the progress bar; record how it ended.
    ``rundir`` is ``None`` on ranks other than 0, which write nothing."""
    r = state.recipe
    recorder = RunRecorder(rundir, summary, wall_before_s=wall_before_s)
    progress = TrainProgress(state.total_steps, completed=state.progress.step, quiet=quiet)
    callbacks: list = [recorder, progress]
    reset_peak_memory(state.device)
    # Every way this run can fail says where the earlier runs it replaces are kept (if any).
    note = _earlier_runs_note(rundir)
    deleted: list[Path] = []
    try:
        if r.output.tensorboard and rundir is not None:
            from ..viz.tensorboard import TensorBoardLogger

            callbacks.append(TensorBoardLogger(folder / "tensorboard", rundir=rundir))
        with progress, _stop_on_signals(state, progress):
            fit(state, Callbacks(callbacks))
            for callback in callbacks[2:]:
                callback.close()  # before the run says "finished": a failure to close is the run's
            deleted = recorder.finish(state)
    except StopRequested as stop:
        p = state.progress
        message = (
            f"Stopped by {stop} at epoch {p.epoch}, step {p.step}; a checkpoint was saved. "
            f"Continue with: finetune resume {folder}" + (f". {note}" if note else "")
        )
        recorder.mark(state, "interrupted", message)
        raise RunInterrupted(message) from None
    except KeyboardInterrupt as exc:
        recorder.mark(state, "interrupted", f"interrupted at once (a second Ctrl-C or SIGTERM); "
                      f"continue from the last checkpoint with: finetune resume {folder}" + (f". {note}" if note else ""))
        _reraise(_say_where_earlier_runs_are(exc, rundir), exc)
    except DivergedError as exc:
        recorder.mark(state, "diverged", f"{exc} {note}".strip())
        _reraise(_say_where_earlier_runs_are(exc, rundir), exc)
    except BaseException as exc:
        recorder.mark(state, "failed", f"{type(exc).__name__}: {exc} {note}".strip())
        _reraise(_say_where_earlier_runs_are(exc, rundir), exc)
    finally:
        for callback in callbacks[2:]:
            with contextlib.suppress(Exception):  # already closed on success; on a failure, the first error counts
                callback.close()
        if rundir is not None:
            rundir.close()
    if deleted:
        console.print(
            "deleted the earlier run" + ("s" if len(deleted) > 1 else "") + " that output.overwrite replaced: "
            + ", ".join(str(p) for p in deleted), highlight=False, markup=False,
        )
    return recorder.summary


@contextlib.contextmanager
def _decoding_shown(quiet: bool):
    """On a terminal, images decoded into memory before training (the decode cache being built)
    move a bar of their own, taken down before the training bar appears; nothing when they come
    from the cache, nothing off a terminal."""
    with Activity(quiet=quiet, on_update=True) as shown, shown.decoding():
        yield


@contextlib.contextmanager
def _start_up_stops_on_sigterm():
    """Before training begins (data loading, the model, the precision check), SIGTERM stops the run
    as Ctrl-C does: a message and exit 130, with nothing trained and no run folder written yet,
    instead of the process dying with 143."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise RunInterrupted(f"stopped by {signal.Signals(signum).name} during start-up, before training began: "
                             "nothing was trained and no run folder was written. Run the same command again to start it.")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _stop_on_signals(state: TrainState, progress: TrainProgress):
    """Turn the first SIGINT/SIGTERM into a stop request the loop honours at the next step
    boundary (after a checkpoint); a second one stops at once. Under torchrun a second signal
    is expected (torchrun passes a Ctrl-C on as SIGTERM) and changes nothing: the processes stop
    together at their next sync, and torchrun's own SIGKILL bounds the wait."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def request_stop(signum: int, frame: Any) -> None:
        if state.stop_requested:
            if state.processes.distributed:
                return
            raise KeyboardInterrupt
        state.stop_requested = signal.Signals(signum).name
        progress.note(f"{state.stop_requested}: stopping after this step and saving a checkpoint "
                      "(send it again to stop at once)")

    signals = [signal.SIGINT, signal.SIGTERM]
    previous = {s: signal.signal(s, request_stop) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def describe(summary: dict[str, Any], run_dir: Path) -> str:
    """One line on how a finished run did, naming how its headline figure was chosen."""
    pct = lambda x: f"{100 * x:.2f}%"  # noqa: E731
    final = f"final test top-1 {pct(summary['final_acc1'])}"
    if summary.get("selection") == "val" and summary.get("best_epoch") is not None:
        head = (f"best val top-1 {pct(summary['best_val_acc1'])} at epoch {summary['best_epoch']} "
                f"(test top-1 there {pct(summary['best_test_acc1'])}), {final}")
    else:
        head = f"{final} (no validation split: no epoch selected)"
    budget = f"; {describe_budget_use(summary['time_budget'])}" if summary.get("time_budget") else ""
    return (f"{summary['name']}: {head}, {summary['train_time_s']:.1f} s training, "
            f"{summary['images_per_s']:,.0f} img/s{budget} -> {run_dir}")

