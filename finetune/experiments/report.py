"""Comparison reports over many runs: ``report.md`` and ``report.csv`` with one row per run, the
ranking line, and the figures of :mod:`finetune.viz.plots` (accuracy against epoch and against
training time and, for a hyperparameter sweep, accuracy against the swept settings).

Runs are read back by :mod:`.records` and ranked as it says: on validation when every run has a
validation split, otherwise on test, and then the table's heading and ranking column, the summary
line, the CSV's ``ranked_on`` column and every figure's title say "ranked on test"
(:data:`~.records.RANKED_ON`). Importing this module does not import matplotlib.

Example:
    >>> from finetune.experiments.report import write_report
    >>> paths = write_report(sorted(Path("runs").glob("lab_lr*")), "runs/report",
    ...                      sweep_keys=["optim.lr"])
    >>> print(paths["markdown"].read_text())
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from ..errors import FinetuneError
from ..snapshot import write_text_atomically
from .grid import Study
from ..viz.plots import plot_accuracy, plot_sweep, plot_tradeoff
from ..runs.records import (
    BASIS_LABEL,
    IGNORED_KEYS,
    IGNORED_PREFIXES,
    RANKED_ON,
    RunRecord,
    format_value,
    read_run,
    selection_basis,
    training_state_mb,
    varied_keys,
)

_ERROR_WIDTH = 60  # characters of an error message that fit in a table cell
# progress(what, done, total): where writing a report has got; total None while drawing.
ReportProgress = Callable[[str, int, int | None], None]


def _pct(acc: float | None) -> str:
    return "-" if acc is None else f"{100 * acc:.2f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    return f"{minutes // 60}h {minutes % 60:02d}m"


def _count(n: int | None) -> str:
    if n is None:
        return "-"
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.2f}{suffix}"
    return str(n)


def _short(text: str, width: int = _ERROR_WIDTH) -> str:
    """First line of ``text``, cut to ``width`` characters (tracebacks end in the useful line)."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    line = lines[-1] if lines and lines[0].startswith("Traceback") else (lines[0] if lines else "")
    return line if len(line) <= width else line[: width - 3] + "..."


def _cell(text: str) -> str:
    """Escape what would break a Markdown table row."""
    return text.replace("|", "\\|").replace("\n", " ")


def _status(record: RunRecord) -> str:
    return f"{record.status}: {_short(record.error)}" if record.error else record.status


def _epochs(record: RunRecord) -> str:
    if record.epochs is None:
        return str(record.epochs_done or "-")
    # A run that stopped early shows how far it got.
    return str(record.epochs) if record.status == "finished" else f"{record.epochs_done}/{record.epochs}"


# Settings that differ between runs without being what a comparison is about: where the data and
# the outputs are, how fast the machine reads them. The terminal's table leaves them to the CSV.
_PLUMBING = ("data.root", "data.path", "data.download", "data.workers", "data.cache", "data.in_memory",
             "train.cpu_threads", "train.log_every", "device")
TERMINAL_KEYS = 4  # setting columns the terminal's table shows; the rest are counted under it


def terminal_keys(keys: Sequence[str]) -> list[str]:
    """The setting columns worth a terminal's width: the first few that are not plumbing."""
    return [k for k in keys if k not in _PLUMBING][:TERMINAL_KEYS]


def format_compact(records: Sequence[RunRecord], keys: Sequence[str]) -> str:
    """The comparison as a terminal reads it: the run (and its status, with the start of its error,
    when some run did not finish), the settings that matter (at most
    :data:`TERMINAL_KEYS`, plumbing such as ``data.root`` left out), the accuracy runs are ranked by
    and the test top-1 that goes with it, training time and trainable parameters; a line under it
    counts the other settings that differ (all are in ``report.csv``, and ``--wide`` prints them)."""
    shown = terminal_keys(keys)
    basis = selection_basis(records)
    scores = ["Val top-1 (%)", "Test top-1 at best val (%)"] if basis == "val" else [f"Final test top-1 (%, {RANKED_ON[basis]})"]
    status = any(r.status != "finished" for r in records)  # a column only when a run did not finish
    header = ["Run", *(["Status"] if status else []), *shown, *scores, "Time", "Trainable"]
    numbers = len(scores) + 2
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join([" --- "] * (len(header) - numbers) + [" ---: "] * numbers) + "|"]
    for r in records:
        accs = [_pct(r.best_val_acc1), _pct(r.best_test_acc1)] if basis == "val" else [_pct(r.final_acc1)]
        settings = [format_value(r.recipe[k]) if k in r.recipe else "-" for k in shown]
        row = [r.name, *([_status(r)] if status else []), *settings, *accs,
               _duration(r.train_time_s if r.train_time_s is not None else r.wall_time_s), _count(r.params_trainable)]
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    hidden = [k for k in keys if k not in shown]
    if hidden:
        lines += ["", f"{len(hidden)} more setting(s) differ ({', '.join(hidden[:6])}{', ...' if len(hidden) > 6 else ''}): "
                  "see report.csv, or pass --wide."]
    return "\n".join(lines)


def format_table(records: Sequence[RunRecord], keys: Sequence[str]) -> str:
    """The comparison table in Markdown, one row per run, every column (``report.md``, ``--wide``).

    Args:
        records: the runs, in the order of the rows.
        keys: flattened recipe keys to show as columns, usually :func:`varied_keys`.

    Returns:
        The table. The figure runs are ranked by (:func:`selection_basis`) is in bold for the top
        finished run: the best validation top-1, or the final test top-1, whose column heading then
        says "ranked on test".
    """
    basis = selection_basis(records)
    final = "Final test top-1 (%)" if basis == "val" else f"Final test top-1 (%, {RANKED_ON[basis]})"
    header = ["Run", "Status", *keys, "Val top-1 (%)", "Test top-1 at best val (%)", final,
              "Epochs", "Time", "Images/s", "Trainable params", "Total params", "Peak mem (MB)"]
    numbers = 9  # the columns after the settings are numbers: right-aligned
    texts = len(header) - numbers
    scores = [r.score(basis) for r in records if r.status == "finished" and r.score(basis) is not None]
    top = max(scores) if scores else None
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join([" --- "] * texts + [" ---: "] * numbers) + "|"]
    for r in records:
        accs = [_pct(r.best_val_acc1), _pct(r.best_test_acc1), _pct(r.final_acc1)]
        if top is not None and r.status == "finished" and r.score(basis) == top and len(records) > 1:
            column = 0 if basis == "val" else 2
            accs[column] = f"**{accs[column]}**"
        row = [
            r.name, _status(r), *(format_value(r.recipe[k]) if k in r.recipe else "-" for k in keys),
            *accs, _epochs(r), _duration(r.wall_time_s),
            "-" if r.images_per_s is None else f"{r.images_per_s:,.0f}",
            _count(r.params_trainable), _count(r.params_total),
            "-" if r.peak_memory_mb is None else f"{r.peak_memory_mb:,.0f}",
        ]
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return "\n".join(lines)


def _ranked(records: Sequence[RunRecord], basis: str) -> list[RunRecord]:
    """The finished runs with a score, best first (ties keep the table's order)."""
    scored = [r for r in records if r.status == "finished" and r.score(basis) is not None]
    return sorted(scored, key=lambda r: -r.score(basis))


def ranking_summary(records: Sequence[RunRecord]) -> str:
    """One line on how the runs are ranked and which is best, beginning with :data:`RANKED_ON`.

    ``Ranked on validation: best **b**, 70.00% val top-1 at epoch 1; test top-1 at that epoch
    65.00%.`` or, when a finished run has no validation split, ``Ranked on test (no validation
    split in c): best **a**, 78.75% test top-1 after the last epoch. ...``, naming the runs without
    one and what to do about it.
    """
    basis = selection_basis(records)
    head = RANKED_ON[basis].capitalize()
    ranked = _ranked(records, basis)
    if basis == "val":
        if not ranked:
            return f"{head}: no run finished."
        best = ranked[0]
        return (f"{head}: best **{best.name}**, {_pct(best.best_val_acc1)}% val top-1 at epoch {best.best_epoch}; "
                f"test top-1 at that epoch {_pct(best.best_test_acc1)}%.")
    finished = [r for r in records if r.status == "finished"] or list(records)
    lacking = [r.name for r in finished if not (r.selection == "val" and r.best_val_acc1 is not None)]
    why = ("no run has a validation split" if len(lacking) == len(finished)
           else f"no validation split in {', '.join(lacking)}")
    best = (f"best **{ranked[0].name}**, {_pct(ranked[0].final_acc1)}% test top-1 after the last epoch"
            if ranked else "no run finished")
    return (f"{head} ({why}): {best}. The test set chose the ranking, so the best run's test top-1 is "
            "optimistic; hold out a validation split (`data.val_split`) to rank honestly.")


def _legend_labels(records: Sequence[RunRecord], keys: Sequence[str]) -> list[str]:
    """Label runs by their settings when few differ (``lr=0.001, batch_size=64``), else by name."""
    if not keys or len(keys) > 3:
        return [r.name for r in records]
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    # Use the short leaf names unless two varied keys share one (model.x and data.x).
    shown = leaves if len(set(leaves)) == len(leaves) else list(keys)
    return [", ".join(f"{s}={format_value(r.recipe.get(k))}" for s, k in zip(shown, keys)) for r in records]


def write_report(
    run_dirs: Iterable[str | Path],
    out_dir: str | Path,
    *,
    title: str | None = None,
    sweep_keys: Sequence[str] | None = None,
    study: Study | None = None,
    progress: ReportProgress | None = None,
) -> dict[str, Path]:
    """Compare runs: a Markdown and a CSV table, accuracy curves and, for a sweep, its plot; for a
    study, its table and plot averaged over seeds too (:mod:`.study_report`).

    Failed and missing runs get a table row with their status and error and are left out of
    the plots.

    Args:
        run_dirs: run directories, in the order of the table rows.
        out_dir: folder for the report files; created if needed.
        title: heading of ``report.md``.
        sweep_keys: flattened recipe keys that were swept (``["optim.lr", "data.batch_size"]``);
            they head the table's settings columns and get ``sweep.png``.
        study: which variant and grid point each run is, for an experiment with a ``grid``.
        progress: called as ``progress(what, done, total)`` after each run is read (``total`` the
            number of runs), then with ``total`` ``None`` as the figures are drawn, e.g. to move
            a progress bar.

    Returns:
        The files written, by kind: ``markdown``, ``csv``, and, when any run has epochs to
        plot, ``acc_vs_epoch`` and ``acc_vs_time``, ``sweep`` when ``sweep_keys`` is given
        and a run finished, and ``tradeoff`` when finished runs differ in ``train.mode``. For a
        study, instead of the per-run figures: ``study_csv``, ``study_md`` and, with an x-axis,
        ``study`` and ``study_tradeoff`` (:func:`.study_report.write_study`).

    Raises:
        FinetuneError: no run directories, a sweep key that no run's recipe has, or a write that
            failed (a full disk, no permission); ``report.md`` is then the earlier one or none.
    """
    return _write_records(read_runs(run_dirs, progress), out_dir, title, sweep_keys, study, progress)


def read_runs(run_dirs: Iterable[str | Path], progress: ReportProgress | None = None) -> list[RunRecord]:
    """:func:`~finetune.runs.records.read_run` of each folder, in order, calling
    ``progress("reading N runs", done, N)`` after each."""
    run_dirs = list(run_dirs)
    records = []
    for run_dir in run_dirs:
        records.append(read_run(run_dir))
        if progress is not None:
            progress(f"reading {len(run_dirs)} runs", len(records), len(run_dirs))
    return records


def _write_records(records: list[RunRecord], out_dir: str | Path, title: str | None,
                   sweep_keys: Sequence[str] | None, study: Study | None, progress: ReportProgress | None) -> dict[str, Path]:
    """:func:`write_report` on runs already read."""
    if not records:
        raise FinetuneError("No run directories to report on.", "Pass one or more run folders.")
    if progress is not None:
        progress("drawing the report", 0, None)
    sweep_keys = list(sweep_keys or [])
    keys = _columns(records, sweep_keys)
    out_dir = Path(out_dir)
    basis = selection_basis(records)  # one ranking for the table, the CSV and every plot
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = _draw_figures(records, keys, sweep_keys, out_dir, basis) if study is None else {}
        if study is not None:  # dozens of runs: the per-run curves would be unreadable; study.png says it
            from .study_report import write_study

            paths.update(write_study(records, study, out_dir))
        paths["csv"] = _write_csv(records, keys, out_dir / "report.csv")
        paths["markdown"] = out_dir / "report.md"
        # Replaced whole (temporary file, rename): a failed write never leaves half a report.md.
        write_text_atomically(paths["markdown"], _markdown(records, keys, title, paths))
    except OSError as exc:
        raise FinetuneError(f"Could not write the report to {out_dir}: {exc.strerror or exc}.",
                            "Free some disk space, or pass --out a folder you can write to.") from None
    return paths


def _columns(records: Sequence[RunRecord], sweep_keys: list[str]) -> list[str]:
    """The report's settings columns: the swept keys first, then whatever else differs (a seed, a
    changed default).

    Raises:
        FinetuneError: a sweep key that no run's recipe has.
    """
    keys = varied_keys(records)
    known = {k for r in records for k in r.recipe}
    unknown = [k for k in sweep_keys if k not in known]
    if unknown:
        raise FinetuneError(
            f"Sweep key(s) {', '.join(unknown)} are in none of the runs' recipes.",
            f"Use dotted recipe keys; these differ across the runs: {', '.join(keys) or 'none'}.",
        )
    return sweep_keys + [k for k in keys if k not in sweep_keys]


def _draw_figures(
    records: Sequence[RunRecord], keys: list[str], sweep_keys: list[str], out_dir: Path, basis: str
) -> dict[str, Path]:
    """The report's figures, by kind: accuracy against epoch and time for the runs with epochs to
    plot, the sweep's plot, and the trade-off when finished runs differ in ``train.mode``."""
    paths: dict[str, Path] = {}
    plotted = [r for r in records if r.ok]
    if plotted:
        labels = _legend_labels(plotted, sweep_keys or keys)
        paths["acc_vs_epoch"] = plot_accuracy(plotted, labels, out_dir / "acc_vs_epoch.png", "epoch", basis)
        paths["acc_vs_time"] = plot_accuracy(plotted, labels, out_dir / "acc_vs_time.png", "time_s", basis)
    finished = [r for r in records if r.status == "finished" and r.final_acc1 is not None]
    if sweep_keys and finished:
        paths["sweep"] = plot_sweep(finished, sweep_keys, out_dir / "sweep.png", basis=basis)
    if len({r.recipe.get("train.mode") for r in finished}) > 1:
        paths["tradeoff"] = plot_tradeoff(finished, out_dir / "tradeoff.png", basis=basis)
    return paths


def _write_csv(records: Sequence[RunRecord], keys: Sequence[str], path: Path) -> Path:
    """Full-precision numbers for further analysis; accuracies in percent like the Markdown.

    ``rank`` is 1 for the best finished run (empty for the others) and ``ranked_on`` says on what,
    ``validation`` or ``test``, in every row; ``selection`` is how each run chose its own best epoch.
    """
    basis = selection_basis(records)
    ranks = {id(r): i for i, r in enumerate(_ranked(records, basis), start=1)}
    ranked_on = RANKED_ON[basis].removeprefix("ranked on ")
    columns = ["name", "status", *keys, "rank", "ranked_on", "selection", "best_val_top1_pct", "best_epoch",
               "test_top1_at_best_val_pct",
               "final_top1_pct", "final_top5_pct", "peak_test_top1_pct_selected_on_test",
               "epochs", "epochs_done", "wall_time_s", "train_time_s", "images_per_s",
               "params_trainable", "params_total", "training_state_mb", "peak_memory_mb", "error", "run_dir"]

    def pct(acc: float | None) -> float | None:
        return None if acc is None else round(100 * acc, 4)

    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in records:
            writer.writerow([
                r.name, r.status, *(format_value(r.recipe[k]) if k in r.recipe else "" for k in keys),
                ranks.get(id(r)), ranked_on, r.selection, pct(r.best_val_acc1), r.best_epoch, pct(r.best_test_acc1),
                pct(r.final_acc1), pct(r.final_acc5), pct(r.peak_test_acc1), r.epochs,
                r.epochs_done, r.wall_time_s, r.train_time_s, r.images_per_s, r.params_trainable,
                r.params_total, training_state_mb(r), r.peak_memory_mb, r.error, str(r.run_dir),
            ])  # csv writes None as an empty field
    return path


def _markdown(
    records: Sequence[RunRecord], keys: Sequence[str], title: str | None, paths: dict[str, Path]
) -> str:
    """``report.md``: summary line, table, plots, full errors, and the settings all runs share."""
    counts: dict[str, int] = {}
    for r in records:
        counts[r.status] = counts.get(r.status, 0) + 1
    differ = ", ".join(f"`{k}`" for k in keys)
    lines = [f"# {title or 'Run comparison'}", "",
             f"{len(records)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + ". "
             + (f"Settings that differ: {differ}." if keys else "All settings are equal.")]
    basis = selection_basis(records)
    ranked = RANKED_ON[basis]
    how = ("Runs are ranked by their best validation top-1; each run's best epoch was chosen on validation "
           "and its test top-1 is given at that epoch." if basis == "val" else
           "Not every run has a validation split, so runs are ranked by test top-1 after the last epoch: "
           "no epoch was selected on the test set, but the test set picks the best run.")
    # The table and the ranking line are printed together by `finetune compare/sweep/report`.
    if "study_md" in paths:
        lines += ["", "The study's table and figure, averaged over seeds: [study.md](study.md).",
                  "", "![Accuracy against the study's grid, per variant](study.png)" if "study" in paths else ""]
    lines += ["", f"## Results, {ranked}", "", format_table(records, keys), "", ranking_summary(records), "",
              f"Accuracies are top-1 in percent, from one run (one seed) each unless a seed column says "
              f"otherwise. {how} Time is the run's wall-clock time."]
    if "acc_vs_epoch" in paths:
        lines += ["", f"## Test accuracy ({ranked})", "", "![Test top-1 against epoch](acc_vs_epoch.png)", "",
                  "![Test top-1 against training time](acc_vs_time.png)"]
    if "sweep" in paths:
        lines += ["", f"## Sweep ({ranked})", "",
                  f"![{BASIS_LABEL[basis].capitalize()} against the swept settings, {ranked}](sweep.png)"]
    if "tradeoff" in paths:
        lines += ["", f"## Accuracy against cost ({ranked})", "",
                  "![Accuracy against trainable parameters, training time and training-state memory](tradeoff.png)"]
    failed = [r for r in records if r.error]
    if failed:
        lines += ["", "## Errors", ""]
        for r in failed:
            lines += [f"**{r.name}** ({r.status}, `{r.run_dir}`):", "",
                      "```", str(r.error).strip(), "```", ""]
    # The settings every run shares make the report self-describing without opening a recipe.
    recipes = [r.recipe for r in records if r.recipe]
    if recipes:
        shared = {k: v for k, v in recipes[0].items()
                  if k not in keys and k not in IGNORED_KEYS and not k.startswith(IGNORED_PREFIXES)}
        lines += ["", "<details><summary>Settings shared by all runs</summary>", "", "```yaml",
                  *(f"{k}: {format_value(v)}" for k, v in shared.items()), "```", "", "</details>"]
    return "\n".join(lines).rstrip() + "\n"


def write_experiment_report(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    title: str | None = None,
    sweep_keys: Sequence[str] | None = None,
    study: Study | None = None,
    wide: bool = False,
    progress: ReportProgress | None = None,
) -> tuple[dict[str, Path], str]:
    """:func:`write_report`, plus its comparison table as Markdown text to print (for a study,
    the study's table, one row per variant and grid point, instead of one row per run): the
    compact table (:func:`format_compact`), or with ``wide`` every column, as in ``report.md``.

    Returns:
        The files written by kind, and the table followed by its ranking line (as in ``report.md``):
        ``Ranked on validation: best ...`` or ``Ranked on test (...): best ...``, so that what is
        printed never ranks on test without saying so.

    ``progress``: as :func:`write_report`'s (each run is read once, for the files and the table).
    """
    records = read_runs(run_dirs, progress)
    paths = _write_records(records, out_dir, title, sweep_keys, study, progress)
    if study is not None:
        from .study_report import study_table

        return paths, study_table(records, study)
    swept = list(sweep_keys or [])
    keys = swept + [k for k in varied_keys(records) if k not in swept]  # write_report's column order
    table = format_table(records, keys) if wide else format_compact(records, keys)
    return paths, table + "\n\n" + ranking_summary(records)
