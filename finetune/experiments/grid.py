"""Studies: an experiment file's ``grid``, which runs every variant at every point of a grid of
settings (training-set sizes and seeds, typically), names the runs, and remembers which variant and
point each run is (:class:`Study`) so that the report can average over seeds and draw accuracy
against the grid's first axis.

A grid is a mapping of dotted recipe keys to their values, in order. A value may carry settings of
its own, applied with it (a small training set needs more epochs than a large one)::

    grid:
      seed: [0, 1, 2]              # the first axis varies slowest: seed 0 finishes first
      data.train_subset:           # labelled training images
        250: {train.epochs: 50}    # settings that come with this value
        5000: {train.epochs: 12}

Each run is one variant at one point, named ``<variant>_<tags>`` (``full_s0_n250``). Its recipe is
the base, the experiment's ``overrides``, the variant's settings, then the point's (each axis's
``key=value`` and its value's settings), then the command-line overrides. Axes named ``seed`` are
repeats: the report gives their mean and spread; the first other axis is the x-axis of
``study.png``.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ExperimentError

REPEAT_KEYS = ("seed",)
"""Grid axes whose runs are repeats of one measurement: averaged, never plotted along an axis."""
_TAGS = {"seed": "s", "data.train_subset": "n"}  # short run-name tags: full_s0_n250
_UNSAFE = re.compile(r"[^A-Za-z0-9.-]+")


@dataclass(frozen=True)
class Study:
    """Which variant and grid point each run of a study is.

    Attributes:
        axes: ``(dotted key, values)`` per grid axis, in the file's order.
        runs: run name -> ``(variant, {dotted key: value})``, in run order.
    """

    axes: list[tuple[str, list[Any]]]
    runs: dict[str, tuple[str, dict[str, Any]]]

    @property
    def x_key(self) -> str | None:
        """The axis the study plots accuracy against: the first one that is not a repeat."""
        return next((k for k, _ in self.axes if k not in REPEAT_KEYS), None)

    @property
    def variants(self) -> list[str]:
        """The variants, in the file's order."""
        return list(dict.fromkeys(v for v, _ in self.runs.values()))

    def to_dict(self) -> dict[str, Any]:
        """The form written into ``experiment.yaml`` (``study:``) and read back by :func:`study_from_dict`."""
        return {
            "grid": {k: list(values) for k, values in self.axes},
            "runs": {name: {"variant": v, "point": dict(point)} for name, (v, point) in self.runs.items()},
        }


def study_from_dict(raw: Any, label: str) -> Study:
    """The ``study:`` block of an ``experiment.yaml``, checked.

    Raises:
        ExperimentError: the block does not have the shape :meth:`Study.to_dict` writes.
    """
    fix = "It is written by finetune compare; delete the study block, or rerun from the experiment file."
    if not isinstance(raw, dict) or not isinstance(raw.get("grid"), dict) or not isinstance(raw.get("runs"), dict):
        raise ExperimentError(f"{label}: `study` must be a mapping with `grid` and `runs`.", fix)
    axes = []
    for key, values in raw["grid"].items():
        if not isinstance(key, str) or not isinstance(values, list) or not values:
            raise ExperimentError(f"{label}: study.grid.{key} must be a non-empty list of values.", fix)
        axes.append((key, values))
    runs = {}
    for name, entry in raw["runs"].items():
        if (not isinstance(entry, dict) or not isinstance(entry.get("variant"), str)
                or not isinstance(entry.get("point"), dict)):
            raise ExperimentError(f"{label}: study.runs.{name} must be a mapping with `variant` and `point`.", fix)
        runs[str(name)] = (entry["variant"], dict(entry["point"]))
    return Study(axes, runs)


def read_grid(spec: Any, label: str) -> list[tuple[str, list[tuple[Any, dict]]]]:
    """The file's ``grid``: ``(dotted key, [(value, settings)])`` per axis, shapes checked.

    The keys and settings are checked against the recipe schema by the caller, which knows which
    keys an experiment reserves.

    Raises:
        ExperimentError: a grid that is not a mapping of keys to a list of values or to a mapping
            of values to settings, or an axis with no value or a value twice.
    """
    example = "Write e.g. `grid: {seed: [0, 1, 2], data.train_subset: {250: {train.epochs: 50}, 5000: null}}`."
    if not isinstance(spec, dict) or not spec:
        raise ExperimentError(f"{label}: `grid` must be a mapping of dotted recipe keys to their values, got {spec!r}.",
                              example)
    axes, problems = [], []
    for key, values in spec.items():
        where = f"{label}: grid.{key}"
        if isinstance(values, list):
            pairs = [(v, {}) for v in values]
        elif isinstance(values, dict):
            pairs = [(v, {} if s is None else s) for v, s in values.items()]
            problems += [f"{where}: the settings of value {v!r} must be a mapping of dotted.key: value, got {s!r}."
                         for v, s in pairs if not isinstance(s, dict)]
        else:
            problems.append(f"{where} must be a list of values or a mapping of values to settings, got {values!r}.")
            continue
        shown = [repr(v) for v, _ in pairs]
        if not pairs:
            problems.append(f"{where} has no values.")
        elif len(set(shown)) < len(shown):
            problems.append(f"{where} lists a value twice.")
        elif any(isinstance(v, (dict, list)) for v, _ in pairs):
            problems.append(f"{where}: values must be single values (numbers, text, true/false, null).")
        axes.append((str(key), pairs))
    if problems:
        raise ExperimentError("\n".join(problems), example)
    return axes


def run_tag(key: str, value: Any) -> str:
    """The part of a run name that says where on an axis it is: ``s0``, ``n250``, ``lr0.001``."""
    label = _TAGS.get(key, key.rsplit(".", 1)[-1])
    text = "null" if value is None else (str(value).lower() if isinstance(value, bool) else f"{value}")
    return label + _UNSAFE.sub("-", text).strip("-")


def expand(
    variants: Sequence[tuple[str, list[tuple[str, str]], str]],
    axes: Sequence[tuple[str, list[tuple[Any, list[tuple[str, str]]]]]],
) -> tuple[list[tuple[str, list[tuple[str, str]], str]], Study]:
    """Every variant at every grid point, the first axis slowest and the variants fastest, so that
    the first seed of every variant finishes before the second starts.

    Args:
        variants: ``(name, [(dotted key, override)], where)`` per variant.
        axes: ``(dotted key, [(value, [(dotted key, override)])])`` per axis: each value with its
            own settings as overrides; the axis's ``key=value`` override is added here.

    Returns:
        The runs in the form of ``variants`` (name ``<variant>_<tags>``), and the :class:`Study`.

    Raises:
        ExperimentError: two runs would get the same name (values that differ only in characters
            a folder name cannot hold).
    """
    from .spec import value_text  # spec imports this module

    runs, layout = [], {}
    for point in itertools.product(*(values for _, values in axes)):
        settings = [pair for (key, _), (value, own) in zip(axes, point)
                    for pair in [(key, f"{key}={value_text(value)}"), *own]]
        tags = "_".join(run_tag(key, value) for (key, _), (value, _) in zip(axes, point))
        coordinates = {key: value for (key, _), (value, _) in zip(axes, point)}
        for name, own, where in variants:
            run = f"{name}_{tags}"
            if run in layout:
                raise ExperimentError(f"grid: two runs would be named {run!r}.",
                                      "Make the grid's values differ in letters or digits, not only in punctuation.")
            layout[run] = (name, coordinates)
            runs.append((run, [*own, *settings], f"{where} at {tags}"))
    return runs, Study([(key, [v for v, _ in values]) for key, values in axes], layout)
