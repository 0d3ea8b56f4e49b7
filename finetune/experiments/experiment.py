"""Experiments: several variants of one recipe, run into one folder and compared in one report.

An experiment file is a base recipe plus named variants, each a set of overrides::

    # finetune compare recipes/compare_cifar.yaml
    description: "Head-only vs full fine-tuning vs a ViT from scratch"
    name: compare_cifar          # experiment folder: output.dir/compare_cifar/, one run folder per variant
    base: deit_tiny_cifar.yaml   # a recipe file (relative to this file, or a shipped name) or an inline mapping
    overrides:                   # applied to every variant, before the variant's own settings
      - data.train_subset=10000
    sweep_keys: []               # optional: recipe keys to plot accuracy against (sweep.png)
    val_split: 0.1               # optional: held out for validation where a variant leaves data.val_split at 0
    variants:                    # one run per variant, in this order
      head: {train.mode: head}
      full: {}                   # the base as it is
      scratch: {train.mode: scratch, model.source: null, model.arch: vit_cifar_s, model.img_size: 32}

A variant's settings are dotted keys (``optim.lr: 1.0e-3``) or nested sections (``optim: {lr: ...}``).
Each variant's recipe is: the base, then ``overrides``, then the variant's settings, then the
command-line overrides; every variant is validated before anything runs. All variants share the
base's seed, and so its data split, unless a variant sets ``seed`` itself.

Experiments choose on validation, never on test, unless told to. A variant whose recipe leaves
``data.val_split`` at 0 (every shipped recipe does) and that nothing in the experiment sets
``data.val_split`` for gets the experiment's ``val_split`` (default :data:`DEFAULT_VAL_SPLIT`, 10%
of the train set: 5,000 CIFAR images), the same seeded images for every variant, written into its
recipe like any other setting. The report then ranks runs by their best validation top-1 and gives
test top-1 at that epoch. To rank on test, say so: ``val_split: 0`` in the experiment file, or the
override ``data.val_split=0``; every table and plot of the report then says "ranked on test".

The experiment owns three recipe keys: ``name`` (the variant's name), ``output.dir`` (the experiment
folder) and ``output.overwrite``. Re-running an experiment reuses every run that finished with the
same recipe, resumes interrupted or failed runs from their last checkpoint (when their recipe is
unchanged), replaces the other unfinished ones, and refuses to touch a finished run whose recipe
differs or a run that another process is training: a base recipe's ``output.overwrite: true`` is
ignored, so a result is never replaced by accident.

The experiment folder holds one run folder per variant, ``experiment.yaml`` (every variant's complete
recipe; ``finetune compare`` reads it back) and the report (``report.md``, ``report.csv``, plots).
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
import re
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from rich.console import Console

from ..runs import run as train
from ..errors import DivergedError, ExperimentError, FinetuneError

# The recipe module's YAML dialect and nearest-key suggestion, so experiment files read, look
# and complain like recipes.
from ..recipe import (
    Recipe,
    RecipeError,
    parse_yaml,
    read_yaml_file,
    RecipeDumper,
    suggest_key,
    apply_overrides,
    computed_settings,
    dump_recipe_yaml,
    find_recipe,
    load_recipe,
    recipe_from_dict,
    recipe_to_dict,
    valid_keys,
)
from .report import flatten, format_table, ranking_summary, read_run, varied_keys, write_report
from ..runs.folder import CHECKPOINT, is_run_folder, lock_held, run_dir_for, run_status, strict_json, write_marker
from ..snapshot import write_text_atomically

console = Console(stderr=True)

EXPERIMENT_FILE = "experiment.yaml"
"""Name of the resolved experiment written into the experiment folder."""

_FILE_KEYS = ("description", "name", "base", "overrides", "sweep_keys", "val_split", "variants")
DEFAULT_VAL_SPLIT = 0.1
"""Validation hold-out an experiment gives a variant that has none: 10% of the train set (5,000
CIFAR images), taken from the end of the seeded permutation that also picks ``data.train_subset``."""
_VAL_KEY = "data.val_split"
# Keys the experiment sets itself; the value says what to do instead.
_RESERVED = {
    "name": "the variant's name is the run name; rename the variant, or give the experiment another name",
    "output.dir": "runs go to output.dir/<experiment name>/<variant>; set output.dir for the whole "
    "experiment (in the base, in `overrides`, or on the command line)",
    "output.overwrite": "an experiment reuses finished runs and replaces unfinished ones by itself; "
    "to retrain finished runs, give the experiment a new name or delete its folder",
}
# Shared and command-line overrides may move the whole experiment (output.dir).
_RESERVED_SHARED = ("name", "output.overwrite")
_FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# Short labels for the keys a sweep varies most, for run names like lr1e-3_bs32.
_KEY_LABELS = {
    "optim.lr": "lr",
    "optim.weight_decay": "wd",
    "data.batch_size": "bs",
    "train.epochs": "ep",
    "train.mode": "mode",
    "data.train_subset": "n",
}


# ---------------------------------------------------------------------------------------------
# The experiment and its results.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Experiment:
    """A validated experiment: named variants, each a complete recipe.

    Attributes:
        name: the experiment folder's name (under the recipes' ``output.dir``).
        description: one line for the report's title.
        variants: ``(variant name, recipe)`` in run order; each recipe's ``name`` is the variant's
            and its ``output.dir`` is the experiment folder.
        sweep_keys: dotted recipe keys to plot accuracy against; empty for a plain comparison.
        source: the experiment file or swept recipe it was made from, for ``experiment.yaml``.
        val_split: the validation hold-out given to variants that had none (0: none given).
    """

    name: str
    description: str
    variants: list[tuple[str, Recipe]]
    sweep_keys: list[str] = field(default_factory=list)
    source: str | None = None
    val_split: int | float = DEFAULT_VAL_SPLIT

    @property
    def dir(self) -> Path:
        """The experiment folder: ``output.dir/<name>``, shared by every variant's recipe."""
        return Path(self.variants[0][1].output.dir).expanduser()

    @property
    def rank_on(self) -> Literal["val", "test"]:
        """``val`` when every variant holds out a validation split, else ``test``.

        The report reads the finished runs and has the last word: a Hugging Face dataset with its own
        validation split validates at ``data.val_split=0`` too.
        """
        return "val" if all(r.data.val_split for _, r in self.variants) else "test"

    def describe_ranking(self) -> str:
        """One line for the plan: what the report will rank on, and each variant's hold-out."""
        splits = {name: r.data.val_split for name, r in self.variants}
        if self.rank_on == "val":
            values = set(map(_value_text, splits.values()))
            held = (f"data.val_split={values.pop()} for every variant" if len(values) == 1
                    else ", ".join(f"{n}: data.val_split={_value_text(v)}" for n, v in splits.items()))
            return f"ranked on validation ({held}); test top-1 is reported at the epoch chosen on validation"
        bare = [n for n, v in splits.items() if not v]
        return (f"ranked on test: no validation split in {', '.join(bare)} (data.val_split=0); every table and "
                f"plot says so. Drop the opt-out to hold out {_value_text(DEFAULT_VAL_SPLIT)} of the train set")


@dataclass(frozen=True)
class PlannedRun:
    """What :func:`run_experiment` will do with one variant.

    Attributes:
        name: the variant's name.
        recipe: its complete recipe.
        run_dir: ``experiment folder / name``.
        action: ``run`` (no folder yet), ``reuse`` (finished with this recipe), ``resume`` (an
            interrupted or failed run of this recipe, from its last checkpoint) or ``replace`` (an
            unfinished run that cannot be resumed: it is moved aside, and deleted once the new run
            finishes).
        reason: why, in words, for ``resume`` and ``replace``.
    """

    name: str
    recipe: Recipe
    run_dir: Path
    action: Literal["run", "reuse", "resume", "replace"]
    reason: str = ""


@dataclass(frozen=True)
class VariantResult:
    """How one variant ended: ``reused``, ``finished``, ``diverged`` or ``failed`` (with ``error``)."""

    name: str
    status: Literal["reused", "finished", "diverged", "failed"]
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


# ---------------------------------------------------------------------------------------------
# Building variants.
# ---------------------------------------------------------------------------------------------


def _value_text(value: Any) -> str:
    """A YAML value as override text that reads back to the same value."""
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    if isinstance(value, str):
        try:
            if parse_yaml(value, "value") == value:
                return value  # plain text reads back unchanged: no quotes (train.mode=head)
        except RecipeError:
            pass
    return json.dumps(value, default=str)  # JSON is YAML: quoted text, [lists], null, true


def _settings_to_overrides(settings: dict, prefix: str = "") -> list[tuple[str, str]]:
    """``{optim.lr: 0.001, data: {batch_size: 64}}`` -> ``[("optim.lr", "optim.lr=0.001"), ...]``."""
    pairs = []
    for key, value in settings.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            pairs += _settings_to_overrides(value, dotted + ".")  # a section written as a mapping
        else:
            pairs.append((dotted, f"{dotted}={_value_text(value)}"))
    return pairs


def _override_key(override: str) -> str:
    return override.partition("=")[0].strip()


def _check_overrides(overrides: Sequence[str], where: str, reserved: Sequence[str]) -> None:
    """Syntax first (the recipe module's own message), then unknown and reserved keys."""
    apply_overrides({}, overrides)  # raises RecipeError for `foo` or `bad key=1`
    _check_keys([_override_key(o) for o in overrides], where, reserved)


def _key_problem(
    key: str, where: str, reserved: Sequence[str] = tuple(_RESERVED), *, leaf: bool = False
) -> str | None:
    """A message when ``key`` is not a recipe key (a leaf, or a section unless ``leaf``) or is reserved."""
    if key in reserved:
        return f"{where}: {key!r} cannot be set here: {_RESERVED[key]}."
    leaves = valid_keys()
    sections = {k.rsplit(".", i)[0] for k in leaves for i in range(1, k.count(".") + 1)}
    if key not in leaves and (leaf or key not in sections):
        hint = suggest_key(key.split("."))
        return f"{where}: unknown key {key!r}." + (f" Did you mean {hint!r}?" if hint else "")
    return None


def _check_keys(
    keys: Sequence[str], where: str, reserved: Sequence[str] = tuple(_RESERVED), *, leaf: bool = False
) -> None:
    problems = [p for k in keys if (p := _key_problem(k, where, reserved, leaf=leaf))]
    if problems:
        raise ExperimentError("\n".join(problems))


def _read_yaml_mapping(path: Path, what: str) -> dict:
    raw = read_yaml_file(path, what)
    if not isinstance(raw, dict):
        raise ExperimentError(f"{path.name}: the top level must be a mapping of keys, got {type(raw).__name__}.")
    return raw


def _build_variants(
    exp_name: str,
    description: str,
    base: dict,
    base_label: str,
    shared: Sequence[str],
    variants: Sequence[tuple[str, list[tuple[str, str]], str]],
    cli_overrides: Sequence[str],
    val_split: int | float = DEFAULT_VAL_SPLIT,
) -> list[tuple[str, Recipe]]:
    """Validate every variant; raise one error listing every variant that does not validate.

    Args:
        exp_name: the experiment's name (folder under ``output.dir``).
        description: the experiment's description.
        base: the raw base recipe.
        base_label: how messages name the base (its file name).
        shared: overrides applied to every variant before its own settings.
        variants: ``(name, [(dotted key, override)], where)`` per variant; ``where`` names it in messages.
        cli_overrides: overrides applied last, to every variant.
        val_split: the validation hold-out for variants whose recipe leaves ``data.val_split`` at 0
            and whose overrides do not set it (an explicit ``data.val_split=0`` is an opt-out).
    """
    if not _FOLDER_NAME.fullmatch(exp_name):
        raise ExperimentError(
            f"experiment name {exp_name!r} cannot be a folder name.",
            "Use letters, digits, '_', '-' and '.', starting with a letter or digit.",
        )
    problems, built = [], []
    for name, settings, where in variants:
        overrides = [*shared, *(o for _, o in settings), *cli_overrides]
        try:
            recipe = recipe_from_dict(base, base_label, overrides)
            if val_split and not recipe.data.val_split and _VAL_KEY not in map(_override_key, overrides):
                # Left at 0 by the recipe, not chosen by the experiment: hold out the default, so
                # that the report ranks on validation. Written into the recipe, so it shows.
                recipe = recipe_from_dict(base, base_label, [*overrides, f"{_VAL_KEY}={_value_text(val_split)}"])
        except RecipeError as err:
            problems.append(f"{where} does not validate:\n  " + str(err).replace("\n", "\n  "))
            continue
        own_description = any(k == "description" for k, _ in settings) or any(
            _override_key(o) == "description" for o in [*shared, *cli_overrides]
        )
        if not own_description:
            label = f"{exp_name}/{name}"
            recipe = recipe.model_copy(update={"description": f"{label}: {description}" if description else label})
        folder = str(Path(recipe.output.dir) / exp_name)
        output = recipe.output.model_copy(update={"dir": folder, "overwrite": False})
        built.append((name, recipe.model_copy(update={"name": name, "output": output})))
    if problems:
        raise ExperimentError("\n".join(problems))
    return built


def load_experiment(
    path: str | Path, overrides: Sequence[str] = (), *, name: str | None = None
) -> Experiment:
    """Read and validate an experiment file (see the module docstring for its format).

    Args:
        path: the experiment YAML file, or the name of a shipped one (``compare_cifar``).
        overrides: ``dotted.key=value`` items applied last to every variant.
        name: the experiment's name instead of the file's ``name:`` (default: the file's stem).

    Returns:
        The experiment; every variant's recipe is complete and valid.

    Raises:
        ExperimentError: a malformed file, an unknown or reserved key (naming the variant and the
            nearest valid key), or a variant that does not validate.
        RecipeError: a missing file or bad YAML.
    """
    given = Path(path)
    # An experiment folder stands for the experiment.yaml it holds: rerun or extend it in place.
    file = given / EXPERIMENT_FILE if (given / EXPERIMENT_FILE).is_file() else find_recipe(path)
    raw = _read_yaml_mapping(file, "experiment file")
    label = file.name
    unknown = [k for k in raw if k not in _FILE_KEYS]
    if unknown:
        close = [f"{k!r} (did you mean {m[0]!r}?)" if (m := _close(k, _FILE_KEYS)) else repr(k) for k in unknown]
        hint = " A recipe? Run it with `finetune run`." if {"model", "train", "optim", "data"} & set(unknown) else ""
        raise ExperimentError(
            f"{label}: unknown experiment key(s) {', '.join(close)}.",
            f"An experiment file has {', '.join(_FILE_KEYS)}.{hint}",
        )

    base_spec = raw.get("base")
    if base_spec is None:
        base, base_label = {}, f"{label} (no base: schema defaults)"
    elif isinstance(base_spec, dict):
        base, base_label = base_spec, f"{label} (inline base)"
    elif isinstance(base_spec, str):
        relative = file.parent / base_spec
        try:
            base_file = relative if relative.is_file() else find_recipe(base_spec)
        except RecipeError:
            raise ExperimentError(
                f"{label}: base recipe {base_spec!r} not found, neither next to {label} nor among the shipped recipes.",
                "Give a path relative to the experiment file, or a shipped recipe's name (see `finetune ls`).",
            ) from None
        base, base_label = _read_yaml_mapping(base_file, "base recipe"), base_file.name
    else:
        raise ExperimentError(
            f"{label}: base must be a recipe file name or a mapping, got {base_spec!r}.",
            "Write e.g. `base: deit_tiny_cifar.yaml` (relative to this file).",
        )

    shared_spec = raw.get("overrides") or []
    if isinstance(shared_spec, dict):
        shared = [o for _, o in _settings_to_overrides(shared_spec)]
    elif isinstance(shared_spec, list) and all(isinstance(o, str) for o in shared_spec):
        shared = list(shared_spec)
    else:
        raise ExperimentError(
            f"{label}: overrides must be a list of dotted.key=value strings or a mapping, got {shared_spec!r}.",
            "Write e.g. `overrides: [data.train_subset=10000]`.",
        )
    _check_overrides(shared, f"{label}: overrides", _RESERVED_SHARED)
    _check_cli_overrides(overrides)

    spec = raw.get("variants")
    if not isinstance(spec, dict) or not spec:
        raise ExperimentError(
            f"{label}: `variants` must be a mapping of variant names to their settings, got {spec!r}.",
            "Write e.g. `variants: {head: {train.mode: head}, full: {train.mode: full}}`.",
        )
    variants, problems = [], []
    for variant, settings in spec.items():
        if isinstance(variant, int) and not isinstance(variant, bool):
            variant = str(variant)  # `1:` reads as a number; as a folder name it is text
        where = f"{label}: variant {str(variant)!r}"
        if not isinstance(variant, str) or not _FOLDER_NAME.fullmatch(variant):
            problems.append(f"{where}: a variant name becomes a folder; use letters, digits, '_', '-' and '.'.")
            continue
        if settings is None:
            settings = {}  # `baseline:` with nothing after it: the base as it is
        if not isinstance(settings, dict):
            problems.append(f"{where}: expected a mapping of dotted.key: value, got {settings!r}.")
            continue
        pairs = _settings_to_overrides(settings)
        problems += [p for k, _ in pairs if (p := _key_problem(k, where))]
        variants.append((variant, pairs, where))
    if problems:
        raise ExperimentError("\n".join(problems))

    val_split = raw.get("val_split", DEFAULT_VAL_SPLIT)
    if not _is_image_count(val_split):
        raise ExperimentError(
            f"{label}: val_split must be a number of images (int) or a fraction of the train set "
            f"(float in [0, 1)), got {val_split!r}.",
            f"Write e.g. `val_split: {DEFAULT_VAL_SPLIT}` (the default), or `val_split: 0` to hold out nothing "
            "and rank on test.",
        )
    exp_name = str(name or raw.get("name") or file.stem)
    description = str(raw.get("description") or "")
    built = _build_variants(exp_name, description, base, base_label, shared, variants, overrides, val_split)
    if file == given / EXPERIMENT_FILE:
        # Read back from an experiment folder: its runs are where the folder is now, whatever the
        # (possibly relative) output.dir recorded when it was written, and wherever this runs from.
        built = [
            (variant, recipe.model_copy(update={"output": recipe.output.model_copy(update={"dir": str(given)})}))
            for variant, recipe in built
        ]
    sweep_keys = raw.get("sweep_keys") or []
    if not isinstance(sweep_keys, list):
        raise ExperimentError(f"{label}: sweep_keys must be a list of dotted recipe keys, got {sweep_keys!r}.")
    _check_keys([str(k) for k in sweep_keys], f"{label}: sweep_keys", (), leaf=True)
    return Experiment(exp_name, description, built, [str(k) for k in sweep_keys], str(file), val_split)


def _is_image_count(value: Any) -> bool:
    """True for what ``data.val_split`` accepts: an int >= 0, or a float in [0, 1)."""
    if isinstance(value, bool):
        return False
    return (isinstance(value, int) and value >= 0) or (isinstance(value, float) and 0.0 <= value < 1.0)


def _check_cli_overrides(overrides: Sequence[str]) -> None:
    keys = [_override_key(o) for o in overrides]
    if "name" in keys:
        raise ExperimentError(
            "the override 'name=...' cannot rename an experiment's runs: they are named after the variants.",
            "Pass --name NAME to give the experiment (its folder) another name.",
        )
    _check_overrides(overrides, "command-line override", _RESERVED_SHARED)


def _close(word: str, choices: Sequence[str]) -> list[str]:
    return difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)


# ---------------------------------------------------------------------------------------------
# Sweeps.
# ---------------------------------------------------------------------------------------------

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
        problem = _key_problem(key, f"bad --grid {item!r}", leaf=True)
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
    _check_cli_overrides(overrides)
    file = find_recipe(recipe_path)
    base = _read_yaml_mapping(file, "recipe")
    base_recipe = load_recipe(file, overrides)  # the recipe alone must be valid: a clear first error
    override_keys = {_override_key(o) for o in overrides}
    keys = [k for k, _ in parsed]
    both = [k for k in keys if k in override_keys]
    if both:
        raise ExperimentError(
            f"{', '.join(both)} is both swept (--grid) and overridden.", "Drop the override, or the --grid."
        )

    # Type each value against the schema, one key at a time, so a bad value names its --grid.
    typed: list[list[tuple[str, Any]]] = []  # per key: (override, typed value)
    for key, texts in parsed:
        column = []
        for text in texts:
            override = f"{key}={text}"
            try:
                recipe = recipe_from_dict(base, file.name, [*overrides, override])
            except RecipeError as err:
                raise ExperimentError(f"--grid {key}: value {text!r} does not validate:\n  {err}") from None
            value = flatten(recipe_to_dict(recipe)).get(key)
            if any(json.dumps(value) == json.dumps(v) for _, v in column):
                raise ExperimentError(
                    f"--grid {key}: the value {format_run_value(value)} is given twice.", "Give each value once."
                )
            column.append((override, value))
        typed.append(column)

    labels = [_key_label(k, keys) for k in keys]
    variants, names = [], set()
    for point in itertools.product(*typed):
        run_name = "_".join(_name_part(label, format_run_value(v)) for label, (_, v) in zip(labels, point))
        if run_name in names:
            raise ExperimentError(
                f"two grid points get the same run name {run_name!r}.",
                "Use values that differ in their first 6 significant digits.",
            )
        names.add(run_name)
        pairs = [(_override_key(o), o) for o, _ in point]
        variants.append((run_name, pairs, f"grid point {run_name!r}"))

    exp_name = name or f"{base_recipe.name}_sweep_{'_'.join(labels)}"
    description = f"sweep of {', '.join(keys)} over {file.name}"
    # The sweep's overrides go last, after the grid values, like a compare's command-line ones;
    # a key cannot be in both, so the order does not change any value.
    if not _is_image_count(val_split):
        raise ExperimentError(f"val_split must be an int >= 0 or a float in [0, 1), got {val_split!r}.")
    built = _build_variants(exp_name, description, base, file.name, [], variants, overrides, val_split)
    return Experiment(exp_name, description, built, keys, str(file), val_split)


# ---------------------------------------------------------------------------------------------
# Planning: reuse, run or replace.
# ---------------------------------------------------------------------------------------------


def _comparable(recipe: Recipe) -> dict[str, Any]:
    return flatten(computed_settings(recipe))


def plan_experiment(exp: Experiment) -> list[PlannedRun]:
    """Decide for each variant whether to run it, reuse its finished run, resume it or replace its folder.

    Raises:
        ExperimentError: a finished run whose recipe differs from its variant's (listing the
            differing keys), a variant folder that is not a run folder, or a run that another
            process is training; every such variant is named in one message, before anything runs.
    """
    plans, conflicts, val_split_changed = [], [], False
    for name, recipe in exp.variants:
        run_dir = run_dir_for(recipe)
        if not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir())):
            plans.append(PlannedRun(name, recipe, run_dir, "run"))
            continue
        if not is_run_folder(run_dir):
            conflicts.append(f"{run_dir} exists but is not a finetune run folder.")
            continue
        if lock_held(run_dir):
            conflicts.append(f"{run_dir} is being trained by another finetune process right now.")
            continue
        status = run_status(run_dir)
        try:
            recorded = load_recipe(run_dir / "recipe.yaml")
        except RecipeError as err:
            if status != "finished":
                plans.append(PlannedRun(name, recipe, run_dir, "replace", "its recipe.yaml cannot be read back"))
            else:
                conflicts.append(f"{run_dir} finished, but its recipe.yaml cannot be read back: {err}")
            continue
        old, new = _comparable(recorded), _comparable(recipe)
        same = old == new
        if status != "finished":
            if status in ("interrupted", "failed") and same and (run_dir / CHECKPOINT).is_file():
                plans.append(PlannedRun(name, recipe, run_dir, "resume", f"status {status}, from its last checkpoint"))
            else:
                why = f"status {status}" if status else "no readable summary.json"
                if status in ("interrupted", "failed"):
                    why += ", no checkpoint" if same else ", recipe changed"
                plans.append(PlannedRun(name, recipe, run_dir, "replace", why))
            continue
        if not same:
            diffs = [k for k in dict.fromkeys([*new, *old]) if old.get(k, "<absent>") != new.get(k, "<absent>")]
            shown = ", ".join(f"{k}: {_show(old.get(k))} -> {_show(new.get(k))}" for k in diffs[:4])
            more = f" and {len(diffs) - 4} more" if len(diffs) > 4 else ""
            conflicts.append(f"{run_dir} finished with another recipe ({shown}{more}).")
            val_split_changed |= not old.get(_VAL_KEY) and _VAL_KEY in diffs
            continue
        plans.append(PlannedRun(name, recipe, run_dir, "reuse"))
    if conflicts:
        # Runs from before experiments held out a validation split by default differ only there.
        opt_out = (" To reuse runs made without a validation split, add data.val_split=0 (they are then "
                   "ranked on test)." if val_split_changed else "")
        raise ExperimentError(
            f"experiment {exp.name!r}: " + ("\n" if len(conflicts) > 1 else "") + "\n".join(conflicts),
            "finetune never replaces a finished run. Give the experiment a new name (--name NAME), "
            f"or delete {exp.dir} (or just the run folders named) to retrain.{opt_out}",
        )
    return plans


def _show(value: Any) -> str:
    return "absent" if value is None else json.dumps(value)


# ---------------------------------------------------------------------------------------------
# Running.
# ---------------------------------------------------------------------------------------------


def experiment_to_yaml(exp: Experiment) -> str:
    """``experiment.yaml``: every variant's complete recipe, readable by :func:`load_experiment`.

    The variants leave out ``name``, ``output.dir`` and ``output.overwrite`` (the experiment sets
    them) and there is no base, so reading the file back gives the same recipes.
    """
    parent = str(Path(exp.variants[0][1].output.dir).parent)
    variants = {}
    for name, recipe in exp.variants:
        data = recipe_to_dict(recipe)
        del data["name"]
        data["output"] = {k: v for k, v in data["output"].items() if k not in ("dir", "overwrite")}
        variants[name] = data
    doc: dict[str, Any] = {
        "description": exp.description,
        "name": exp.name,
        "overrides": [f"output.dir={_value_text(parent)}"],
    }
    if exp.sweep_keys:
        doc["sweep_keys"] = exp.sweep_keys
    doc["val_split"] = exp.val_split  # each variant's data.val_split below is the one it ran with
    doc["variants"] = variants
    header = (
        f"# Resolved experiment from {exp.source or 'the Python API'}: every variant's complete recipe.\n"
        f"# Rerun (finished runs are reused) with: finetune compare THIS_FILE\n"
    )
    return header + yaml.dump(doc, Dumper=RecipeDumper, sort_keys=False, width=100)


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


def run_experiment(exp: Experiment, *, quiet: bool = False, nproc: int = 1) -> ExperimentResult:
    """Run every variant that has no finished run yet, then write the report.

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
    results = []
    for i, plan in enumerate(plans, start=1):
        prefix = f"[{i}/{len(plans)}] {plan.name}"
        if plan.action == "reuse":
            if not quiet:
                console.print(f"{prefix}: [dim]reusing the finished run in {plan.run_dir}[/]", highlight=False)
            results.append(VariantResult(plan.name, "reused", plan.run_dir))
            continue
        if not quiet:
            again = {"replace": f" (replacing an unfinished run: {plan.reason})",
                     "resume": f" (resuming: {plan.reason})"}.get(plan.action, "")
            console.rule(f"{prefix}{again}", style="dim")
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
            if not quiet:
                if not isinstance(exc, FinetuneError):  # a bug, not a user error: keep the traceback
                    console.print(traceback.format_exc(), style="dim", highlight=False, markup=False)
                console.print(f"[red]{prefix} {status}:[/] {error}", highlight=False)
            results.append(VariantResult(plan.name, status, plan.run_dir, error))
            continue
        results.append(VariantResult(plan.name, "finished", plan.run_dir))

    title = f"{exp.name}: {exp.description}" if exp.description else exp.name
    paths, table = write_experiment_report(
        [r.run_dir for r in results], exp.dir, title=title, sweep_keys=exp.sweep_keys
    )
    return ExperimentResult(exp, results, paths, table)


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


# ---------------------------------------------------------------------------------------------
# Reporting.
# ---------------------------------------------------------------------------------------------


def write_experiment_report(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    title: str | None = None,
    sweep_keys: Sequence[str] | None = None,
) -> tuple[dict[str, Path], str]:
    """:func:`finetune.report.write_report`, plus its comparison table as Markdown text to print.

    Returns:
        The files written by kind, and the table followed by its ranking line (as in ``report.md``):
        ``Ranked on validation: best ...`` or ``Ranked on test (...): best ...``, so that what is
        printed never ranks on test without saying so.
    """
    paths = write_report(run_dirs, out_dir, title=title, sweep_keys=sweep_keys)
    records = [read_run(d) for d in run_dirs]
    swept = list(sweep_keys or [])
    keys = swept + [k for k in varied_keys(records) if k not in swept]  # write_report's column order
    return paths, format_table(records, keys) + "\n\n" + ranking_summary(records)


def read_experiment_folder(folder: str | Path) -> tuple[list[Path], list[str], str]:
    """The run folders, sweep keys and title of an experiment folder, from its ``experiment.yaml``.

    Raises:
        ExperimentError: no readable ``experiment.yaml`` with variants.
    """
    folder = Path(folder)
    raw = _read_yaml_mapping(folder / EXPERIMENT_FILE, "experiment")
    variants = raw.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise ExperimentError(f"{folder / EXPERIMENT_FILE} lists no variants.")
    name, description = str(raw.get("name") or folder.name), str(raw.get("description") or "")
    sweep_keys = [str(k) for k in raw.get("sweep_keys") or []]
    return [folder / str(v) for v in variants], sweep_keys, f"{name}: {description}" if description else name
