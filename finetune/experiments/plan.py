"""Planning an experiment before anything runs: for each variant, run it, reuse its finished run,
resume it from its last checkpoint or replace its unfinished folder, refusing every conflict in one
message; and ``experiment.yaml``, the resolved experiment written into its folder."""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from ..errors import ExperimentError
from ..recipe import Recipe, RecipeDumper, RecipeError, computed_settings, load_recipe, recipe_to_dict
from ..runs.folder import CHECKPOINT, is_run_folder, lock_held, run_dir_for, run_status
from ..runs.records import flatten
from .spec import VAL_KEY, Experiment, value_text


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
            val_split_changed |= not old.get(VAL_KEY) and VAL_KEY in diffs
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


def select_runs(exp: Experiment, only: Sequence[str] = (), skip: Sequence[str] = ()) -> set[str]:
    """The runs that ``--only`` and ``--skip`` leave to train: each pattern is a run's name, a
    study's variant name (all its runs), or a shell-style pattern (``full_*``, ``*_n250``).

    Raises:
        ExperimentError: a pattern that matches no run (with the names there are).
    """
    names = [name for name, _ in exp.variants]
    variant_of = {name: exp.study.runs[name][0] for name in names} if exp.study is not None else {}

    def matching(pattern: str) -> set[str]:
        return {n for n in names if fnmatch.fnmatchcase(n, pattern) or variant_of.get(n) == pattern}

    unknown = [p for p in [*only, *skip] if not matching(p)]
    if unknown:
        shown = ", ".join(dict.fromkeys([*variant_of.values(), *names]))
        raise ExperimentError(
            f"--only/--skip {', '.join(map(repr, unknown))} match(es) no run of experiment {exp.name!r}.",
            f"Name variants or runs (shell patterns such as 'full_*' work): {shown[:600]}.",
        )
    chosen = set().union(*(matching(p) for p in only)) if only else set(names)
    return chosen - set().union(*(matching(p) for p in skip)) if skip else chosen


def _show(value: Any) -> str:
    return "absent" if value is None else json.dumps(value)


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
        "overrides": [f"output.dir={value_text(parent)}"],
    }
    if exp.sweep_keys:
        doc["sweep_keys"] = exp.sweep_keys
    doc["val_split"] = exp.val_split  # each variant's data.val_split below is the one it ran with
    if exp.study is not None:
        doc["study"] = exp.study.to_dict()  # which variant and grid point each run below is
    doc["variants"] = variants
    header = (
        f"# Resolved experiment from {exp.source or 'the Python API'}: every variant's complete recipe.\n"
        f"# Rerun (finished runs are reused) with: finetune compare THIS_FILE\n"
    )
    return header + yaml.dump(doc, Dumper=RecipeDumper, sort_keys=False, width=100)
