"""A study's report (an experiment with a ``grid``, :mod:`.grid`): the runs of each variant at each
grid point averaged over their seeds, as a table (``study.md``, ``study.csv``, and the table
``finetune compare`` prints) and as ``study.png``, accuracy against the grid's first axis with
the spread over seeds.

Each run is scored as the report ranks it (:func:`~finetune.runs.records.selection_basis`): with
a validation split in every run, the test top-1 at the epoch chosen on validation; otherwise the
test top-1 after the last epoch, and everything says "ranked on test". Runs that did not finish
count as missing seeds, never as zeros.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..snapshot import write_text_atomically
from ..runs.records import RANKED_ON, RunRecord, format_value, number, selection_basis, training_state_mb
from ..viz.plots import plot_tradeoff
from ..viz.study import plot_study
from .grid import REPEAT_KEYS, Study


@dataclass
class StudyCell:
    """One variant at one grid point (seeds aside), and its finished runs.

    Attributes:
        variant: the variant's name.
        point: the grid point without the repeat axes (``{"data.train_subset": 250}``).
        runs: every run of this variant at this point, finished or not.
        scored: the finished runs with a score, in run order.
    """

    variant: str
    point: dict[str, Any]
    runs: list[RunRecord]
    scored: list[RunRecord]


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the values given (``None``: none, or fewer than two)."""
    kept = [v for v in values if v is not None]
    if not kept:
        return None, None
    return statistics.fmean(kept), (statistics.stdev(kept) if len(kept) > 1 else None)


def _score(record: RunRecord, basis: str) -> float | None:
    """The accuracy a study reports for one run: test top-1 at the epoch chosen on validation, or
    after the last epoch when the runs are ranked on test."""
    return record.best_test_acc1 if basis == "val" else record.final_acc1


def study_cells(records: Sequence[RunRecord], study: Study, basis: str) -> list[StudyCell]:
    """Group runs by variant and grid point (every axis but the repeats), in the study's order."""
    by_dir = {r.run_dir.name: r for r in records}
    cells: dict[str, StudyCell] = {}
    for name, (variant, point) in study.runs.items():
        record = by_dir.get(name)
        if record is None:
            continue
        fixed = {k: v for k, v in point.items() if k not in REPEAT_KEYS}
        key = json.dumps([variant, fixed], sort_keys=True, default=str)
        cell = cells.setdefault(key, StudyCell(variant, fixed, [], []))
        cell.runs.append(record)
        if record.status == "finished" and _score(record, basis) is not None:
            cell.scored.append(record)
    return list(cells.values())


def _pct(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{100 * mean:.2f}" + ("" if std is None else f" ± {100 * std:.2f}")


def _seconds(mean: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.1f} s" if mean < 10 else (f"{mean:.0f} s" if mean < 600 else f"{mean / 60:.1f} min")


def _columns(study: Study) -> list[str]:
    return [k for k, _ in study.axes if k not in REPEAT_KEYS]


def format_study_table(cells: Sequence[StudyCell], study: Study, basis: str) -> str:
    """The study in Markdown: one row per variant and grid point, mean ± std over seeds."""
    score = "test top-1 at best val (%)" if basis == "val" else f"final test top-1 (%, {RANKED_ON[basis]})"
    keys = _columns(study)
    header = ["variant", *keys, "seeds", score, "best val top-1 (%)", "training time", "trainable params",
              "grad + optimizer state (MB)"]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join([" --- "] * (1 + len(keys)) + [" ---: "] * (len(header) - 1 - len(keys))) + "|"]
    for c in cells:
        trainable = sorted({r.params_trainable for r in c.scored if r.params_trainable is not None})
        state = mean_std([training_state_mb(r) for r in c.scored])[0]
        lines.append("| " + " | ".join([
            c.variant, *(format_value(c.point.get(k)) for k in keys), f"{len(c.scored)}/{len(c.runs)}",
            _pct(*mean_std([_score(r, basis) for r in c.scored])),
            _pct(*mean_std([r.best_val_acc1 for r in c.scored])) if basis == "val" else "-",
            _seconds(mean_std([r.train_time_s for r in c.scored])[0]),
            ", ".join(f"{n:,}" for n in trainable) or "-",
            "-" if state is None else f"{state:.2f}",
        ]) + " |")
    return "\n".join(lines)


def _write_csv(cells: Sequence[StudyCell], study: Study, basis: str, path: Path) -> Path:
    keys = _columns(study)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", *keys, "seeds_finished", "seeds", "ranked_on", "score_mean_pct", "score_std_pct",
                         "best_val_mean_pct", "best_val_std_pct", "train_time_mean_s", "params_trainable",
                         "training_state_mb", "scores_pct", "train_times_s"])
        for c in cells:
            scores = [_score(r, basis) for r in c.scored]
            (mean, std), (val, val_std) = mean_std(scores), mean_std([r.best_val_acc1 for r in c.scored])
            trainable = {r.params_trainable for r in c.scored}
            writer.writerow([
                c.variant, *(format_value(c.point.get(k)) for k in keys), len(c.scored), len(c.runs),
                RANKED_ON[basis].removeprefix("ranked on "), *(_round(v) for v in (mean, std, val, val_std)),
                mean_std([r.train_time_s for r in c.scored])[0], trainable.pop() if len(trainable) == 1 else None,
                mean_std([training_state_mb(r) for r in c.scored])[0], " ".join(f"{100 * s:.2f}" for s in scores),
                " ".join("-" if r.train_time_s is None else f"{r.train_time_s:.1f}" for r in c.scored),
            ])
    return path


def _round(fraction: float | None) -> float | None:
    return None if fraction is None else round(100 * fraction, 4)


def study_table(records: Sequence[RunRecord], study: Study) -> str:
    """The study table (Markdown) and a line saying how runs were scored: what ``compare`` prints."""
    basis = _basis(records, study)
    cells = study_cells(records, study, basis)
    return format_study_table(cells, study, basis) + "\n\n" + _how(cells, basis)


def _basis(records: Sequence[RunRecord], study: Study) -> str:
    return selection_basis([r for r in records if r.run_dir.name in study.runs])


def seed_words(cells: Sequence[StudyCell]) -> str:
    """How many seeds the shown points rest on, as finished: "3 seeds", or "1 to 3 seeds (of 3 asked)"
    while some runs are unfinished. Cells with no finished run are not drawn, so they do not count."""
    asked = max((len(c.runs) for c in cells), default=0)
    done = [len(c.scored) for c in cells if c.scored]
    low, high = (min(done), max(done)) if done else (0, 0)
    if low == high == asked:
        return f"{asked} seed{'s' if asked != 1 else ''}"
    return f"{low} to {high} seeds (of {asked} asked)" if low != high else f"{low} of {asked} seeds asked"


def _how(cells: Sequence[StudyCell], basis: str) -> str:
    return (f"Mean ± standard deviation over {seed_words(cells)} per row (`seeds` counts the finished ones); "
            + ("each run's epoch chosen on validation, test top-1 read at that epoch."
               if basis == "val" else "no validation split in some runs: test top-1 after the last epoch, ranked on test."))


def write_study(records: Sequence[RunRecord], study: Study, out_dir: Path) -> dict[str, Path]:
    """``study.md``, ``study.csv``, ``study.png`` and, at the grid's last point of its x-axis,
    ``study_tradeoff.png`` (accuracy against cost per variant, over the seeds there).

    Returns:
        The files by kind.
    """
    basis = _basis(records, study)
    cells = study_cells(records, study, basis)
    paths = {"study_csv": _write_csv(cells, study, basis, out_dir / "study.csv")}
    x_key = study.x_key
    if x_key is not None and any(c.scored for c in cells):
        paths["study"] = plot_study(_series(cells, study, basis), x_key, out_dir / "study.png", basis=basis,
                                    seeds=seed_words(cells))
        last = _last_x(cells, x_key)
        at_last = [replace(r, name=c.variant) for c in cells if c.point.get(x_key) == last for r in c.scored]
        if len({r.recipe.get("train.mode") for r in at_last}) > 1:
            paths["study_tradeoff"] = plot_tradeoff(at_last, out_dir / "study_tradeoff.png", basis=basis)
    lines = ["# Study: " + ", ".join(f"{k} = {', '.join(map(format_value, v))}" for k, v in study.axes), "",
             format_study_table(cells, study, basis), "", _how(cells, basis)]
    if "study" in paths:
        lines += ["", "![Accuracy against " + x_key + ", per variant](study.png)"]
    if "study_tradeoff" in paths:
        lines += ["", f"![Accuracy against cost at {x_key} = {format_value(last)}](study_tradeoff.png)"]
    paths["study_md"] = out_dir / "study.md"
    write_text_atomically(paths["study_md"], "\n".join(lines) + "\n")
    return paths


def _last_x(cells: Sequence[StudyCell], x_key: str) -> Any:
    values = [c.point.get(x_key) for c in cells if c.scored]
    numeric = [v for v in values if number(v) is not None]
    return max(numeric) if numeric and len(numeric) == len(values) else values[-1]


def _series(cells: Sequence[StudyCell], study: Study, basis: str) -> dict[str, list[tuple[Any, list[float], float | None]]]:
    """Per line of ``study.png`` (a variant, plus any other non-repeat axis): ``(x, scores in %,
    training time in s of the fastest seed)`` per point with at least one finished run. The fastest,
    not the mean: another process on the machine can only slow a run down, and one slowed run
    would move the mean of three far from what the point costs on a machine alone."""
    x_key, others = study.x_key, [k for k in _columns(study) if k != study.x_key]
    series: dict[str, list] = {}
    for c in cells:
        if not c.scored:
            continue
        label = c.variant + "".join(f", {k.rsplit('.', 1)[-1]}={format_value(c.point.get(k))}" for k in others)
        times = [r.train_time_s for r in c.scored if r.train_time_s is not None]
        scores = [100 * s for r in c.scored if (s := _score(r, basis)) is not None and math.isfinite(s)]
        series.setdefault(label, []).append((c.point.get(x_key), scores, min(times) if times else None))
    return series
