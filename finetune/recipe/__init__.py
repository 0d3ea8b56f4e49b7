"""Recipes: YAML files validated once, at the edge, into typed objects.

A recipe is a YAML mapping with the sections ``model``, ``train``, ``optim``, ``schedule``,
``data`` and ``output``. :func:`load_recipe` reads it, applies ``key.sub=value`` overrides from
the command line and validates the result into a frozen :class:`Recipe`; everything after that
works with typed attributes, never with raw dicts. Every mistake a user can make here (a file that
is missing, bad YAML, an unknown key, a wrong type, settings that contradict each other) becomes a
:class:`RecipeError` whose message names the file, the dotted key and what to do.

:mod:`.schema` holds the sections and :class:`Recipe` (:mod:`.words` the plain words for types and
values its messages use, :mod:`.model_args` the bounded constructor arguments a recipe's
``model.args`` or a saved ``config.json`` may give a model); :mod:`.yaml_io` the YAML dialect;
:mod:`.messages` the one-line-per-field error messages; :mod:`.loading` finding, overriding,
validating and listing recipes. The names below are re-exported here, so ``from finetune.recipe
import load_recipe`` is the way in.

May import: :mod:`finetune.errors` only (so ``finetune validate`` and ``finetune ls`` start
without torch or timm); the rest of finetune imports this package.
"""

from ..errors import RecipeError
from .loading import (
    SHIPPED_RECIPES,
    apply_overrides,
    computed_settings,
    dump_recipe_yaml,
    find_recipe,
    is_experiment,
    list_recipes,
    load_recipe,
    recipe_from_dict,
    recipe_to_dict,
)
from .messages import mapping_keys, overlaps, suggest_key, valid_keys
from .schema import (
    MAX_IMG_SIDE,
    TRAIN_MODES,
    AugmentConfig,
    DataConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    OutputConfig,
    Recipe,
    ScheduleConfig,
    TrainConfig,
    TrainMode,
)
from .yaml_io import RECIPE_MAX_BYTES, RecipeDumper, parse_yaml, read_yaml_file

__all__ = [
    "MAX_IMG_SIDE",
    "RECIPE_MAX_BYTES",
    "SHIPPED_RECIPES",
    "TRAIN_MODES",
    "AugmentConfig",
    "DataConfig",
    "LoraConfig",
    "ModelConfig",
    "OptimConfig",
    "OutputConfig",
    "Recipe",
    "RecipeDumper",
    "RecipeError",
    "ScheduleConfig",
    "TrainConfig",
    "TrainMode",
    "apply_overrides",
    "computed_settings",
    "dump_recipe_yaml",
    "find_recipe",
    "is_experiment",
    "list_recipes",
    "load_recipe",
    "parse_yaml",
    "recipe_from_dict",
    "recipe_to_dict",
    "mapping_keys",
    "overlaps",
    "suggest_key",
    "valid_keys",
]
