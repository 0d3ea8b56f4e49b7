"""Plots of one run and comparison reports over many runs.

A run directory (written by the training engine) holds ``summary.json``, ``metrics.jsonl`` and
the resolved ``recipe.yaml``. This module reads them back and draws:

- per run: loss and accuracy curves (:func:`plot_curves`) and a confusion matrix
  (:func:`plot_confusion`);
- over runs: ``report.md`` and ``report.csv`` with one row per run, accuracy against epoch and
  against training time, and, for a hyperparameter sweep, accuracy against the swept settings
  (:func:`write_report`).

Runs are ranked honestly: by their best validation accuracy when every run has a validation split
(each run's best epoch was chosen on validation, and its test accuracy is reported at that
epoch), otherwise by the test accuracy after the last epoch. A report never ranks on test
silently: then the table's heading and ranking column, the summary line, the CSV's ``ranked_on``
column and every figure's title say "ranked on test" (:data:`RANKED_ON`). The best test accuracy
over epochs is selected on the test set itself; it appears only in the CSV, labelled so, and never
ranks a run.

Figures are built with ``matplotlib.figure.Figure`` and saved through the Agg canvas instead of
``pyplot``: no backend is switched (a notebook keeps its own), no global figure list can leak
memory over a long sweep, and importing this module does not import matplotlib at all.

Example:
    >>> from finetune.experiments.report import write_report
    >>> paths = write_report(sorted(Path("runs").glob("lab_lr*")), "runs/report",
    ...                      sweep_keys=["optim.lr"])
    >>> print(paths["markdown"].read_text())
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..errors import FinetuneError
from ..runs.folder import run_status

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# Recipe keys that never describe the experiment: labels, and where/how the output is written.
_IGNORED_KEYS = ("name", "description")
_IGNORED_PREFIXES = ("output.",)
# Statuses whose curves are worth drawing; a failed run's partial curve would look like a result.
_PLOTTED = ("finished", "running")
_BASIS_LABEL = {"val": "best val top-1", "final": "final test top-1"}
RANKED_ON = {"val": "ranked on validation", "final": "ranked on test"}
"""What every table, plot and summary line says about a report's ranking, by :func:`selection_basis`."""
_ERROR_WIDTH = 60  # characters of an error message that fit in a table cell


# ---------------------------------------------------------------------------------------------
# Reading runs.
# ---------------------------------------------------------------------------------------------


@dataclass
class RunRecord:
    """What a report needs from one run directory.

    Attributes:
        run_dir: the run directory.
        name: the run name (summary, else recipe, else the folder name).
        status: ``finished``, ``running``, ``interrupted`` (stopped, or its process died),
            ``failed``, ``diverged``, or ``missing`` (no ``summary.json``).
        error: what went wrong, for runs that did not finish.
        selection: ``val`` (the run has a validation split and its best epoch was chosen on it) or
            ``final`` (no validation split: the last epoch counts).
        best_val_acc1: the best validation top-1 over epochs, 0..1 (``val`` runs).
        best_epoch: the epoch of ``best_val_acc1``.
        best_test_acc1: test top-1 at ``best_epoch``.
        final_acc1: test top-1 accuracy after the last epoch, 0..1.
        final_acc5: test top-5 accuracy after the last epoch, 0..1.
        peak_test_acc1: the best test top-1 over epochs: selected on the test set, so optimistic;
            reported only as such.
        epochs: planned number of epochs.
        epochs_done: epochs with an evaluation line in ``metrics.jsonl``.
        wall_time_s: wall-clock time of the whole run.
        train_time_s: time spent in training steps.
        images_per_s: training throughput.
        params_trainable: trainable parameter count.
        params_total: total parameter count.
        peak_memory_mb: peak accelerator memory; None on a CPU.
        epoch_rows: the ``"kind": "epoch"`` lines of ``metrics.jsonl``, in order.
        recipe: the resolved recipe, flattened to dotted keys (``{"optim.lr": 0.001, ...}``).
        summary: ``summary.json`` as read, for any other field.
    """

    run_dir: Path
    name: str
    status: str
    error: str | None = None
    selection: str = "final"
    best_val_acc1: float | None = None
    best_epoch: int | None = None
    best_test_acc1: float | None = None
    final_acc1: float | None = None
    final_acc5: float | None = None
    peak_test_acc1: float | None = None
    epochs: int | None = None
    epochs_done: int = 0
    wall_time_s: float | None = None
    train_time_s: float | None = None
    images_per_s: float | None = None
    params_trainable: int | None = None
    params_total: int | None = None
    peak_memory_mb: float | None = None
    epoch_rows: list[dict] = field(default_factory=list)
    recipe: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when the run's curves can be plotted (finished or still running, with epochs)."""
        return self.status in _PLOTTED and bool(self.epoch_rows)

    def score(self, basis: str) -> float | None:
        """What ranks the run: ``best_val_acc1`` for basis ``val``, ``final_acc1`` for ``final``."""
        return self.best_val_acc1 if basis == "val" else self.final_acc1


def selection_basis(records: Sequence[RunRecord]) -> str:
    """``val`` when every finished run chose its best epoch on a validation split, else ``final``.

    Runs are only ranked by validation accuracy when all of them have it; otherwise by the test
    accuracy after the last epoch, which no run selected an epoch on, but which then chooses the
    best run: every output of the report says "ranked on test" (:data:`RANKED_ON`).
    """
    finished = [r for r in records if r.status == "finished"] or list(records)
    return "val" if finished and all(r.selection == "val" and r.best_val_acc1 is not None for r in finished) else "final"


def read_metrics(path: str | Path) -> list[dict]:
    """Read ``metrics.jsonl``: one JSON object per line.

    Unparseable lines are skipped: a run killed while writing leaves a truncated last line, and
    the lines before it are still good.
    """
    rows = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings to dotted keys; lists stay values (``data.mean: [0.5, 0.5, 0.5]``)."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def read_run(run_dir: str | Path) -> RunRecord:
    """Read one run directory; never raises for a broken run.

    A missing ``summary.json`` gives status ``missing``, an unreadable one status ``failed``,
    each with the reason in ``error``, so that the run still gets its row in a report.
    Accuracies missing from the summary (a run still going, or one that crashed) are taken from
    the epoch lines of ``metrics.jsonl``.
    """
    run_dir = Path(run_dir)
    record = RunRecord(run_dir=run_dir, name=run_dir.name, status="missing")
    if not run_dir.is_dir():
        record.error = f"no such run folder: {run_dir}"
        return record

    try:
        raw_recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
        record.recipe = flatten(raw_recipe) if isinstance(raw_recipe, dict) else {}
    except (OSError, yaml.YAMLError):
        pass  # the table then shows no settings for this run; the summary says what happened
    if (run_dir / "metrics.jsonl").is_file():
        record.epoch_rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "epoch"]

    summary: Any = None
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        record.error = "no summary.json (the run never started, or was killed)"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        record.status, record.error = "failed", f"unreadable summary.json: {err}"
    if summary is not None and not isinstance(summary, dict):
        record.status, record.error = "failed", "unreadable summary.json: not a JSON object"
    elif isinstance(summary, dict):
        record.summary = summary
        record.status = str(summary.get("status") or "finished")
        if record.status == "running" and run_status(run_dir) == "interrupted":
            record.status = "interrupted"
            record.error = (f"its process stopped without a word (killed?); continue it with "
                            f"`finetune resume {run_dir}`")
        record.error = summary.get("error") or record.error
        for name in ("best_val_acc1", "best_test_acc1", "final_acc1", "final_acc5", "peak_test_acc1",
                     "wall_time_s", "train_time_s", "images_per_s", "peak_memory_mb"):
            setattr(record, name, _number(summary.get(name)))
        for name in ("best_epoch", "epochs", "params_trainable", "params_total"):
            value = _number(summary.get(name))
            setattr(record, name, None if value is None else int(value))

    record.name = str(record.summary.get("name") or record.recipe.get("name") or run_dir.name)
    tested = [r for r in record.epoch_rows if _number(r.get("test_acc1")) is not None]
    validated = [r for r in tested if _number(r.get("val_acc1")) is not None]
    record.epochs_done = max((int(r.get("epoch", 0)) for r in record.epoch_rows), default=0)
    # Runs written before selection was recorded, and runs still going, are read from their
    # epoch lines: a validation split means selection on it.
    record.selection = str(record.summary.get("selection") or ("val" if validated else "final"))
    if record.selection == "val" and record.best_val_acc1 is None and validated:
        best = max(validated, key=lambda r: r["val_acc1"])  # max keeps the first of equal epochs
        record.best_val_acc1, record.best_test_acc1 = float(best["val_acc1"]), float(best["test_acc1"])
        record.best_epoch = int(best.get("epoch", 0)) or None
    if record.final_acc1 is None and tested:
        record.final_acc1 = float(tested[-1]["test_acc1"])
    if record.peak_test_acc1 is None and tested:
        record.peak_test_acc1 = max(float(r["test_acc1"]) for r in tested)
    if record.epochs is None and _number(record.recipe.get("train.epochs")) is not None:
        record.epochs = int(record.recipe["train.epochs"])
    return record


def varied_keys(records: Sequence[RunRecord]) -> list[str]:
    """The flattened recipe keys whose values differ across runs, in recipe order.

    ``name``, ``description`` and ``output.*`` are ignored. Runs without a readable recipe are
    left out, so that one broken run does not make every key look varied. A key that only some
    recipes have counts as varied.
    """
    recipes = [r.recipe for r in records if r.recipe]
    keys: dict[str, None] = {}  # ordered set: first-seen order keeps model/train/optim/... order
    for recipe in recipes:
        keys.update(dict.fromkeys(recipe))
    return [
        key for key in keys
        if key not in _IGNORED_KEYS and not key.startswith(_IGNORED_PREFIXES)
        and len({json.dumps(r.get(key, "<absent>"), sort_keys=True) for r in recipes}) > 1
    ]


# ---------------------------------------------------------------------------------------------
# Formatting.
# ---------------------------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    """``value`` as a float, or None when it is missing, a bool, or not a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def format_value(value: Any) -> str:
    """A recipe value as it would be written in YAML: ``0.001``, ``1e-05``, ``true``, ``null``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return str(value)


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


def format_table(records: Sequence[RunRecord], keys: Sequence[str]) -> str:
    """The comparison table in Markdown, one row per run.

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


# ---------------------------------------------------------------------------------------------
# Plots.
# ---------------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure  # lazily: importing this module stays light

    return Figure(figsize=(width, height), layout="constrained")


def figure_titles(fig: Figure) -> list[str]:
    """The figure's title and its axes' titles and y labels, in drawing order, empty ones left out."""
    texts = [fig.get_suptitle()]
    for ax in fig.axes:
        texts += [ax.get_title(), ax.get_ylabel()]
    return [t for t in texts if t]


def _save(fig: Figure, out_png: str | Path) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    # The titles go into the PNG's text chunks too, so a reader (or a test) can tell how a figure
    # ranked its runs without looking at it: PIL's Image.open(path).text["Title"].
    titles = figure_titles(fig)
    metadata = {"Title": titles[0], "Description": " | ".join(titles)} if titles else {}
    fig.savefig(out_png, dpi=120, metadata=metadata)  # a pyplot-free Figure is freed with its last reference
    return out_png


def _smooth(values: Sequence[float]) -> list[float]:
    """Debiased exponential moving average with a window of about 1/30 of the curve."""
    beta = 1.0 - 1.0 / max(1.0, len(values) / 30)
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i) if beta > 0 else v)  # debias: the average starts at 0
    return out


def _step_epochs(steps: list[dict], epochs: list[dict]) -> list[float]:
    """Fractional epoch of each step line (epoch 1 runs from 0 to 1), from the epochs' last steps."""
    end = {int(r["epoch"]): int(r["step"]) for r in epochs if "step" in r and "epoch" in r}
    last_seen: dict[int, int] = {}
    for s in steps:
        last_seen[int(s["epoch"])] = max(last_seen.get(int(s["epoch"]), 0), int(s["step"]))
    xs = []
    for s in steps:
        e = int(s["epoch"])
        start = end.get(e - 1, 0 if e == 1 else last_seen.get(e - 1, 0))
        stop = end.get(e, last_seen[e])  # an epoch still running ends, for now, at its last step
        xs.append(e - 1 + (int(s["step"]) - start) / max(stop - start, 1))
    return xs


def plot_curves(
    metrics_path_or_rows: str | Path | Iterable[dict], out_png: str | Path, *, title: str | None = None
) -> Path:
    """Plot a run's loss and accuracy against epoch, side by side.

    Left: the training loss per logged step (faint) and smoothed, and the test loss per epoch.
    Right: test top-1, and validation and train top-1 when the run recorded them.

    Args:
        metrics_path_or_rows: ``metrics.jsonl``, or its rows already read.
        out_png: where to write the PNG.
        title: figure title, e.g. the run name.

    Returns:
        ``out_png``.
    """
    rows = (read_metrics(metrics_path_or_rows) if isinstance(metrics_path_or_rows, (str, Path))
            else list(metrics_path_or_rows))
    steps = [r for r in rows if r.get("kind") == "step" and _number(r.get("loss")) is not None]
    epochs = [r for r in rows if r.get("kind") == "epoch"]

    fig = _figure(11, 4.2)
    loss_ax, acc_ax = fig.subplots(1, 2)
    if steps:
        xs, losses = _step_epochs(steps, epochs), [float(r["loss"]) for r in steps]
        loss_ax.plot(xs, losses, color="C0", alpha=0.25, linewidth=0.8)
        loss_ax.plot(xs, _smooth(losses), color="C0", label="train (smoothed)")
    for ax, key, label, color in (
        (loss_ax, "test_loss", "test", "C1"),
        (acc_ax, "test_acc1", "test", "C1"),
        (acc_ax, "val_acc1", "validation", "C2"),
        (acc_ax, "train_acc1", "train", "C0"),
    ):
        points = [(r["epoch"], r[key]) for r in epochs if _number(r.get(key)) is not None]
        if points:
            scale = 100 if ax is acc_ax else 1
            ax.plot([p[0] for p in points], [scale * p[1] for p in points], "o-", color=color,
                    label=label, markersize=4)
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    acc_ax.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="Accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.set_xlim(left=0)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        fig.suptitle(title)
    return _save(fig, out_png)


def plot_confusion(
    matrix: Sequence[Sequence[float]],
    classes: Sequence[str] | None,
    out_png: str | Path,
    normalize: bool = True,
    *,
    title: str | None = None,
) -> Path:
    """Draw a confusion matrix as a heatmap (rows: true class, columns: predicted class).

    Args:
        matrix: ``(C, C)`` counts.
        classes: the ``C`` class names; None numbers them.
        out_png: where to write the PNG.
        normalize: show each row as percentages of that class's images, so that classes of
            different sizes compare; the diagonal is then the per-class accuracy.
        title: figure title.

    Returns:
        ``out_png``. Cells are annotated for up to 20 classes; beyond that the numbers would not
        fit, and class names are shown only up to 40 classes.
    """
    import numpy as np

    counts = np.asarray(matrix, dtype=float)
    n = counts.shape[0]
    if counts.ndim != 2 or counts.shape[1] != n:
        raise ValueError(f"the confusion matrix must be square, got shape {counts.shape}")
    names = [str(c) for c in classes] if classes is not None else [str(i) for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{len(names)} class names for a {n}x{n} confusion matrix")
    if normalize:
        totals = counts.sum(axis=1, keepdims=True)
        # A class absent from the test set gives an empty (NaN, blank) row, not a division error.
        values = np.divide(100 * counts, totals, out=np.full_like(counts, np.nan), where=totals > 0)
    else:
        values = counts

    side = min(12.0, max(5.0, 0.55 * n + 2.5))
    fig = _figure(side + 1.2, side)
    ax = fig.subplots()
    image = ax.imshow(values, cmap="Blues", vmin=0, vmax=100 if normalize else None)
    fig.colorbar(image, ax=ax, shrink=0.8, label="% of the true class" if normalize else "images")
    if n <= 20:
        high = (100 if normalize else np.nanmax(values)) / 2
        for i, j in np.ndindex(n, n):
            v = values[i, j]
            if not np.isnan(v):
                ax.text(j, i, f"{v:.0f}" if normalize else f"{int(v)}", ha="center", va="center",
                        fontsize=8 if n <= 12 else 6, color="white" if v > high else "black")
    if n <= 40:
        ax.set_xticks(range(n), names, rotation=45, ha="right", rotation_mode="anchor",
                      fontsize=9 if n <= 12 else 6)
        ax.set_yticks(range(n), names, fontsize=9 if n <= 12 else 6)
    ax.set(xlabel="predicted class", ylabel="true class")
    if normalize:
        accuracy = 100 * np.trace(counts) / max(counts.sum(), 1)
        title = f"{title} (top-1 {accuracy:.2f}%)" if title else f"Confusion matrix (top-1 {accuracy:.2f}%)"
    if title:
        ax.set_title(title)
    return _save(fig, out_png)


def _time_axis(max_seconds: float) -> tuple[float, str]:
    """Divisor and unit that keep time-axis ticks readable."""
    if max_seconds < 120:
        return 1.0, "s"
    if max_seconds < 7200:
        return 60.0, "min"
    return 3600.0, "h"


def _plot_accuracy(
    records: Sequence[RunRecord], labels: Sequence[str], out_png: Path, x_key: str, basis: str
) -> Path:
    """Test top-1 of each run against ``epoch`` or ``time_s``, one line per run.

    With ``basis`` ``val`` a star marks each run's epoch chosen on validation, the test top-1 the
    report gives for it; with ``final`` the title says the runs are ranked on test.
    """
    import matplotlib

    fig = _figure(8, 5)
    ax = fig.subplots()
    series, chosen = [], []
    for r in records:
        rows = [row for row in r.epoch_rows
                if _number(row.get(x_key)) is not None and _number(row.get("test_acc1")) is not None]
        series.append([(float(row[x_key]), 100 * row["test_acc1"]) for row in rows])
        picked = [row for row in rows if basis == "val" and row.get("epoch") == r.best_epoch]
        chosen.append((float(picked[0][x_key]), 100 * picked[0]["test_acc1"]) if picked else None)
    divisor, unit = 1.0, ""
    if x_key == "time_s":
        divisor, unit = _time_axis(max((p[0] for pts in series for p in pts), default=0.0))
    cmap = matplotlib.colormaps["tab10" if len(records) <= 10 else "tab20"]
    for i, (pts, label, point) in enumerate(zip(series, labels, chosen)):
        if pts:
            ax.plot([p[0] / divisor for p in pts], [p[1] for p in pts], "o-", markersize=3,
                    color=cmap(i % cmap.N), label=label)
        if point:
            ax.plot([point[0] / divisor], [point[1]], "*", markersize=12, color=cmap(i % cmap.N),
                    markeredgecolor="black", markeredgewidth=0.6)
    how = ("runs ranked on validation; a star marks each run's epoch chosen on validation" if basis == "val"
           else "runs ranked on test: the last epoch's test top-1, no validation split")
    ax.set(xlabel="epoch" if x_key == "epoch" else f"training time ({unit})",
           ylabel="test top-1 accuracy (%)",
           title="Test accuracy against " + ("epoch" if x_key == "epoch" else "training time") + f"\n({how})")
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    # Past a handful of runs the legend would cover the curves: put it beside the axes.
    outside = len(records) > 6
    ax.legend(fontsize=8, loc="upper left" if outside else "lower right",
              bbox_to_anchor=(1.01, 1) if outside else None)
    return _save(fig, out_png)


def _is_log_key(key: str, values: Sequence[Any]) -> bool:
    """Learning-rate-like keys whose values span at least 10x are best read on a log axis."""
    leaf = key.rsplit(".", 1)[-1]
    nums = [_number(v) for v in values]
    if not (leaf.endswith("lr") or leaf == "weight_decay") or any(v is None or v <= 0 for v in nums):
        return False
    return max(nums) / min(nums) >= 10


def _ordered(values: Iterable[Any]) -> list[Any]:
    """Distinct values, sorted when all are numbers, else in first-seen order."""
    distinct = list({json.dumps(v, sort_keys=True): v for v in values}.values())
    if all(_number(v) is not None for v in distinct):
        return sorted(distinct)
    return distinct


def _score_label(basis: str) -> str:
    """The axis label of the figure runs are ranked by: ``final test top-1 (%), ranked on test``."""
    return f"{_BASIS_LABEL[basis]} (%)" + ("" if basis == "val" else f", {RANKED_ON[basis]}")


def _scores_by_value(records: Sequence[RunRecord], key: str, basis: str) -> list[tuple[Any, list[float]]]:
    """Each value of ``key`` with the scores (%, see :func:`selection_basis`) of the runs that used it."""
    return [(v, [100 * r.score(basis) for r in records if r.recipe.get(key) == v])
            for v in _ordered(r.recipe.get(key) for r in records)]


def _sweep_line(ax: Axes, records: Sequence[RunRecord], key: str, basis: str) -> None:
    groups = _scores_by_value(records, key, basis)
    values = [v for v, _ in groups]
    numeric = all(_number(v) is not None for v in values)
    xs = values if numeric else list(range(len(values)))
    means = [sum(accs) / len(accs) for _, accs in groups]
    # Every run as a dot, so repeated seeds (or other swept keys) show their spread; the line
    # joins the means.
    for x, (_, accs) in zip(xs, groups):
        ax.plot([x] * len(accs), accs, "o", color="C0", alpha=0.4, markersize=4)
    ax.plot(xs, means, "o-", color="C0", markersize=6)
    for x, m in zip(xs, means):
        ax.annotate(f"{m:.2f}", (x, m), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    if numeric and _is_log_key(key, values):
        ax.set_xscale("log")
    if not numeric or len(values) <= 8:
        ax.set_xticks(xs, [format_value(v) for v in values])
        ax.minorticks_off()
    ax.set(xlabel=key, ylabel=_score_label(basis))
    ax.margins(y=0.12)  # room for the labels above the top points
    ax.grid(alpha=0.3)


def _sweep_heatmap(
    fig: Figure, ax: Axes, records: Sequence[RunRecord], row_key: str, col_key: str, basis: str
) -> None:
    import numpy as np
    from matplotlib.patches import Rectangle

    rows = _ordered(r.recipe.get(row_key) for r in records)
    cols = _ordered(r.recipe.get(col_key) for r in records)
    grid = np.full((len(rows), len(cols)), np.nan)
    runs = np.zeros_like(grid, dtype=int)
    for i, rv in enumerate(rows):
        for j, cv in enumerate(cols):
            accs = [100 * r.score(basis) for r in records
                    if r.recipe.get(row_key) == rv and r.recipe.get(col_key) == cv]
            if accs:
                grid[i, j], runs[i, j] = sum(accs) / len(accs), len(accs)
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label=_score_label(basis))
    lo, hi = np.nanmin(grid), np.nanmax(grid)
    for i, j in np.ndindex(grid.shape):
        if not np.isnan(grid[i, j]):
            text = f"{grid[i, j]:.2f}" + (f"\n(n={runs[i, j]})" if runs[i, j] > 1 else "")
            # viridis is dark at the low end: white text there, black on the bright cells.
            light = hi > lo and (grid[i, j] - lo) / (hi - lo) > 0.6
            ax.text(j, i, text, ha="center", va="center", fontsize=9, color="black" if light else "white")
    best_i, best_j = np.unravel_index(np.nanargmax(grid), grid.shape)
    ax.add_patch(Rectangle((best_j - 0.5, best_i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
    ax.set_xticks(range(len(cols)), [format_value(v) for v in cols])
    ax.set_yticks(range(len(rows)), [format_value(v) for v in rows])
    ax.set(xlabel=col_key, ylabel=row_key)


def plot_sweep(
    records: Sequence[RunRecord], keys: Sequence[str], out_png: str | Path, *, basis: str | None = None
) -> Path:
    """Accuracy against the swept settings: the best validation top-1 when every run has a
    validation split, else the final test top-1 (:func:`selection_basis`).

    One key: a line over its values. Two keys: a heatmap, rows the first key, columns the
    second. More keys: one line per key, each point the mean over the other keys' values.

    Args:
        records: finished runs.
        keys: flattened recipe keys.
        out_png: where to write the PNG.
        basis: ``val`` or ``final``; default :func:`selection_basis` of ``records``. The title
            says which (:data:`RANKED_ON`).

    Returns:
        ``out_png``.
    """
    basis = basis or selection_basis(records)
    records = [r for r in records if r.score(basis) is not None]
    if len(keys) == 2:
        fig = _figure(7, 5.5)
        ax = fig.subplots()
        _sweep_heatmap(fig, ax, records, keys[0], keys[1], basis)
    else:
        ncols = min(3, len(keys))
        nrows = math.ceil(len(keys) / ncols)
        fig = _figure(5 * ncols, 4 * nrows)
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, key in zip(axes, keys):
            _sweep_line(ax, records, key, basis)
        for ax in axes[len(keys):]:
            ax.set_visible(False)
    box = ", red box: the best cell" if len(keys) == 2 else ""
    fig.suptitle(f"{_BASIS_LABEL[basis].capitalize()} over {len(records)} runs, {RANKED_ON[basis]}{box}\n"
                 "(one seed each unless repeated)")
    return _save(fig, out_png)


def training_state_mb(record: RunRecord) -> float | None:
    """Memory that grows with what trains: the trainable weights' fp32 gradients plus the
    optimizer's state (``optimizer_state_mb``). Measured the same way on every device."""
    optimizer = _number(record.summary.get("optimizer_state_mb"))
    if optimizer is None or record.params_trainable is None:
        return None
    return optimizer + 4 * record.params_trainable / 2**20


def plot_tradeoff(records: Sequence[RunRecord], out_png: str | Path, *, basis: str | None = None) -> Path:
    """What each way of fine-tuning costs for what it gets: accuracy against trainable parameters
    (log scale), training time, and training-state memory (gradients + optimizer state; log scale).

    Runs with the same name (one variant trained with several seeds, from several experiments)
    are one point at their mean, with a bar over their range; points are labelled with the name.
    The accuracy is the one runs are ranked by (``basis``, default :func:`selection_basis`), and
    the title says which (:data:`RANKED_ON`).
    """
    basis = basis or selection_basis(records)
    groups: dict[str, list[RunRecord]] = {}
    for r in records:
        if r.score(basis) is not None:
            groups.setdefault(r.name, []).append(r)
    fig = _figure(16, 5)
    axes = fig.subplots(1, 3)
    xs = (("params_trainable", "trainable parameters", True), ("train_time_s", "training time (s)", False),
          ("state", "gradients + optimizer state (MB)", True))
    modes = sorted({str(r.recipe.get("train.mode")) for rs in groups.values() for r in rs})
    colours = {mode: f"C{i % 10}" for i, mode in enumerate(modes)}
    for ax, (key, label, log) in zip(axes, xs):
        for name, rs in groups.items():
            values = [training_state_mb(r) if key == "state" else getattr(r, key) for r in rs]
            if any(v is None for v in values):
                continue
            accs = [100 * r.score(basis) for r in rs]
            x, y = sum(values) / len(values), sum(accs) / len(accs)
            mode = str(rs[0].recipe.get("train.mode"))
            ax.errorbar([x], [y], yerr=[[y - min(accs)], [max(accs) - y]], fmt="o", color=colours[mode],
                        markersize=7, capsize=3)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set(xlabel=label, ylabel=_score_label(basis))
        if log:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.margins(x=0.15, y=0.1)
    handles = [axes[0].plot([], [], "o", color=c, label=m)[0] for m, c in colours.items()]
    axes[0].legend(handles=handles, title="train.mode", fontsize=8, loc="upper left")
    seeds = max(len(rs) for rs in groups.values()) if groups else 0
    fig.suptitle(f"{_BASIS_LABEL[basis].capitalize()} against cost, per fine-tuning mode, {RANKED_ON[basis]} "
                 f"({seeds} run(s) per point: mean, bar over the range)")
    return _save(fig, out_png)


# ---------------------------------------------------------------------------------------------
# The report.
# ---------------------------------------------------------------------------------------------


def write_report(
    run_dirs: Iterable[str | Path],
    out_dir: str | Path,
    *,
    title: str | None = None,
    sweep_keys: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Compare runs: a Markdown and a CSV table, accuracy curves and, for a sweep, its plot.

    Failed and missing runs get a table row with their status and error and are left out of
    the plots.

    Args:
        run_dirs: run directories, in the order of the table rows.
        out_dir: folder for the report files; created if needed.
        title: heading of ``report.md``.
        sweep_keys: flattened recipe keys that were swept (``["optim.lr", "data.batch_size"]``);
            they head the table's settings columns and get ``sweep.png``.

    Returns:
        The files written, by kind: ``markdown``, ``csv``, and, when any run has epochs to
        plot, ``acc_vs_epoch`` and ``acc_vs_time``, ``sweep`` when ``sweep_keys`` is given
        and a run finished, and ``tradeoff`` when finished runs differ in ``train.mode``.

    Raises:
        FinetuneError: no run directories, or a sweep key that no run's recipe has.
    """
    records = [read_run(d) for d in run_dirs]
    if not records:
        raise FinetuneError("No run directories to report on.", "Pass one or more run folders.")
    keys = varied_keys(records)
    sweep_keys = list(sweep_keys or [])
    known = {k for r in records for k in r.recipe}
    unknown = [k for k in sweep_keys if k not in known]
    if unknown:
        raise FinetuneError(
            f"Sweep key(s) {', '.join(unknown)} are in none of the runs' recipes.",
            f"Use dotted recipe keys; these differ across the runs: {', '.join(keys) or 'none'}.",
        )
    # Swept keys first, then whatever else differs (a seed, a changed default).
    keys = sweep_keys + [k for k in keys if k not in sweep_keys]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    basis = selection_basis(records)  # one ranking for the table, the CSV and every plot
    paths: dict[str, Path] = {}
    plotted = [r for r in records if r.ok]
    if plotted:
        labels = _legend_labels(plotted, sweep_keys or keys)
        paths["acc_vs_epoch"] = _plot_accuracy(plotted, labels, out_dir / "acc_vs_epoch.png", "epoch", basis)
        paths["acc_vs_time"] = _plot_accuracy(plotted, labels, out_dir / "acc_vs_time.png", "time_s", basis)
    finished = [r for r in records if r.status == "finished" and r.final_acc1 is not None]
    if sweep_keys and finished:
        paths["sweep"] = plot_sweep(finished, sweep_keys, out_dir / "sweep.png", basis=basis)
    if len({r.recipe.get("train.mode") for r in finished}) > 1:
        paths["tradeoff"] = plot_tradeoff(finished, out_dir / "tradeoff.png", basis=basis)

    paths["csv"] = _write_csv(records, keys, out_dir / "report.csv")
    paths["markdown"] = out_dir / "report.md"
    paths["markdown"].write_text(_markdown(records, keys, title, paths), encoding="utf-8")
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
    lines += ["", f"## Results, {ranked}", "", format_table(records, keys), "", ranking_summary(records), "",
              f"Accuracies are top-1 in percent, from one run (one seed) each unless a seed column says "
              f"otherwise. {how} Time is the run's wall-clock time."]
    if "acc_vs_epoch" in paths:
        lines += ["", f"## Test accuracy ({ranked})", "", "![Test top-1 against epoch](acc_vs_epoch.png)", "",
                  "![Test top-1 against training time](acc_vs_time.png)"]
    if "sweep" in paths:
        lines += ["", f"## Sweep ({ranked})", "",
                  f"![{_BASIS_LABEL[basis].capitalize()} against the swept settings, {ranked}](sweep.png)"]
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
                  if k not in keys and k not in _IGNORED_KEYS and not k.startswith(_IGNORED_PREFIXES)}
        lines += ["", "<details><summary>Settings shared by all runs</summary>", "", "```yaml",
                  *(f"{k}: {format_value(v)}" for k, v in shared.items()), "```", "", "</details>"]
    return "\n".join(lines).rstrip() + "\n"
