"""A study's figure (:func:`plot_study`): accuracy against a grid axis (labelled training images,
typically) per variant, with the spread over seeds, beside the training time each point cost.

It draws series already grouped and scored by :mod:`finetune.experiments.study_report`; like
:mod:`.plots`, importing it does not import matplotlib.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..runs.records import RANKED_ON, format_value, number
from .plots import new_figure, save_figure

_X_LABELS = {"data.train_subset": "labelled training images"}


def plot_study(
    series: dict[str, Sequence[tuple[Any, Sequence[float], float | None]]],
    x_key: str,
    out_png: str | Path,
    *,
    basis: str,
    seeds: str,
) -> Path:
    """Two panels: the score against ``x_key`` per series (the mean as a line, each seed as a dot,
    a bar over +-1 standard deviation), and the training time of the fastest seed against ``x_key``.

    Args:
        series: label -> ``(x value, scores in %, training time in s or None)`` per point.
        x_key: the dotted recipe key along the x-axis; numbers spanning 10x or more get a log axis.
        out_png: where to write the PNG.
        basis: ``val`` (scores are test top-1 at the epoch chosen on validation) or ``final``
            (test top-1 after the last epoch, ranked on test): the title says which.
        seeds: how many seeds the points rest on, in words (``"3 seeds"``, ``"1 to 3 seeds (of 3 asked)"``),
            for the title.
    """
    fig = new_figure(13, 5)
    acc_ax, time_ax = fig.subplots(1, 2)
    xs = [x for points in series.values() for x, _, _ in points]
    numeric = all(number(x) is not None for x in xs)
    order = {format_value(x): i for i, x in enumerate(sorted(set(xs)) if numeric else dict.fromkeys(xs))}
    for i, (label, points) in enumerate(series.items()):
        colour = f"C{i % 10}"
        pts = sorted(points, key=lambda p: order[format_value(p[0])])
        pos = [p[0] if numeric else order[format_value(p[0])] for p in pts]
        means = [statistics.fmean(s) for _, s, _ in pts]
        stds = [statistics.stdev(s) if len(s) > 1 else 0.0 for _, s, _ in pts]
        acc_ax.errorbar(pos, means, yerr=stds, fmt="-o", color=colour, capsize=3, markersize=4, label=label)
        for x, (_, scores, _) in zip(pos, pts):
            acc_ax.plot([x] * len(scores), scores, ".", color=colour, alpha=0.35, markersize=4)
        timed = [(x, t) for x, (_, _, t) in zip(pos, pts) if t is not None]
        if timed:
            time_ax.plot(*zip(*timed), "-o", color=colour, markersize=4, label=label)
    x_label = _X_LABELS.get(x_key, x_key)
    score = ("test top-1 at the epoch chosen on validation (%)" if basis == "val"
             else f"final test top-1 (%), {RANKED_ON[basis]}")
    for ax in (acc_ax, time_ax):
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
        if numeric and min(xs) > 0 and max(xs) / min(xs) >= 10:
            ax.set_xscale("log")
            ax.set_xticks(sorted(set(xs)), [format_value(x) for x in sorted(set(xs))])
        elif not numeric:
            ax.set_xticks(list(order.values()), list(order))
    acc_ax.set(ylabel=score, title=f"Accuracy against {x_label}")
    time_ax.set(ylabel="training time per run (s, fastest seed)", title="What each point cost")
    acc_ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Study: mean of {seeds} per point, bars +-1 std, dots single seeds; {RANKED_ON[basis]}")
    return save_figure(fig, out_png)
