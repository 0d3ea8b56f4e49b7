"""Reading a recipe: finding the file (a path, or a shipped recipe's name), applying
``key.sub=value`` overrides, validating into a :class:`~.schema.Recipe`, and writing it back as
a dict or YAML; listing the shipped recipes."""

from __future__ import annotations

import copy
import difflib
import re
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import RecipeError
from .messages import error_lines
from .schema import Recipe, check_name_length, short_repr
from .yaml_io import RecipeDumper, not_regular_file, parse_yaml, read_yaml_file

SHIPPED_RECIPES = Path(__file__).resolve().parents[2] / "recipes"
"""The recipes folder of the repository, next to the package."""


# ---------------------------------------------------------------------------------------------
# Overrides.
# ---------------------------------------------------------------------------------------------

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_OVERRIDE_EXAMPLE = "Write overrides as dotted.key=value, e.g. optim.lr=3e-4 data.batch_size=64"


def _split_override(override: str) -> tuple[str, Any]:
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not _KEY.fullmatch(key):
        raise RecipeError(f"bad override {override!r}.", _OVERRIDE_EXAMPLE + ".")
    return key, parse_yaml(text, f"override {override!r}", "Quote text values; write lists as [0.9, 0.99].")


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """Set dotted keys in a raw recipe mapping.

    Args:
        raw: The recipe as read from YAML; it is not modified.
        overrides: Items like ``optim.lr=3e-4``. The value is read as YAML, so ``true``, ``null``,
            ``[1, 2]`` and ``1e-3`` have their usual types. Missing sections are created.

    Returns:
        A new mapping with the overrides applied, still unvalidated.

    Raises:
        RecipeError: An override without ``=``, with a malformed key, or one that descends into a
            value that is not a section.
    """
    result = copy.deepcopy(raw)
    for override in overrides:
        key, value = _split_override(override)
        *parents, leaf = key.split(".")
        node = result
        for depth, part in enumerate(parents):
            child = node.get(part)
            if child is None:  # absent, or a YAML section left empty (`augment:`)
                child = node[part] = {}
            if not isinstance(child, dict):
                section = ".".join(parents[: depth + 1])
                raise RecipeError(
                    f"bad override {override!r}: {section!r} is a value ({short_repr(child)}), not a section.",
                    _OVERRIDE_EXAMPLE + ".",
                )
            node = child
        node[leaf] = value
    return result


# ---------------------------------------------------------------------------------------------
# Public entry points.
# ---------------------------------------------------------------------------------------------


def recipe_from_dict(raw: Any, where: str = "recipe", overrides: Sequence[str] = ()) -> Recipe:
    """Validate a raw mapping (e.g. read from YAML) into a :class:`Recipe`.

    Args:
        raw: The unvalidated recipe mapping.
        where: How messages name the origin of the mapping, usually the file name.
        overrides: ``dotted.key=value`` items applied before validation.

    Raises:
        RecipeError: One line per bad field, or a bad override.
    """
    if not isinstance(raw, dict):
        got = "nothing (the file is empty)" if raw is None else f"{type(raw).__name__} {short_repr(raw)}"
        raise RecipeError(
            f"{where}: the top level must be a mapping of keys and sections (model:, train:, ...), "
            f"got {got}.",
            "See the recipes that `finetune ls` lists for the layout.",
        )
    raw = apply_overrides(raw, overrides)
    override_keys = {_split_override(o)[0]: o for o in overrides}
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError("\n".join(error_lines(err, raw, where, override_keys))) from None


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read, override and validate a recipe.

    Args:
        path: A YAML file, or the name of a shipped recipe (see :func:`find_recipe`).
        overrides: ``dotted.key=value`` items, e.g. ``("optim.lr=3e-4", "data.batch_size=64")``.

    Returns:
        The validated recipe; ``name`` defaults to the file's stem.

    Raises:
        RecipeError: A missing or unreadable file, bad YAML, a bad override or an invalid recipe.
    """
    file = find_recipe(path)
    recipe = recipe_from_dict(read_yaml_file(file), file.name, overrides)
    if recipe.name is None:
        try:
            check_name_length(file.stem)  # the name is checked as if it had been written in the file
        except ValueError as err:
            raise RecipeError(f"{file.name}: the run is named after the file, whose name {err}.",
                              "Or set name: in the recipe (or name=... on the command line).") from None
        recipe = recipe.model_copy(update={"name": file.stem})
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict:
    """Every field of the recipe, defaults included, as plain JSON/YAML types (tuples become lists)."""
    return recipe.model_dump(mode="json")


def computed_settings(recipe: Recipe | dict) -> dict:
    """The recipe as a dict without the keys that do not change what a run computes
    (``description``, ``output.dir``, ``output.overwrite``): runs with equal settings train alike.

    Args:
        recipe: a recipe, or :func:`recipe_to_dict`'s output.
    """
    data = copy.deepcopy(recipe_to_dict(recipe) if isinstance(recipe, Recipe) else recipe)
    data.pop("description", None)
    for key in ("dir", "overwrite"):
        data.get("output", {}).pop(key, None)
    return data


def dump_recipe_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML that :func:`load_recipe` reads back to an equal recipe."""
    header = "# Resolved recipe: defaults filled in, overrides applied. Rerun with: finetune run THIS_FILE name=NEW_NAME\n"
    return header + yaml.dump(recipe_to_dict(recipe), Dumper=RecipeDumper, sort_keys=False)


def is_experiment(raw: Any) -> bool:
    """True for an experiment file (``finetune compare``): a mapping with ``variants``."""
    return isinstance(raw, dict) and "variants" in raw


def list_recipes(directory: str | Path = SHIPPED_RECIPES) -> list[tuple[str, str]]:
    """``(file name, description)`` for each ``*.yaml`` recipe in ``directory``, sorted by name.

    Only the ``description:`` field is read; a file that is not valid YAML still gets listed so
    that ``finetune ls`` shows it, and ``finetune validate`` says what is wrong with it.
    """
    entries = []
    for file in sorted(Path(directory).glob("*.y*ml")):
        try:
            raw = read_yaml_file(file)
            description = str(raw.get("description", "")) if isinstance(raw, dict) else ""
            if is_experiment(raw):
                description = f"[finetune compare] {description}"
        except RecipeError:
            description = "(unreadable: run `finetune validate` on it)"
        entries.append((file.name, description))
    return entries


def find_recipe(name_or_path: str | Path) -> Path:
    """Locate a recipe file.

    Args:
        name_or_path: A path to a YAML file, or a bare name such as ``deit_tiny_cifar`` (with or
            without ``.yaml``), looked up in ``./recipes/`` and then in the shipped recipes folder.

    Raises:
        RecipeError: Nothing found (the message lists the shipped recipes), a folder, or a path that
            is not a regular file (a FIFO, a device: never opened).
    """
    given = Path(name_or_path)
    if given.is_dir():
        raise RecipeError(f"recipe {str(given)!r} is a folder.", "Give the path of a .yaml file inside it.")
    names = [given.name] if given.suffix in (".yaml", ".yml") else [given.name + ".yaml", given.name + ".yml"]
    candidates = [given, *(given.with_name(n) for n in names)]
    if given.parent == Path("."):  # a bare name, not a path that happens to be missing
        candidates += [folder / n for folder in (Path("recipes"), SHIPPED_RECIPES) for n in names]
    for candidate in candidates:
        try:
            mode = candidate.stat().st_mode  # by name: nothing is opened
        except (OSError, ValueError):
            continue
        if stat.S_ISREG(mode):
            return candidate
        if not stat.S_ISDIR(mode):  # a FIFO, socket or device: there, but never to be read
            raise RecipeError(*not_regular_file(candidate, mode))
    shipped = [Path(name).stem for name, _ in list_recipes(SHIPPED_RECIPES)]
    # Suggest only a name that is really close: `deit_tiny_cifr` -> deit_tiny_cifar, `nope` -> nothing.
    close = difflib.get_close_matches(Path(given.name).stem, shipped, n=1, cutoff=0.75)
    hint = f"Did you mean {close[0]!r}? " if close else ""
    raise RecipeError(
        f"recipe {str(name_or_path)!r} not found.",
        f"{hint}Give a path to a YAML file or a shipped recipe: {', '.join(shipped)}.",
    )
