"""Run records: a run folder read back (``summary.json``, ``metrics.jsonl``, ``recipe.yaml``) into
a :class:`RunRecord`, and the words every report, table and figure uses for how runs are ranked
(:func:`selection_basis`, :data:`RANKED_ON`).

Runs are ranked honestly: by their best validation accuracy when every run has a validation split
(each run's best epoch was chosen on validation, and its test accuracy is reported at that
epoch), otherwise by the test accuracy after the last epoch, and then everything that shows the
ranking says "ranked on test". The best test accuracy over epochs is selected on the test set
itself; a report gives it only labelled so, and never ranks a run by it.

Imports nothing of finetune but :mod:`finetune.runs.folder`, so the reports of
:mod:`finetune.experiments` and the figures of :mod:`finetune.viz.plots` both read run folders
through it without importing each other.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .folder import PARSE_ERRORS, leads_out, run_status

# Recipe keys that never describe the experiment: labels, and where/how the output is written.
IGNORED_KEYS = ("name", "description")
IGNORED_PREFIXES = ("output.",)
# Statuses whose curves are worth drawing; a failed run's partial curve would look like a result.
_PLOTTED = ("finished", "running")
BASIS_LABEL = {"val": "best val top-1", "final": "final test top-1"}
"""The accuracy runs are ranked by, in words, by :func:`selection_basis`."""
RANKED_ON = {"val": "ranked on validation", "final": "ranked on test"}
"""What every table, plot and summary line says about a report's ranking, by :func:`selection_basis`."""


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
        except (ValueError, RecursionError):  # a cut line; or one nested deeper than the parser recurses
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

    # A file that is a link out of the run folder is another file: never read (folder.check_links).
    try:
        if not leads_out(run_dir, "recipe.yaml"):
            raw_recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
            record.recipe = flatten(raw_recipe) if isinstance(raw_recipe, dict) else {}
    except (*PARSE_ERRORS, yaml.YAMLError):
        pass  # the table then shows no settings for this run; the summary says what happened
    if (run_dir / "metrics.jsonl").is_file() and not leads_out(run_dir, "metrics.jsonl"):
        record.epoch_rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "epoch"]

    _read_summary(record)
    _fill_from_epochs(record)
    return record


def _read_summary(record: RunRecord) -> None:
    """Fill ``record`` from ``summary.json``: status, error, accuracies, times and counts."""
    summary: Any = None
    try:
        if leads_out(record.run_dir, "summary.json"):
            record.status, record.error = "failed", "summary.json is a link out of the run folder (not read)"
        else:
            summary = json.loads((record.run_dir / "summary.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        record.error = "no summary.json (the run never started, or was killed)"
    except RecursionError:
        record.status, record.error = "failed", "unreadable summary.json: nested too deeply"
    except PARSE_ERRORS as err:
        record.status, record.error = "failed", f"unreadable summary.json: {err}"
    if summary is not None and not isinstance(summary, dict):
        record.status, record.error = "failed", "unreadable summary.json: not a JSON object"
    elif isinstance(summary, dict):
        record.summary = summary
        record.status = str(summary.get("status") or "finished")
        if record.status == "running" and run_status(record.run_dir) == "interrupted":
            record.status = "interrupted"
            record.error = (f"its process stopped without a word (killed?); continue it with "
                            f"`finetune resume {record.run_dir}`")
        record.error = summary.get("error") or record.error
        for name in ("best_val_acc1", "best_test_acc1", "final_acc1", "final_acc5", "peak_test_acc1",
                     "wall_time_s", "train_time_s", "images_per_s", "peak_memory_mb"):
            setattr(record, name, number(summary.get(name)))
        for name in ("best_epoch", "epochs", "params_trainable", "params_total"):
            value = number(summary.get(name))
            setattr(record, name, None if value is None else int(value))


def _fill_from_epochs(record: RunRecord) -> None:
    """Name the run, and take from its epoch lines what ``summary.json`` did not say."""
    record.name = str(record.summary.get("name") or record.recipe.get("name") or record.run_dir.name)
    tested = [r for r in record.epoch_rows if number(r.get("test_acc1")) is not None]
    validated = [r for r in tested if number(r.get("val_acc1")) is not None]
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
    if record.epochs is None and number(record.recipe.get("train.epochs")) is not None:
        record.epochs = int(record.recipe["train.epochs"])


def varied_keys(records: Sequence[RunRecord]) -> list[str]:
    """The flattened recipe keys whose values differ across runs, in recipe order.

    ``name``, ``description`` and ``output.*`` are ignored. Runs without a readable recipe are
    left out, so that one broken run does not make every key look varied. A key that only some
    recipes have counts as varied, unless the others, written before the key existed, would have
    had its default (``train.time_budget: null`` against a recipe without it is no difference).
    """
    recipes = [r.recipe for r in records if r.recipe]
    defaults = _schema_defaults()
    keys: dict[str, None] = {}  # ordered set: first-seen order keeps model/train/optim/... order
    for recipe in recipes:
        keys.update(dict.fromkeys(recipe))
    return [
        key for key in keys
        if key not in IGNORED_KEYS and not key.startswith(IGNORED_PREFIXES)
        and len({json.dumps(r.get(key, defaults.get(key, "<absent>")), sort_keys=True) for r in recipes}) > 1
    ]


@functools.cache
def _schema_defaults() -> dict[str, Any]:
    """Every recipe key's default, flattened (``{"train.time_budget": None, ...}``)."""
    from ..recipe import Recipe
    from ..recipe.loading import recipe_to_dict

    return flatten(recipe_to_dict(Recipe.model_construct()))


def number(value: Any) -> float | None:
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


def training_state_mb(record: RunRecord) -> float | None:
    """Memory that grows with what trains: the trainable weights' fp32 gradients plus the
    optimizer's state (``optimizer_state_mb``). Measured the same way on every device."""
    optimizer = number(record.summary.get("optimizer_state_mb"))
    if optimizer is None or record.params_trainable is None:
        return None
    return optimizer + 4 * record.params_trainable / 2**20
