"""Recipe loading, overrides and error messages; offline and fast."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from finetune.errors import FinetuneError
from finetune.recipe import (
    SHIPPED_RECIPES,
    Recipe,
    RecipeError,
    apply_overrides,
    dump_recipe_yaml,
    find_recipe,
    is_experiment,
    list_recipes,
    load_recipe,
    parse_yaml,
    recipe_from_dict,
    recipe_to_dict,
    valid_keys,
)

# Experiment files (finetune compare) live beside the recipes; tests/test_experiment.py checks them.
SHIPPED = sorted(p for p in SHIPPED_RECIPES.glob("*.yaml") if not is_experiment(parse_yaml(p.read_text(), p.name)))
FINETUNE = {"model": {"source": "deit_tiny_patch16_224.fb_in1k"}}  # smallest valid recipe


def write(tmp_path: Path, text: str, name: str = "deit.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(raw: dict, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(raw, "deit.yaml", overrides)
    return str(info.value)


# --- shipped recipes --------------------------------------------------------------------------


def test_the_seven_recipes_are_shipped():
    assert {p.stem for p in SHIPPED} >= {
        "deit_tiny_cifar",
        "deit_tiny_cifar_head",
        "deit_tiny_cifar32",
        "deit_tiny_cifar32_truncate",
        "vit_lab_cifar",
        "vit_cifar_scratch",
        "quick_cpu",
    }


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_recipe_validates_and_documents_itself(path: Path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    assert recipe.description
    assert path.read_text().splitlines()[0] == f"# finetune run recipes/{path.name}"


def test_course_settings_in_recipes():
    head = load_recipe(SHIPPED_RECIPES / "deit_tiny_cifar_head.yaml")
    assert (head.train.mode, head.train.epochs, head.optim.name, head.optim.lr) == ("head", 1, "sgd", 1e-3)
    assert head.data.train_subset == 10000
    lab = load_recipe(SHIPPED_RECIPES / "vit_lab_cifar.yaml")
    assert (lab.model.arch, lab.optim.name, lab.data.batch_size, lab.train.epochs) == (
        "vit_lab",
        "adam",
        32,
        20,
    )
    assert lab.train.precision == "fp16" and lab.data.mean == (0.5, 0.5, 0.5)
    assert not lab.data.augment.hflip and lab.data.augment.crop_padding == 0
    truncate = load_recipe(SHIPPED_RECIPES / "deit_tiny_cifar32_truncate.yaml")
    assert truncate.model.pos_embed_mode == "truncate" and truncate.model.img_size == 32
    quick = load_recipe(SHIPPED_RECIPES / "quick_cpu.yaml")
    assert (quick.data.name, quick.device, quick.train.precision) == ("synthetic", "cpu", "fp32")


def test_list_recipes_gives_descriptions():
    entries = dict(list_recipes())
    assert "quick_cpu.yaml" in entries
    assert "CPU" in entries["quick_cpu.yaml"]


def test_list_recipes_lists_an_unreadable_file(tmp_path: Path):
    write(tmp_path, "description: ok\n", "a.yaml")
    write(tmp_path, "model: [\n", "b.yaml")
    assert list_recipes(tmp_path) == [
        ("a.yaml", "ok"),
        ("b.yaml", "(unreadable: run `finetune validate` on it)"),
    ]


# --- finding and reading files ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["quick_cpu", "quick_cpu.yaml"])
def test_find_recipe_by_bare_name(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)  # away from the repo's recipes/ folder: the shipped one is used
    assert find_recipe(name) == SHIPPED_RECIPES / "quick_cpu.yaml"


def test_find_recipe_prefers_the_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "description: mine\n", "quick_cpu.yaml")
    assert find_recipe("quick_cpu") == Path("quick_cpu.yaml")


def test_missing_recipe_lists_shipped_names(tmp_path: Path):
    with pytest.raises(RecipeError) as info:
        load_recipe("deit_tiny_cifr")
    message = str(info.value)
    assert "'deit_tiny_cifr' not found" in message
    assert "Did you mean 'deit_tiny_cifar'?" in message
    assert "quick_cpu" in message and "vit_lab_cifar" in message
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_recipe_error_is_a_finetune_error():
    assert issubclass(RecipeError, FinetuneError)


def test_yaml_syntax_error_gives_the_line(tmp_path: Path):
    path = write(tmp_path, "model:\n  source: x\n  arch: [a, b\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert "deit.yaml: YAML syntax error at line" in str(info.value)
    assert "line 4" in str(info.value) or "line 3" in str(info.value)


def test_duplicate_key_is_an_error(tmp_path: Path):
    path = write(tmp_path, "optim:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(RecipeError, match=r"deit.yaml: YAML syntax error at line 3.*duplicate key 'lr'"):
        load_recipe(path)


@pytest.mark.parametrize(
    ("text", "got"), [("- a\n- b\n", "got list"), ("", "file is empty"), ("3\n", "got int")]
)
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, got: str):
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text))
    assert "deit.yaml: the top level must be a mapping" in str(info.value)
    assert got in str(info.value)


def test_scientific_notation_in_yaml_is_a_number(tmp_path: Path):
    recipe = load_recipe(write(tmp_path, "model: {source: x}\noptim:\n  lr: 3e-4\n"))
    assert recipe.optim.lr == 3e-4


def test_name_defaults_to_file_stem_and_can_be_set(tmp_path: Path):
    assert load_recipe(write(tmp_path, "model: {source: x}\n", "my_run.yaml")).name == "my_run"
    assert load_recipe(write(tmp_path, "name: other\nmodel: {source: x}\n")).name == "other"


# --- overrides --------------------------------------------------------------------------------


def test_overrides_are_typed():
    raw = apply_overrides(
        {},
        ["optim.lr=1e-3", "data.batch_size=64", "train.compile=true", "data.mean=[0.5, 0.5, 0.5]", "x=null"],
    )
    assert raw == {
        "optim": {"lr": 1e-3},
        "data": {"batch_size": 64, "mean": [0.5, 0.5, 0.5]},
        "train": {"compile": True},
        "x": None,
    }
    assert isinstance(apply_overrides({}, ["a=2E+5"])["a"], float)


def test_overrides_create_nested_sections_and_keep_siblings():
    raw = {"data": {"name": "cifar10"}}
    result = apply_overrides(raw, ["data.augment.hflip=false"])
    assert result == {"data": {"name": "cifar10", "augment": {"hflip": False}}}
    assert raw == {"data": {"name": "cifar10"}}, "the input must not be modified"


def test_override_fills_an_empty_yaml_section(tmp_path: Path):
    recipe = load_recipe(write(tmp_path, "model: {source: x}\noptim:\n"), ["optim.lr=0.1"])
    assert recipe.optim.lr == 0.1


def test_overrides_applied_by_load_recipe(tmp_path: Path):
    path = write(tmp_path, "model: {source: x}\noptim: {lr: 0.1}\n")
    recipe = load_recipe(path, ["optim.lr=3e-4", "data.batch_size=64", "data.augment.crop_padding=0"])
    assert (recipe.optim.lr, recipe.data.batch_size, recipe.data.augment.crop_padding) == (3e-4, 64, 0)
    assert recipe.optim.weight_decay == 0.05, "untouched keys keep their defaults"


def test_override_of_numbers_and_tuples_coerced_by_schema():
    recipe = recipe_from_dict(
        FINETUNE, overrides=["model.img_size=[32, 48]", "optim.betas=[0.9, 0.99]", "name=2024"]
    )
    assert recipe.model.img_size == (32, 48)
    assert recipe.optim.betas == (0.9, 0.99)
    assert recipe.name == "2024"


@pytest.mark.parametrize("override", ["optim.lr", "--optim.lr=1", "optim..lr=1", "=3"])
def test_bad_override_syntax_shows_the_right_form(override: str):
    with pytest.raises(RecipeError) as info:
        apply_overrides({}, [override])
    assert f"bad override {override!r}" in str(info.value)
    assert "optim.lr=3e-4" in str(info.value)


def test_override_into_a_value_is_an_error():
    with pytest.raises(RecipeError, match=r"'optim\.lr' is a value"):
        apply_overrides({"optim": {"lr": 0.1}}, ["optim.lr.x=1"])


def test_override_with_bad_yaml_value():
    with pytest.raises(RecipeError, match=r"override 'data.mean=\[1,': YAML syntax error"):
        apply_overrides({}, ["data.mean=[1,"])


# --- unknown keys -----------------------------------------------------------------------------


def test_unknown_top_level_key(tmp_path: Path):
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, "model: {source: x}\nseeed: 3\n"))
    assert str(info.value) == "deit.yaml: unknown key 'seeed'. Did you mean 'seed'?"


def test_unknown_nested_key(tmp_path: Path):
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, "model: {source: x}\noptim:\n  lrr: 0.1\n"))
    assert str(info.value) == "deit.yaml: unknown key 'optim.lrr'. Did you mean 'optim.lr'?"


def test_unknown_deeply_nested_key():
    message = error_of({**FINETUNE, "data": {"augment": {"hflp": True}}})
    assert "unknown key 'data.augment.hflp'. Did you mean 'data.augment.hflip'?" in message


def test_unknown_key_in_the_wrong_section_points_to_the_right_one():
    assert "unknown key 'train.lr'. Did you mean 'optim.lr'?" in error_of({**FINETUNE, "train": {"lr": 0.1}})


def test_unknown_section_suggests_a_section():
    assert "unknown key 'optimizer'. Did you mean 'optim'?" in error_of({**FINETUNE, "optimizer": {"lr": 1}})


def test_unknown_key_from_an_override():
    message = error_of(FINETUNE, ("optim.lrr=1e-3",))
    assert message == "override 'optim.lrr=1e-3': unknown key 'optim.lrr'. Did you mean 'optim.lr'?"


def test_unknown_key_without_a_close_match_has_no_suggestion():
    assert error_of({**FINETUNE, "zzzzqqq": 1}) == "deit.yaml: unknown key 'zzzzqqq'."


def test_valid_keys_are_dotted_leaves():
    keys = valid_keys()
    assert {"seed", "model.source", "optim.lr", "data.augment.hflip", "output.dir"} <= set(keys)
    assert "data.augment" not in keys and "optim" not in keys
    assert len(keys) == len(set(keys))


# --- wrong types and ranges -------------------------------------------------------------------


def test_wrong_type_names_field_expected_type_and_value():
    message = error_of({**FINETUNE, "optim": {"lr": "fast"}})
    assert message == "deit.yaml: optim.lr: expected a number, got 'fast'"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.batch_size=big", "data.batch_size: expected an integer, got 'big'"),
        ("data.batch_size=true", "data.batch_size: expected an integer, got True"),
        ("optim.lr=true", "optim.lr: expected a number, got True"),
        ("train.ema=maybe", "train.ema: expected true or false, got 'maybe'"),
        ("train.mode=probe", "train.mode: expected one of 'head', 'full', 'last_k', 'scratch', 'lora', 'bitfit', 'attn', got 'probe'"),
        ("train.precision=fp8", "expected one of 'auto', 'bf16', 'fp16', 'fp32', got 'fp8'"),
        ("optim.betas=[0.9]", "optim.betas: expected a list of 2 numbers, got [0.9]"),
        (
            "model.img_size=big",
            "model.img_size: expected an integer or a list of 2 integers or null, got 'big'",
        ),
        ("optim=3", "optim: expected a section of keys (a mapping), got 3"),
        ("optim.lr=0", "optim.lr: must be > 0.0, got 0"),
        ("train.epochs=0", "train.epochs: must be >= 1, got 0"),
        ("optim.layer_decay=1.5", "optim.layer_decay: must be <= 1.0, got 1.5"),
        ("optim.betas=[0.9, 1.5]", "optim.betas: each beta must be in [0, 1), got [0.9, 1.5]"),
        ("model.img_size=-32", "model.img_size: must be a positive number of pixels, got -32"),
        ("device=gpu", "device: must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
        ("name=a/b", "name: must be a plain folder name without slashes"),
    ],
)
def test_bad_value_messages(override: str, expected: str):
    message = error_of(FINETUNE, (override,))
    assert expected in message
    assert message.startswith(f"override {override!r}: ")
    assert "\n" not in message, "one bad field is one line"


def test_all_bad_fields_are_reported_together(tmp_path: Path):
    path = write(tmp_path, "model: {source: x}\noptim: {lr: fast, nme: sgd}\ndata: {batch_size: -1}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["train.epochs=zero"])
    lines = str(info.value).splitlines()
    assert lines == [
        "override 'train.epochs=zero': train.epochs: expected an integer, got 'zero'",
        "deit.yaml: optim.lr: expected a number, got 'fast'",
        "deit.yaml: unknown key 'optim.nme'. Did you mean 'optim.name'?",
        "deit.yaml: data.batch_size: must be >= 1, got -1",
    ]


def test_pydantic_never_leaks():
    message = error_of({**FINETUNE, "optim": {"lr": "fast"}, "data": {"mean": "x"}})
    assert "pydantic" not in message and "validation error" not in message.lower()
    assert "For further information" not in message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.train_subset=0", "data.train_subset: must be at least 1 image, got 0"),
        ("data.train_subset=1.5", "data.train_subset: a float is a fraction in (0, 1], got 1.5"),
        ("data.train_subset=0.0", "a float is a fraction in (0, 1]"),
        ("data.val_split=-1", "data.val_split: must be 0 or more images, got -1"),
        ("data.val_split=1.0", "data.val_split: a float is a fraction in [0, 1), got 1.0"),
    ],
)
def test_subset_and_split_ranges(override: str, expected: str):
    assert expected in error_of(FINETUNE, (override,))


@pytest.mark.parametrize(
    ("overrides", "subset", "split"),
    [
        (("data.train_subset=10000",), 10000, 0),
        (("data.train_subset=0.2", "data.val_split=0.1"), 0.2, 0.1),
        (("data.train_subset=1.0", "data.val_split=5000"), 1.0, 5000),
    ],
)
def test_subset_and_split_accept_counts_and_fractions(overrides, subset, split):
    data = recipe_from_dict(FINETUNE, overrides=overrides).data
    assert (data.train_subset, data.val_split) == (subset, split)
    assert type(data.train_subset) is type(subset) and type(data.val_split) is type(split)


# --- cross-field rules ------------------------------------------------------------------------


def test_scratch_needs_arch():
    assert "model.arch: train.mode 'scratch' builds a new model from a preset" in error_of(
        {"train": {"mode": "scratch"}}
    )


def test_scratch_forbids_source():
    message = error_of(
        {**FINETUNE, "train": {"mode": "scratch"}, "model": {"arch": "vit_lab", "source": "x"}}
    )
    assert (
        "model.source: train.mode 'scratch' starts from random weights, so model.source must be null"
        in message
    )


@pytest.mark.parametrize("mode", ["head", "full", "last_k"])
def test_finetuning_needs_source(mode: str):
    message = error_of({"train": {"mode": mode, "last_k": 2}, "model": {"arch": "vit_lab"}})
    assert message == (
        f"deit.yaml: model.source: train.mode {mode!r} fine-tunes pretrained weights; set model.source, "
        "e.g. deit_tiny_patch16_224.fb_in1k (or use train.mode scratch with model.arch)"
    )


def test_last_k_needs_a_count():
    assert "train.last_k: train.mode 'last_k' needs train.last_k >= 1" in error_of(
        FINETUNE, ("train.mode=last_k",)
    )
    assert recipe_from_dict(FINETUNE, overrides=["train.mode=last_k", "train.last_k=2"]).train.last_k == 2


def test_imagefolder_needs_root():
    assert "data.root: data.name 'imagefolder' needs data.root" in error_of(
        FINETUNE, ("data.name=imagefolder",)
    )
    recipe = recipe_from_dict(FINETUNE, overrides=["data.name=imagefolder", "data.root=/data/pets"])
    assert recipe.data.root == "/data/pets"


def test_mean_and_std_come_together():
    assert "data.mean, data.std: set both or neither" in error_of(FINETUNE, ("data.mean=[0.5, 0.5, 0.5]",))


def test_warmup_longer_than_training():
    message = error_of(FINETUNE, ("schedule.warmup_epochs=2",))
    assert "schedule.warmup_epochs: 2.0 is longer than train.epochs (1)" in message


def test_patch_must_divide_image():
    message = error_of(FINETUNE, ("model.img_size=30", "model.patch_size=4"))
    assert "model.img_size: 30 is not a multiple of model.patch_size (4)" in message


def test_cross_field_problems_are_reported_together():
    lines = error_of(FINETUNE, ("train.mode=scratch", "data.name=imagefolder")).splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("deit.yaml: model.arch: train.mode 'scratch'")
    assert lines[1].startswith("deit.yaml: model.source: train.mode 'scratch'")
    assert lines[2].startswith("deit.yaml: data.root: data.name 'imagefolder'")


def test_cross_field_problem_blames_the_override_that_set_the_field():
    message = error_of({"train": {"mode": "scratch"}, "model": {"arch": "vit_lab"}}, ("model.source=x",))
    assert message.startswith("override 'model.source=x': model.source: train.mode 'scratch'")


# --- round trip -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_round_trip_through_dict_and_yaml(path: Path, tmp_path: Path):
    recipe = load_recipe(path)
    as_dict = recipe_to_dict(recipe)
    assert yaml.safe_load(yaml.safe_dump(as_dict)) == as_dict, "plain YAML types only"
    assert Recipe.model_validate(as_dict) == recipe
    assert recipe_from_dict(as_dict) == recipe
    resolved = write(tmp_path, dump_recipe_yaml(recipe), "resolved.yaml")
    assert load_recipe(resolved) == recipe


def test_recipe_is_frozen_and_hashable():
    recipe = recipe_from_dict(FINETUNE)
    assert hash(recipe) == hash(recipe_from_dict(FINETUNE))
    # Every field, lists included: data.classes is a tuple, so a recipe with it hashes too.
    subset = recipe_from_dict(FINETUNE, overrides=["data.classes=[cat, dog]"])
    assert subset.data.classes == ("cat", "dog")
    assert hash(subset) == hash(recipe_from_dict(FINETUNE, overrides=["data.classes=[cat, dog]"]))
    assert len({recipe, subset}) == 2
    with pytest.raises(ValidationError, match="frozen"):
        recipe.optim.lr = 1.0  # type: ignore[misc]
    assert recipe.model_copy(update={"seed": 1}).seed == 1


def test_defaults_match_the_contract():
    recipe = recipe_from_dict(FINETUNE)
    assert (recipe.train.mode, recipe.train.precision, recipe.optim.name, recipe.optim.lr) == (
        "full",
        "auto",
        "adamw",
        5e-4,
    )
    assert recipe.data.batch_size == 128 and recipe.data.augment.crop_padding == 4
    assert recipe.optim.betas == (0.9, 0.999) and recipe.data.augment.rrc_scale == (0.35, 1.0)
    assert recipe.model.pos_embed_mode == "bicubic" and recipe.model.strict
    assert recipe.name is None and recipe.device == "auto"
    assert Recipe.model_config["extra"] == "forbid"


def test_every_field_has_a_description():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name}"
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                walk(field.annotation)

    walk(Recipe)


def test_every_error_class_is_exported_from_the_package():
    import finetune
    import finetune.errors as errors

    classes = {name for name, value in vars(errors).items() if isinstance(value, type) and issubclass(value, BaseException)}
    assert classes <= set(finetune.__all__)
    assert finetune.DataError is errors.DataError and finetune.RecipeError is errors.RecipeError


def test_eval_and_predict_do_not_import_the_training_loop():
    import subprocess
    import sys

    code = ("import sys, finetune.cli, finetune.training.evaluate, finetune.training.device, finetune.runs.folder, finetune.experiments.report, "
            "finetune.data.load, finetune.data.loader, finetune.models.build; print(sorted(m for m in sys.modules if m.startswith('finetune')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for module in ("finetune.training.setup", "finetune.training.state", "finetune.training.loop",
                   "finetune.training.components", "finetune.training.callbacks", "finetune.runs.run", "finetune.runs.recorder", "finetune.training.progress", "finetune.models.params"):
        assert f"'{module}'" not in loaded
