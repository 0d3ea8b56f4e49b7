"""``finetune compare``, ``sweep`` and ``report``: several runs planned, trained and compared in one
report, or a report over run and experiment folders that exist already."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import FinetuneError
from .common import NprocOpt, OverridesArg, check_writable_folder, err, friendly_errors, out


def _print_plan(plans: list, selected: set[str], missing: dict[str, str]) -> None:
    table = Table("variant", "action", "weights", "run folder", box=None, header_style="bold")
    for plan in plans:
        action = f"{plan.action} ({plan.reason})" if plan.reason else plan.action
        if plan.name not in selected and plan.action != "reuse":
            action = "skip (not selected by --only/--skip)"
        table.add_row(plan.name, action, missing.get(plan.name, "ok"), str(plan.run_dir))
    out.print(table, highlight=False)


def _missing_weights(experiment: Any, names: set[str]) -> dict[str, str]:
    """Variant -> why its pretrained weights or base run cannot be had now (nothing is read or
    downloaded), for the variants in ``names`` that start from weights."""
    from ..models.sources import source_unavailable

    seen: dict[str, str | None] = {}
    missing = {}
    for name, recipe in experiment.variants:
        source = recipe.model.source
        if name not in names or source is None or recipe.train.mode == "scratch":
            continue
        if source not in seen:
            seen[source] = source_unavailable(source)
        if seen[source] is not None:
            missing[name] = f"cannot be had: {seen[source]}"
    return missing


def _run_and_report(experiment: Any, dry_run: bool, quiet: bool, nproc: int = 1,
                    only: list[str] | None = None, skip: list[str] | None = None, wide: bool = False) -> None:
    """Shared tail of compare and sweep: plan or run, print the table, fail if a variant failed."""
    from ..experiments.execute import run_experiment
    from ..experiments.plan import plan_experiment, select_runs

    selected = select_runs(experiment, _patterns(only), _patterns(skip))
    if dry_run:
        plans = plan_experiment(experiment)
        to_train = {p.name for p in plans if p.name in selected and p.action != "reuse"}
        missing = _missing_weights(experiment, to_train)
        _print_plan(plans, selected, missing)
        out.print(experiment.describe_ranking(), highlight=False, markup=False)
        study = getattr(experiment, "study", None)
        what = (f"{len(experiment.variants)} runs ({len(study.variants)} variants at "
                f"{len(experiment.variants) // max(len(study.variants), 1)} grid points)" if study
                else f"{len(experiment.variants)} variants")
        if missing:
            by_reason: dict[str, list[str]] = {}
            for name, why in missing.items():
                by_reason.setdefault(why.removeprefix("cannot be had: "), []).append(name)
            raise FinetuneError(
                f"{what} validate, but {len(missing)} of the {len(to_train)} to train cannot get their weights: "
                + "; ".join(f"{', '.join(names)}: {why}" for why, names in by_reason.items()) + ".",
                "Put the weights in the hub cache or pass a local file or folder as model.source (for a base run, "
                "train it first); or leave those variants out with --skip.",
            )
        out.print(f"[green]ok[/] {what} validate; {len(to_train)} to train, each with its weights at hand "
                  f"-> {escape(str(experiment.dir))}", highlight=False)
        return
    result = run_experiment(experiment, quiet=quiet, nproc=nproc, selected=selected, wide=wide)
    out.print(result.table, markup=False, highlight=False, soft_wrap=True)
    out.print(f"report: {result.report['markdown']}", highlight=False, markup=False)
    if result.failed:
        names = ", ".join(v.name for v in result.failed)
        raise FinetuneError(
            f"{len(result.failed)} of {len(result.variants)} variants failed: {names}.",
            f"Each failure's error is printed above (and in {result.report['markdown']} where the run "
            "recorded it). Fix them and rerun the same command: "
            "finished runs are reused, the others resume from their last checkpoint or start again.",
        )


def _patterns(values: list[str] | None) -> list[str]:
    """``--only a,b --only c`` -> ``[a, b, c]``."""
    return [p.strip() for v in values or [] for p in v.split(",") if p.strip()]


ExperimentNameOpt = Annotated[
    str | None,
    typer.Option("--name", help="Experiment name, the folder under output.dir (default: from the file or recipe)."),
]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="Validate every variant and show what would run, reuse or be replaced.")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or status lines.")]
OnlyOpt = Annotated[
    list[str] | None,
    typer.Option("--only", help="Train only these variants or runs (names, or patterns such as 'full_*'; comma-separated "
                 "or repeated); the report still covers the whole experiment.", show_default=False),
]
WideOpt = Annotated[bool, typer.Option("--wide", help="Print every column of the table (report.md and report.csv "
                                                      "always have them).")]
SkipOpt = Annotated[
    list[str] | None,
    typer.Option("--skip", help="Train all but these variants or runs (names or patterns).", show_default=False),
]


@friendly_errors
def compare(
    experiment: Annotated[
        str, typer.Argument(help="Experiment file (a base recipe plus named variants), or an experiment folder.")
    ],
    overrides: OverridesArg = None,
    name: ExperimentNameOpt = None,
    dry_run: DryRunOpt = False,
    quiet: QuietOpt = False,
    nproc: NprocOpt = 1,
    only: OnlyOpt = None,
    skip: SkipOpt = None,
    wide: WideOpt = False,
) -> None:
    """Run the variants of an experiment on the same data and seed, and compare them in one report.

    Overrides apply to every variant. Rerunning reuses finished runs and resumes unfinished ones.
    With --nproc N each variant trains in N processes.

    Example: finetune compare recipes/compare_cifar.yaml train.epochs=1
    """
    from ..experiments.spec import load_experiment

    _run_and_report(load_experiment(experiment, overrides or [], name=name), dry_run, quiet, nproc, only, skip, wide)


@friendly_errors
def sweep(
    recipe: Annotated[str, typer.Argument(help="Recipe file, or the name of a shipped recipe.")],
    overrides: OverridesArg = None,
    grid: Annotated[
        list[str] | None,
        typer.Option("--grid", "-g", help="KEY=VALUE1,VALUE2,...; repeat for more keys (Cartesian product).",
                     show_default=False),
    ] = None,
    name: ExperimentNameOpt = None,
    dry_run: DryRunOpt = False,
    quiet: QuietOpt = False,
    nproc: NprocOpt = 1,
    only: OnlyOpt = None,
    skip: SkipOpt = None,
    wide: WideOpt = False,
) -> None:
    """Train every combination of the --grid values, and compare them in one report.

    Example: finetune sweep recipes/vit_lab_cifar.yaml --grid optim.lr=1e-3,3e-4 --grid data.batch_size=32,128
    """
    from ..experiments.sweep import sweep_experiment

    _run_and_report(sweep_experiment(recipe, grid or [], overrides or [], name=name), dry_run, quiet, nproc, only, skip, wide)


@friendly_errors
def report(
    run_dirs: Annotated[
        list[Path], typer.Argument(help="Run folders, or experiment folders (all their variants).", show_default=False)
    ],
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Folder for the report (default: the experiment folder, else ./report)."),
    ] = None,
    sweep_keys: Annotated[
        str | None, typer.Option("--sweep-keys", help="Comma-separated swept keys for sweep.png, e.g. optim.lr,data.batch_size.")
    ] = None,
    title: Annotated[str | None, typer.Option(help="Heading of report.md.")] = None,
    wide: WideOpt = False,
) -> None:
    """Compare finished runs: a Markdown and CSV table, accuracy curves and, for a sweep, its plot.

    Example: finetune report runs/compare_cifar --out runs/compare_cifar
    """
    from ..experiments.report import write_experiment_report
    from ..experiments.spec import EXPERIMENT_FILE, read_experiment_folder
    from ..runs.folder import MARKER, is_run_folder
    from ..training.activity import Activity

    dirs: list[Path] = []
    experiments = []
    for path in run_dirs:
        if not path.exists():
            raise FinetuneError(f"{path} does not exist.", "Pass run folders (runs/NAME) or experiment folders.")
        if not path.is_dir():
            raise FinetuneError(f"{path} is a file, not a run folder.", "Pass run folders (runs/NAME) or experiment folders.")
        if (path / EXPERIMENT_FILE).is_file():
            experiments.append((path, *read_experiment_folder(path)))
            dirs += experiments[-1][1]
        else:
            dirs.append(path)
    single = experiments[0] if len(experiments) == 1 and len(run_dirs) == 1 else None
    keys = [k.strip() for k in sweep_keys.split(",") if k.strip()] if sweep_keys else (single[2] if single else [])
    target = out_dir or (single[0] if single else Path("report"))
    check_writable_folder(target, "--out")
    strangers = [path for path in run_dirs if path in dirs and not is_run_folder(path)]
    if strangers:  # a report on them would be a table of "missing" rows, written as if it meant something
        raise FinetuneError(
            f"{strangers[0]} is neither a run folder (no {MARKER} marker, nor the recipe.yaml and summary.json of a "
            "run from an earlier finetune) nor an experiment folder.",
            "Pass run folders (runs/NAME) or experiment folders, as finetune run, compare and sweep write them.",
        )
    with Activity(f"reading {len(dirs)} run(s) and drawing the report into {target} ...", "reading the runs",
                  console=err) as shown:
        paths, table = write_experiment_report(dirs, target, title=title or (single[3] if single else None),
                                               sweep_keys=keys, study=single[4] if single else None, wide=wide,
                                               progress=shown.update)
    out.print(table, markup=False, highlight=False, soft_wrap=True)
    out.print(f"report: {paths['markdown']}", highlight=False, markup=False)
