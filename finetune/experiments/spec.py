"""Experiment files: several variants of one recipe, validated into an :class:`Experiment` before
anything runs (:mod:`.sweep` builds one from ``--grid`` values, :mod:`.plan` decides what to do
with each variant, :mod:`.execute` runs them, :mod:`.report` compares them).

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
    grid:                        # optional: a study, every variant at every point (see .grid)
      seed: [0, 1, 2]
      data.train_subset: [1000, 5000]

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
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import ExperimentError
from .grid import Study, expand, read_grid, study_from_dict

# The recipe module's YAML dialect and nearest-key suggestion, so experiment files read, look
# and complain like recipes.
from ..recipe import (
    Recipe,
    RecipeError,
    apply_overrides,
    find_recipe,
    mapping_keys,
    overlaps,
    parse_yaml,
    read_yaml_file,
    recipe_from_dict,
    suggest_key,
    valid_keys,
)

EXPERIMENT_FILE = "experiment.yaml"
"""Name of the resolved experiment written into the experiment folder."""

_FILE_KEYS = ("description", "name", "base", "overrides", "sweep_keys", "val_split", "variants", "grid", "study")
DEFAULT_VAL_SPLIT = 0.1
"""Validation hold-out an experiment gives a variant that has none: 10% of the train set (5,000
CIFAR images), taken from the end of the seeded permutation that also picks ``data.train_subset``."""
VAL_KEY = "data.val_split"
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


# ---------------------------------------------------------------------------------------------
# The experiment.
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
        study: for an experiment with a ``grid``, which variant and grid point each run is
            (:mod:`.grid`); ``variants`` then holds one entry per run.
    """

    name: str
    description: str
    variants: list[tuple[str, Recipe]]
    sweep_keys: list[str] = field(default_factory=list)
    source: str | None = None
    val_split: int | float = DEFAULT_VAL_SPLIT
    study: Study | None = None

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
            values = set(map(value_text, splits.values()))
            held = (f"data.val_split={values.pop()} for every variant" if len(values) == 1
                    else ", ".join(f"{n}: data.val_split={value_text(v)}" for n, v in splits.items()))
            return f"ranked on validation ({held}); test top-1 is reported at the epoch chosen on validation"
        bare = [n for n, v in splits.items() if not v]
        return (f"ranked on test: no validation split in {', '.join(bare)} (data.val_split=0); every table and "
                f"plot says so. Drop the opt-out to hold out {value_text(DEFAULT_VAL_SPLIT)} of the train set")


# ---------------------------------------------------------------------------------------------
# Building variants.
# ---------------------------------------------------------------------------------------------


def value_text(value: Any) -> str:
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
            pairs.append((dotted, f"{dotted}={value_text(value)}"))
    return pairs


def override_key(override: str) -> str:
    return override.partition("=")[0].strip()


def _check_overrides(overrides: Sequence[str], where: str, reserved: Sequence[str]) -> None:
    """Syntax first (the recipe module's own message), then unknown and reserved keys."""
    apply_overrides({}, overrides)  # raises RecipeError for `foo` or `bad key=1`
    _check_keys([override_key(o) for o in overrides], where, reserved)


def key_problem(key: str, where: str, reserved: Sequence[str] = tuple(_RESERVED), *, leaf: bool = False) -> str | None:
    """A message when ``key`` is not a recipe key (a leaf, or a section unless ``leaf``) or is reserved."""
    if key in reserved:
        return f"{where}: {key!r} cannot be set here: {_RESERVED[key]}."
    leaves = valid_keys()
    if leaf and key in mapping_keys():
        return f"{where}: {key!r} is a mapping; sweep one entry of it (e.g. {key}.depth=4,6)."
    if any(key.startswith(f"{m}.") and key[len(m) + 1:].isidentifier() for m in mapping_keys()):
        return None  # an entry of a mapping (model.args.depth): the recipe's validation checks it
    sections = {k.rsplit(".", i)[0] for k in leaves for i in range(1, k.count(".") + 1)}
    if key not in leaves and (leaf or key not in sections):
        hint = suggest_key(key.split("."))
        return f"{where}: unknown key {key!r}." + (f" Did you mean {hint!r}?" if hint else "")
    return None


def _check_keys(
    keys: Sequence[str], where: str, reserved: Sequence[str] = tuple(_RESERVED), *, leaf: bool = False
) -> None:
    problems = [p for k in keys if (p := key_problem(k, where, reserved, leaf=leaf))]
    if problems:
        raise ExperimentError("\n".join(problems))


def read_yaml_mapping(path: Path, what: str) -> dict:
    raw = read_yaml_file(path, what)
    if not isinstance(raw, dict):
        raise ExperimentError(f"{path.name}: the top level must be a mapping of keys, got {type(raw).__name__}.")
    return raw


def build_variants(
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
            if val_split and not recipe.data.val_split and VAL_KEY not in map(override_key, overrides):
                # Left at 0 by the recipe, not chosen by the experiment: hold out the default, so
                # that the report ranks on validation. Written into the recipe, so it shows.
                recipe = recipe_from_dict(base, base_label, [*overrides, f"{VAL_KEY}={value_text(val_split)}"])
        except RecipeError as err:
            problems.append(f"{where} does not validate:\n  " + str(err).replace("\n", "\n  "))
            continue
        own_description = any(k == "description" for k, _ in settings) or any(
            override_key(o) == "description" for o in [*shared, *cli_overrides]
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


# ---------------------------------------------------------------------------------------------
# Reading an experiment file.
# ---------------------------------------------------------------------------------------------


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
    raw = read_yaml_mapping(file, "experiment file")
    label = file.name
    _check_file_keys(raw, label)
    base, base_label = _read_base(raw.get("base"), file, label)
    shared = _shared_overrides(raw.get("overrides") or [], label)
    _check_overrides(shared, f"{label}: overrides", _RESERVED_SHARED)
    check_cli_overrides(overrides)
    variants = _variant_settings(raw.get("variants"), label)
    variants, study = _study(raw, variants, overrides, label, shared)
    val_split = _read_val_split(raw, label)
    exp_name = str(name or raw.get("name") or file.stem)
    description = str(raw.get("description") or "")
    built = build_variants(exp_name, description, base, base_label, shared, variants, overrides, val_split)
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
    return Experiment(exp_name, description, built, [str(k) for k in sweep_keys], str(file), val_split, study)


def _study(
    raw: dict, variants: list[tuple[str, list[tuple[str, str]], str]], cli_overrides: Sequence[str], label: str,
    shared: Sequence[str] = (),
) -> tuple[list[tuple[str, list[tuple[str, str]], str]], Study | None]:
    """The runs of a study (every variant at every point of the file's ``grid``) and their layout;
    a file without a grid keeps its variants, and an ``experiment.yaml`` read back keeps its ``study``."""
    if "study" in raw:
        if "grid" in raw:
            raise ExperimentError(f"{label}: has both `grid` and `study`.",
                                  "`study` is what finetune writes into an experiment folder; write `grid` in your file.")
        return variants, study_from_dict(raw["study"], label)
    if "grid" not in raw:
        return variants, None
    axes, problems = [], []
    for key, values in read_grid(raw["grid"], label):
        problems += [p for p in [key_problem(key, f"{label}: grid", leaf=True)] if p]
        pairs = [(value, _settings_to_overrides(settings)) for value, settings in values]
        problems += [p for _, own in pairs for k, _ in own if (p := key_problem(k, f"{label}: grid.{key}"))]
        axes.append((key, pairs))
    problems += _grid_clashes(axes, variants, cli_overrides, shared)
    if problems:
        raise ExperimentError("\n".join(problems), "Change the grid in the experiment file instead.")
    return expand(variants, axes)


def _grid_clashes(axes: list, variants: list, cli_overrides: Sequence[str], shared: Sequence[str]) -> list[str]:
    """A grid axis's key set anywhere else, which the grid would silently override (or, set by
    another axis's value, would give two runs of one recipe under two names)."""
    keys = {k for k, _ in axes}
    problems = []
    for where, given in [("command-line override", [override_key(o) for o in cli_overrides]),
                         ("the file's overrides", [override_key(o) for o in shared]),
                         *((f"variant {name!r}", [k for k, _ in own]) for name, own, _ in variants),
                         *((f"grid.{key} value {value!r}", [k for k, _ in own]) for key, pairs in axes
                           for value, own in pairs)]:
        clash = sorted(k for k in keys if any(overlaps(k, g) for g in given))
        if clash:
            problems.append(f"{where} sets {', '.join(clash)}, which the grid sets for every run.")
    return problems


def _check_file_keys(raw: dict, label: str) -> None:
    """Refuse a key an experiment file does not have, with the nearest one (or a hint that it is a recipe)."""
    unknown = [k for k in raw if k not in _FILE_KEYS]
    if unknown:
        close = [f"{k!r} (did you mean {m[0]!r}?)" if (m := _close(k, _FILE_KEYS)) else repr(k) for k in unknown]
        hint = " A recipe? Run it with `finetune run`." if {"model", "train", "optim", "data"} & set(unknown) else ""
        raise ExperimentError(
            f"{label}: unknown experiment key(s) {', '.join(close)}.",
            f"An experiment file has {', '.join(_FILE_KEYS)}.{hint}",
        )


def _read_base(base_spec: Any, file: Path, label: str) -> tuple[dict, str]:
    """The raw base recipe and how messages name it: none (schema defaults), inline, or a file
    found next to the experiment file or among the shipped recipes."""
    if base_spec is None:
        return {}, f"{label} (no base: schema defaults)"
    if isinstance(base_spec, dict):
        return base_spec, f"{label} (inline base)"
    if isinstance(base_spec, str):
        relative = file.parent / base_spec
        try:
            base_file = relative if relative.is_file() else find_recipe(base_spec)
        except RecipeError:
            raise ExperimentError(
                f"{label}: base recipe {base_spec!r} not found, neither next to {label} nor among the shipped recipes.",
                "Give a path relative to the experiment file, or a shipped recipe's name (see `finetune ls`).",
            ) from None
        return read_yaml_mapping(base_file, "base recipe"), base_file.name
    raise ExperimentError(
        f"{label}: base must be a recipe file name or a mapping, got {base_spec!r}.",
        "Write e.g. `base: deit_tiny_cifar.yaml` (relative to this file).",
    )


def _shared_overrides(shared_spec: Any, label: str) -> list[str]:
    """The file's ``overrides``, written as a list of ``dotted.key=value`` or as a mapping."""
    if isinstance(shared_spec, dict):
        return [o for _, o in _settings_to_overrides(shared_spec)]
    if isinstance(shared_spec, list) and all(isinstance(o, str) for o in shared_spec):
        return list(shared_spec)
    raise ExperimentError(
        f"{label}: overrides must be a list of dotted.key=value strings or a mapping, got {shared_spec!r}.",
        "Write e.g. `overrides: [data.train_subset=10000]`.",
    )


def _variant_settings(spec: Any, label: str) -> list[tuple[str, list[tuple[str, str]], str]]:
    """``(name, [(dotted key, override)], where)`` per variant of the file's ``variants``; one error
    lists every bad variant name, settings or key."""
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
        problems += [p for k, _ in pairs if (p := key_problem(k, where))]
        variants.append((variant, pairs, where))
    if problems:
        raise ExperimentError("\n".join(problems))
    return variants


def _read_val_split(raw: dict, label: str) -> int | float:
    """The file's ``val_split`` (default :data:`DEFAULT_VAL_SPLIT`), checked like ``data.val_split``."""
    val_split = raw.get("val_split", DEFAULT_VAL_SPLIT)
    if not is_image_count(val_split):
        raise ExperimentError(
            f"{label}: val_split must be a number of images (int) or a fraction of the train set "
            f"(float in [0, 1)), got {val_split!r}.",
            f"Write e.g. `val_split: {DEFAULT_VAL_SPLIT}` (the default), or `val_split: 0` to hold out nothing "
            "and rank on test.",
        )
    return val_split


def is_image_count(value: Any) -> bool:
    """True for what ``data.val_split`` accepts: an int >= 0, or a float in [0, 1)."""
    if isinstance(value, bool):
        return False
    return (isinstance(value, int) and value >= 0) or (isinstance(value, float) and 0.0 <= value < 1.0)


def check_cli_overrides(overrides: Sequence[str]) -> None:
    keys = [override_key(o) for o in overrides]
    if "name" in keys:
        raise ExperimentError(
            "the override 'name=...' cannot rename an experiment's runs: they are named after the variants.",
            "Pass --name NAME to give the experiment (its folder) another name.",
        )
    _check_overrides(overrides, "command-line override", _RESERVED_SHARED)


def _close(word: str, choices: Sequence[str]) -> list[str]:
    return difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)


def read_experiment_folder(folder: str | Path) -> tuple[list[Path], list[str], str, Study | None]:
    """The run folders, sweep keys, title and study layout (``None`` unless it has a grid) of an
    experiment folder, from its ``experiment.yaml``.

    Raises:
        ExperimentError: no readable ``experiment.yaml`` with variants.
    """
    folder = Path(folder)
    raw = read_yaml_mapping(folder / EXPERIMENT_FILE, "experiment")
    variants = raw.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise ExperimentError(f"{folder / EXPERIMENT_FILE} lists no variants.")
    name, description = str(raw.get("name") or folder.name), str(raw.get("description") or "")
    sweep_keys = [str(k) for k in raw.get("sweep_keys") or []]
    study = study_from_dict(raw["study"], str(folder / EXPERIMENT_FILE)) if "study" in raw else None
    title = f"{name}: {description}" if description else name
    return [folder / str(v) for v in variants], sweep_keys, title, study
