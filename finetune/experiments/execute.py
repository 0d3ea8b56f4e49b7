"""Running an experiment: every variant that has no finished run yet, one after the other (in one
process, or each through torchrun), a failed variant recorded in its run folder while the others
still run, and the report written at the end."""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rich.console import Console
from rich.markup import escape

from ..errors import DivergedError, ExperimentError, FinetuneError
from ..recipe import Recipe, dump_recipe_yaml
from ..runs import run as train
from ..runs.folder import is_run_folder, lock_held, run_status, strict_json, write_marker
from ..snapshot import write_text_atomically
from ..training.activity import Activity
from .plan import PlannedRun, experiment_to_yaml, plan_experiment
from .report import write_experiment_report
from .spec import EXPERIMENT_FILE, Experiment

console = Console(stderr=True)


@dataclass(frozen=True)
class VariantResult:
    """How one variant ended: ``reused``, ``finished``, ``diverged`` or ``failed`` (with ``error``)."""

    name: str
    status: Literal["reused", "finished", "diverged", "failed", "skipped"]
    run_dir: Path
    error: str | None = None


@dataclass(frozen=True)
class ExperimentResult:
    """The outcome of :func:`run_experiment`.

    Attributes:
        experiment: what was run.
        variants: one result per variant, in run order.
        report: the report files by kind (``markdown``, ``csv``, ``acc_vs_epoch``, ...).
        table: the comparison table in Markdown and its ranking line, as in ``report.md``.
    """

    experiment: Experiment
    variants: list[VariantResult]
    report: dict[str, Path]
    table: str

    @property
    def failed(self) -> list[VariantResult]:
        """The variants that failed or diverged."""
        return [v for v in self.variants if v.status in ("failed", "diverged")]


def _record_failure(run_dir: Path, recipe: Recipe, error: str, source: str | None) -> None:
    """Leave a run folder that says the run failed, when the engine could not write one (it
    failed before creating its folder); a folder the engine wrote already says how its run ended."""
    if is_run_folder(run_dir) or lock_held(run_dir):
        return
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        return  # a file or link where the run folder would go: the error says so; leave it alone
    if run_dir.is_dir() and any(run_dir.iterdir()):
        return  # someone else's folder: never written into, never marked as ours
    run_dir.mkdir(parents=True, exist_ok=True)
    write_marker(run_dir)  # finetune made this folder, so a rerun may replace it
    if not (run_dir / "recipe.yaml").exists():
        write_text_atomically(run_dir / "recipe.yaml", dump_recipe_yaml(recipe))
    summary = {
        "name": recipe.name,
        "status": "failed",
        "error": error,
        "recipe_path": source,
        "mode": recipe.train.mode,
        "arch": recipe.model.arch,
        "source": recipe.model.source,
        "epochs": recipe.train.epochs,
    }
    write_text_atomically(run_dir / "summary.json", strict_json(summary, indent=2) + "\n")


def run_experiment(exp: Experiment, *, quiet: bool = False, nproc: int = 1,
                   selected: set[str] | None = None, wide: bool = False) -> ExperimentResult:
    """Run every variant that has no finished run yet, then write the report.

    With ``selected`` (from :func:`.plan.select_runs`), only those variants train; the others are
    reused when they finished, else left as they are (``skipped``), and the report covers them all.
    ``wide``: the printed table has every column (``report.md`` always has).

    A variant that raises (a :class:`FinetuneError` or any other exception) is recorded as failed
    (or diverged) in its run folder and the next variant runs; ``ExperimentResult.failed`` lists
    them. A ``KeyboardInterrupt`` stops the experiment: the engine saves a checkpoint and marks the
    run interrupted, and re-running the experiment resumes it.

    Args:
        exp: from :func:`load_experiment` or :func:`sweep_experiment`.
        quiet: no progress bars or status lines.
        nproc: processes per variant; above 1 each variant runs through torchrun
            (``finetune run``/``resume --nproc``), one after the other.

    Raises:
        ExperimentError: see :func:`plan_experiment`; raised before anything runs.
    """
    plans = plan_experiment(exp)
    try:
        exp.dir.mkdir(parents=True, exist_ok=True)
        write_text_atomically(exp.dir / EXPERIMENT_FILE, experiment_to_yaml(exp))
    except OSError as err:
        raise ExperimentError(
            f"Cannot write the experiment folder {exp.dir}: {err.strerror or err}.",
            "Set output.dir to a folder you can write to (not one under a file).",
        ) from None

    if not quiet:
        console.print(f"{exp.name}: {exp.describe_ranking()}", style="dim", highlight=False, markup=False)
    results = [_run_variant(exp, plan, f"[{i}/{len(plans)}] {plan.name}", quiet, nproc)
               if selected is None or plan.name in selected or plan.action == "reuse"
               else VariantResult(plan.name, "skipped", plan.run_dir)
               for i, plan in enumerate(plans, start=1)]
    title = f"{exp.name}: {exp.description}" if exp.description else exp.name
    # On a terminal only (no line is printed): a log reads as before.
    with Activity(None, "writing the report", quiet=quiet, console=console) as shown:
        paths, table = write_experiment_report([r.run_dir for r in results], exp.dir, title=title,
                                               sweep_keys=exp.sweep_keys, study=exp.study, wide=wide,
                                               progress=shown.update)
    return ExperimentResult(exp, results, paths, table)



def _run_variant(exp: Experiment, plan: PlannedRun, prefix: str, quiet: bool, nproc: int) -> VariantResult:
    """Reuse, run or resume one variant as planned; an exception is recorded as its failure."""
    if plan.action == "reuse":
        if not quiet:
            console.print(f"{prefix}: [dim]reusing the finished run in {plan.run_dir}[/]", highlight=False)
        return VariantResult(plan.name, "reused", plan.run_dir)
    again = {"replace": f" (replacing an unfinished run: {plan.reason})",
             "resume": f" (resuming: {plan.reason})"}.get(plan.action, "")
    if not quiet:
        console.rule(f"{prefix}{again}", style="dim")
    elif again:  # even with -q: a log says why a folder was resumed or replaced
        console.print(f"{prefix}:{again}", highlight=False, markup=False)
    # An unfinished run being replaced is moved aside when the new one starts and deleted only
    # once it finishes (output.overwrite), so a failure loses nothing.
    overwrite = plan.action == "replace"
    recipe = plan.recipe.model_copy(update={"output": plan.recipe.output.model_copy(update={"overwrite": overwrite})})
    try:
        if nproc > 1:
            _run_distributed(plan, recipe, nproc, quiet)
        elif plan.action == "resume":
            train.resume(plan.run_dir, quiet=quiet)
        else:
            train.run(recipe, recipe_path=exp.source, quiet=quiet)
    except Exception as exc:  # noqa: BLE001 - one broken variant must not cost the others
        error = f"{type(exc).__name__}: {exc}"
        _record_failure(plan.run_dir, plan.recipe, error, exp.source)
        status = "diverged" if isinstance(exc, DivergedError) else "failed"
        if not quiet and not isinstance(exc, FinetuneError):  # a bug, not a user error: keep the traceback
            console.print(traceback.format_exc(), style="dim", highlight=False, markup=False)
        # Even with -q: a failure that happened before the run could write its folder (a resume
        # refused, say) is recorded nowhere else.
        console.print(f"[red]{prefix} {status}:[/] {escape(error)}", highlight=False)
        return VariantResult(plan.name, status, plan.run_dir, error)
    return VariantResult(plan.name, "finished", plan.run_dir)


def _run_distributed(plan: PlannedRun, recipe: Recipe, nproc: int, quiet: bool) -> None:
    """Train one variant in ``nproc`` processes through torchrun; raise if they fail."""
    import tempfile

    from ..training.distributed import run_processes

    quiet_flag = ["-q"] if quiet else []
    if plan.action == "resume":
        launched = run_processes(["resume", str(plan.run_dir), *quiet_flag], nproc)
    else:
        with tempfile.TemporaryDirectory() as tmp:  # the variant's complete recipe, for the processes to read
            path = Path(tmp) / f"{plan.name}.yaml"
            path.write_text(dump_recipe_yaml(recipe), encoding="utf-8")
            launched = run_processes(["run", str(path), *quiet_flag], nproc)
    if launched.code == 130:
        raise KeyboardInterrupt  # the processes saved a checkpoint and said so; stop like one process would
    error = launched.error(nproc, plan.run_dir)
    if error is not None:  # torchrun's own report was kept quiet: one paragraph, with the run's status
        raise FinetuneError(f"{error.problem} (Run status: {run_status(plan.run_dir)}.)", error.fix)
