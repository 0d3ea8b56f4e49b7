"""Figures drawn with matplotlib: a run's loss and accuracy curves (:func:`plot_curves`) and
confusion matrix (:func:`plot_confusion`), and the figures of a comparison report: test accuracy
of many runs against epoch or training time (:func:`plot_accuracy`), accuracy against swept
settings (:func:`plot_sweep`) and against what each way of fine-tuning costs
(:func:`plot_tradeoff`); with the figure and save helpers the other pictures of :mod:`finetune.viz`
use.

Figures are built with ``matplotlib.figure.Figure`` and saved through the Agg canvas instead of
``pyplot``: no backend is switched (a notebook keeps its own), no global figure list can leak
memory over a long sweep, and importing this module does not import matplotlib at all. Each
figure's titles are also written into its PNG's text chunks (:func:`save_figure`), so a reader can
tell how a figure ranked its runs without looking at it.

Comparison figures draw :class:`~finetune.runs.records.RunRecord` objects and title them
with that module's ranking words.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..runs.records import (
    BASIS_LABEL,
    RANKED_ON,
    RunRecord,
    format_value,
    number,
    read_metrics,
    selection_basis,
    training_state_mb,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def new_figure(width: float, height: float) -> Figure:
    """An empty figure of ``width`` x ``height`` inches with the constrained layout."""
    from matplotlib.figure import Figure  # lazily: importing this module stays light

    return Figure(figsize=(width, height), layout="constrained")


def figure_titles(fig: Figure) -> list[str]:
    """The figure's title and its axes' titles and y labels, in drawing order, empty ones left out."""
    texts = [fig.get_suptitle()]
    for ax in fig.axes:
        texts += [ax.get_title(), ax.get_ylabel()]
    return [t for t in texts if t]


def save_figure(fig: Figure, out_png: str | Path) -> Path:
    """Write ``fig`` to ``out_png`` (its folder made if needed) at 120 dpi, titles in the PNG's text."""
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    # The titles go into the PNG's text chunks too, so a reader (or a test) can tell how a figure
    # ranked its runs without looking at it: PIL's Image.open(path).text["Title"].
    titles = figure_titles(fig)
    metadata = {"Title": titles[0], "Description": " | ".join(titles)} if titles else {}
    fig.savefig(out_png, dpi=120, metadata=metadata)  # a pyplot-free Figure is freed with its last reference
    return out_png


# ---------------------------------------------------------------------------------------------
# One run: loss and accuracy curves, confusion matrix.
# ---------------------------------------------------------------------------------------------


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

    Left: the training loss per logged step (faint) and smoothed, its mean per epoch, and the test
    loss per epoch.
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
    steps = [r for r in rows if r.get("kind") == "step" and number(r.get("loss")) is not None]
    epochs = [r for r in rows if r.get("kind") == "epoch"]

    fig = new_figure(11, 4.2)
    loss_ax, acc_ax = fig.subplots(1, 2)
    if steps:
        xs, losses = _step_epochs(steps, epochs), [float(r["loss"]) for r in steps]
        loss_ax.plot(xs, losses, color="C0", alpha=0.25, linewidth=0.8)
        loss_ax.plot(xs, _smooth(losses), color="C0", label="train (smoothed)")
    for ax, key, label, color in (
        # The epoch's mean training loss is in every epoch line: drawn even when an epoch has fewer
        # steps than train.log_every, so that no step line was written.
        (loss_ax, "train_loss", "train (epoch mean)", "C0"),
        (loss_ax, "test_loss", "test", "C1"),
        (acc_ax, "test_acc1", "test", "C1"),
        (acc_ax, "val_acc1", "validation", "C2"),
        (acc_ax, "train_acc1", "train", "C0"),
    ):
        points = [(r["epoch"], r[key]) for r in epochs if number(r.get(key)) is not None]
        if points:
            scale = 100 if ax is acc_ax else 1
            ax.plot([p[0] for p in points], [scale * p[1] for p in points], "o-", color=color,
                    label=label, markersize=4)
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    acc_ax.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="Accuracy")
    from matplotlib.ticker import MaxNLocator

    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.set_xlim(left=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers: no 0.25 ticks
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        fig.suptitle(title)
    return save_figure(fig, out_png)


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

    counts, values, names = _confusion_values(matrix, classes, normalize)
    n = counts.shape[0]
    side = min(12.0, max(5.0, 0.55 * n + 2.5))
    fig = new_figure(side + 1.2, side)
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
    return save_figure(fig, out_png)


def _confusion_values(
    matrix: Sequence[Sequence[float]], classes: Sequence[str] | None, normalize: bool
) -> tuple[Any, Any, list[str]]:
    """The ``(C, C)`` counts as floats, the values to show (row percentages when ``normalize``) and
    the class names; a matrix that is not square, or names that do not match it, raise ValueError."""
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
    return counts, values, names


# ---------------------------------------------------------------------------------------------
# Many runs: accuracy against epoch or time, sweeps, cost trade-offs.
# ---------------------------------------------------------------------------------------------


def _time_axis(max_seconds: float) -> tuple[float, str]:
    """Divisor and unit that keep time-axis ticks readable."""
    if max_seconds < 120:
        return 1.0, "s"
    if max_seconds < 7200:
        return 60.0, "min"
    return 3600.0, "h"


def plot_accuracy(
    records: Sequence[RunRecord], labels: Sequence[str], out_png: Path, x_key: str, basis: str
) -> Path:
    """Test top-1 of each run against ``epoch`` or ``time_s``, one line per run.

    With ``basis`` ``val`` a star marks each run's epoch chosen on validation, the test top-1 the
    report gives for it; with ``final`` the title says the runs are ranked on test.
    """
    import matplotlib

    fig = new_figure(8, 5)
    ax = fig.subplots()
    series, chosen = [], []
    for r in records:
        rows = [row for row in r.epoch_rows
                if number(row.get(x_key)) is not None and number(row.get("test_acc1")) is not None]
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
    return save_figure(fig, out_png)


def _is_log_key(key: str, values: Sequence[Any]) -> bool:
    """Learning-rate-like keys whose values span at least 10x are best read on a log axis."""
    leaf = key.rsplit(".", 1)[-1]
    nums = [number(v) for v in values]
    if not (leaf.endswith("lr") or leaf == "weight_decay") or any(v is None or v <= 0 for v in nums):
        return False
    return max(nums) / min(nums) >= 10


def _ordered(values: Iterable[Any]) -> list[Any]:
    """Distinct values, sorted when all are numbers, else in first-seen order."""
    distinct = list({json.dumps(v, sort_keys=True): v for v in values}.values())
    if all(number(v) is not None for v in distinct):
        return sorted(distinct)
    return distinct


def _score_label(basis: str) -> str:
    """The axis label of the figure runs are ranked by: ``final test top-1 (%), ranked on test``."""
    return f"{BASIS_LABEL[basis]} (%)" + ("" if basis == "val" else f", {RANKED_ON[basis]}")


def _scores_by_value(records: Sequence[RunRecord], key: str, basis: str) -> list[tuple[Any, list[float]]]:
    """Each value of ``key`` with the scores (%, see :func:`selection_basis`) of the runs that used it."""
    return [(v, [100 * r.score(basis) for r in records if r.recipe.get(key) == v])
            for v in _ordered(r.recipe.get(key) for r in records)]


def _sweep_line(ax: Axes, records: Sequence[RunRecord], key: str, basis: str) -> None:
    groups = _scores_by_value(records, key, basis)
    values = [v for v, _ in groups]
    numeric = all(number(v) is not None for v in values)
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
        fig = new_figure(7, 5.5)
        ax = fig.subplots()
        _sweep_heatmap(fig, ax, records, keys[0], keys[1], basis)
    else:
        ncols = min(3, len(keys))
        nrows = math.ceil(len(keys) / ncols)
        fig = new_figure(5 * ncols, 4 * nrows)
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, key in zip(axes, keys):
            _sweep_line(ax, records, key, basis)
        for ax in axes[len(keys):]:
            ax.set_visible(False)
    box = ", red box: the best cell" if len(keys) == 2 else ""
    fig.suptitle(f"{BASIS_LABEL[basis].capitalize()} over {len(records)} runs, {RANKED_ON[basis]}{box}\n"
                 "(one seed each unless repeated)")
    return save_figure(fig, out_png)


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
    fig = new_figure(16, 5)
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
    fig.suptitle(f"{BASIS_LABEL[basis].capitalize()} against cost, per fine-tuning mode, {RANKED_ON[basis]} "
                 f"({seeds} run(s) per point: mean, bar over the range)")
    return save_figure(fig, out_png)
