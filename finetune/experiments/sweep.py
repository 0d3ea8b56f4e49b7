"""Sweeps: ``finetune sweep``'s ``--grid KEY=V1,V2`` items parsed, typed against the recipe schema
and crossed into an :class:`~.spec.Experiment` whose variants are named after their values
(``lr1e-3_bs32``)."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ExperimentError
from ..recipe import RecipeError, find_recipe, load_recipe, overlaps, recipe_from_dict, recipe_to_dict
from ..runs.records import flatten
from .spec import (
    DEFAULT_VAL_SPLIT,
    Experiment,
    build_variants,
    check_cli_overrides,
    is_image_count,
    key_problem,
    override_key,
    read_yaml_mapping,
)

# Short labels for the keys a sweep varies most, for run names like lr1e-3_bs32.
_KEY_LABELS = {
    "optim.lr": "lr",
    "optim.weight_decay": "wd",
    "data.batch_size": "bs",
    "train.epochs": "ep",
    "train.mode": "mode",
    "data.train_subset": "n",
}

_GRID_EXAMPLE = "--grid optim.lr=1e-3,3e-4 --grid data.batch_size=32,128"


def _split_values(text: str) -> list[str]:
    """Split on commas outside brackets and quotes, so ``[0.5,0.5,0.5],[0.4,0.4,0.4]`` is two values."""
    values, depth, quote, start = [], 0, None, 0
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(text[start:i].strip())
            start = i + 1
    values.append(text[start:].strip())
    return values


def parse_grid(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Parse ``--grid`` items into ``(dotted key, [value texts])``; values are typed later.

    Raises:
        ExperimentError: no ``=``, an empty key or value, a key given twice, an unknown key (with
            the nearest valid key) or a key the experiment sets itself.
    """
    if not items:
        raise ExperimentError("a sweep needs at least one --grid KEY=VALUE1,VALUE2,...", f"For example {_GRID_EXAMPLE}.")
    grid: list[tuple[str, list[str]]] = []
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ExperimentError(
                f"bad --grid {item!r}: expected KEY=VALUE1,VALUE2,...", f"Write a key, '=' and its values: {_GRID_EXAMPLE}."
            )
        values = _split_values(text)
        if not text.strip() or any(v == "" for v in values):
            raise ExperimentError(
                f"bad --grid {item!r}: empty value.", f"Separate the values with single commas: {_GRID_EXAMPLE}."
            )
        if any(key == k for k, _ in grid):
            raise ExperimentError(
                f"--grid {key} is given twice.", f"Give all its values in one --grid: {key}=A,B,C."
            )
        problem = key_problem(key, f"bad --grid {item!r}", leaf=True)
        if problem:
            raise ExperimentError(problem)
        grid.append((key, values))
    return grid


def _name_part(label: str, value: str) -> str:
    """``lr`` + ``1e-3`` -> ``lr1e-3``; ``pos_embed_mode`` + ``crop`` -> ``pos_embed_mode-crop``."""
    return f"{label}{value}" if value[:1].isdigit() or value[:1] in "-." else f"{label}-{value}"


def _key_label(key: str, keys: Sequence[str]) -> str:
    label = _KEY_LABELS.get(key, key.rsplit(".", 1)[-1])
    labels = [_KEY_LABELS.get(k, k.rsplit(".", 1)[-1]) for k in keys]
    return key.replace(".", "-") if labels.count(label) > 1 else label


def format_run_value(value: Any) -> str:
    """A swept value as it appears in a run name: ``0.001 -> 1e-3``, ``0.5 -> 0.5``, ``[1, 2] -> 1-2``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        plain = f"{value:g}"
        mantissa, _, exponent = f"{value:.6e}".partition("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        scientific = f"{mantissa}e{int(exponent)}"
        return scientific if len(scientific) < len(plain) else plain  # 1e-3, 3e-4, 0.01, 0.5
    if isinstance(value, (list, tuple)):
        return "-".join(format_run_value(v) for v in value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(value)).strip("-") or "x"


def sweep_experiment(
    recipe_path: str | Path,
    grid: Sequence[str],
    overrides: Sequence[str] = (),
    name: str | None = None,
    val_split: int | float = DEFAULT_VAL_SPLIT,
) -> Experiment:
    """The Cartesian product of ``--grid`` values over a recipe, as an experiment.

    Values are typed against the recipe schema (``optim.lr=1e-3`` is a float, ``data.train_subset=
    0.5`` a fraction); run names join a short label and the value of each swept key
    (``lr1e-3_bs32``), and the runs go in the order of the grids and their values, the last grid
    varying fastest.

    Args:
        recipe_path: the recipe to sweep, a file or a shipped name.
        grid: items like ``optim.lr=1e-3,3e-4``.
        overrides: ``dotted.key=value`` items applied to every run; a key cannot be both swept and
            overridden.
        name: the experiment's name; default ``<recipe name>_sweep_<labels>`` (``vit_lab_cifar_sweep_lr_bs``).
        val_split: the validation hold-out for grid points whose recipe has none, as in an experiment
            file; the override ``data.val_split=0`` (or 0 here) holds out nothing: the sweep then
            ranks on test, and says so.

    Raises:
        ExperimentError: bad grid syntax, an unknown key, a key both swept and overridden, a value
            given twice, or a grid point whose recipe does not validate.
        RecipeError: a missing recipe, bad YAML or a bad override.
    """
    parsed = parse_grid(grid)
    check_cli_overrides(overrides)
    file = find_recipe(recipe_path)
    base = read_yaml_mapping(file, "recipe")
    base_recipe = load_recipe(file, overrides)  # the recipe alone must be valid: a clear first error
    override_keys = {override_key(o) for o in overrides}
    keys = [k for k, _ in parsed]
    both = [k for k in keys if any(overlaps(k, o) for o in override_keys)]
    if both:
        raise ExperimentError(
            f"{', '.join(both)} is both swept (--grid) and overridden.", "Drop the override, or the --grid."
        )

    typed = _typed_values(parsed, base, file.name, overrides)
    labels = [_key_label(k, keys) for k in keys]
    variants = _grid_variants(typed, labels)

    exp_name = name or f"{base_recipe.name}_sweep_{'_'.join(labels)}"
    description = f"sweep of {', '.join(keys)} over {file.name}"
    # The sweep's overrides go last, after the grid values, like a compare's command-line ones;
    # a key cannot be in both, so the order does not change any value.
    if not is_image_count(val_split):
        raise ExperimentError(f"val_split must be an int >= 0 or a float in [0, 1), got {val_split!r}.")
    built = build_variants(exp_name, description, base, file.name, [], variants, overrides, val_split)
    return Experiment(exp_name, description, built, keys, str(file), val_split)


def _typed_values(
    parsed: list[tuple[str, list[str]]], base: dict, base_label: str, overrides: Sequence[str]
) -> list[list[tuple[str, Any]]]:
    """Per swept key, ``(override, typed value)`` for each of its values: typed against the schema,
    one key at a time, so that a bad value names its --grid."""
    typed: list[list[tuple[str, Any]]] = []
    for key, texts in parsed:
        column = []
        for text in texts:
            override = f"{key}={text}"
            try:
                recipe = recipe_from_dict(base, base_label, [*overrides, override])
            except RecipeError as err:
                raise ExperimentError(f"--grid {key}: value {text!r} does not validate:\n  {err}") from None
            value = flatten(recipe_to_dict(recipe)).get(key)
            if any(json.dumps(value) == json.dumps(v) for _, v in column):
                raise ExperimentError(
                    f"--grid {key}: the value {format_run_value(value)} is given twice.", "Give each value once."
                )
            column.append((override, value))
        typed.append(column)
    return typed


def _grid_variants(
    typed: list[list[tuple[str, Any]]], labels: list[str]
) -> list[tuple[str, list[tuple[str, str]], str]]:
    """One variant per point of the grid, the last key varying fastest, named after its values
    (``lr1e-3_bs32``); two points with the same name are an error."""
    variants, names = [], set()
    for point in itertools.product(*typed):
        run_name = "_".join(_name_part(label, format_run_value(v)) for label, (_, v) in zip(labels, point))
        if run_name in names:
            raise ExperimentError(
                f"two grid points get the same run name {run_name!r}.",
                "Use values that differ in their first 6 significant digits.",
            )
        names.add(run_name)
        pairs = [(override_key(o), o) for o, _ in point]
        variants.append((run_name, pairs, f"grid point {run_name!r}"))
    return variants
