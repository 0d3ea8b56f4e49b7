"""``model.args``: constructor arguments of a from-scratch model in a recipe (widths, depths, a
conv tokenizer's stages), checked before anything is built, saved with the model and used again
by everything that rebuilds it from the run folder."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import REPO_ROOT
from finetune import create_model, load_model
from finetune.cli import app
from finetune.errors import RecipeError
from finetune.recipe import load_recipe
from finetune.runs.run import run, run_dir_for

runner = CliRunner()
QUICK = REPO_ROOT / "recipes" / "quick_cpu.yaml"


def quick(tmp_path, *overrides: str):
    return load_recipe(QUICK, [f"output.dir={tmp_path / 'runs'}", "output.plots=false", *overrides])


def test_args_shape_the_model_and_the_saved_model_is_rebuilt_with_them(tmp_path):
    recipe = quick(tmp_path, "model.arch=vit_cifar_conv", "model.args.stem_channels=[8,16,32]",
                   "model.args.embed_dim=32", "model.args.depth=1", "model.args.num_heads=2")
    run(recipe, quiet=True)
    folder = run_dir_for(recipe)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_args"]["stem_channels"] == [8, 16, 32] and config["model_args"]["depth"] == 1
    model = load_model(folder)
    assert len(model.blocks) == 1 and model.embed_dim == 32
    assert model.patch_embed.grid_size == (4, 4)  # three stages halve 32 px three times
    assert [m.out_channels for m in model.patch_embed.backbone if isinstance(m, torch.nn.Conv2d)] == [8, 16, 32]
    # The preset alone is another shape (8x8 tokens of width 128): the arguments were used.
    assert model.pos_embed.shape == (1, 16, 32)
    assert create_model("vit_cifar_conv", num_classes=10).pos_embed.shape == (1, 64, 128)
    result = runner.invoke(app, ["eval", str(folder)])
    assert result.exit_code == 0, result.output


def test_args_from_the_command_line_show_in_the_recipe_the_run_records(tmp_path):
    recipe = quick(tmp_path, "model.args.depth=1", "model.args.mlp_ratio=1.5")
    run(recipe, quiet=True)
    recorded = load_recipe(run_dir_for(recipe) / "recipe.yaml")
    assert recorded.model.args == {"depth": 1, "mlp_ratio": 1.5}
    assert len(load_model(run_dir_for(recipe)).blocks) == 1


@pytest.mark.parametrize(("override", "says"), [
    ("model.args.depth=100000", "depth=100000 should be a whole number from 1 to 256"),
    ("model.args.stem_channels=[8,0]", "stem_channels=[8, 0] should be a list of 1 to 8 whole numbers"),
    ("model.args.checkpoint_path=x.pth", "'checkpoint_path' is not an argument finetune passes on"),
    ("model.args.dpeth=3", "'dpeth' is not an argument finetune passes on; did you mean 'depth'?"),
    ("model.args.img_size=64", "set model.img_size instead of model.args.img_size"),
    ("model.args.in_chans=1", "the images a run reads are RGB"),
    ("model.args.depth=[1,2]", "depth=[1, 2] should be a whole number"),
])
def test_bad_args_are_refused_when_the_recipe_validates(tmp_path, override, says):
    """The bounds a saved config.json is held to, checked by the schema: `validate` says so, and a
    run or sweep stops before anything is written."""
    checked = runner.invoke(app, ["validate", str(QUICK), override])
    assert checked.exit_code != 0 and says in checked.output and "Traceback" not in checked.output
    result = runner.invoke(app, ["run", str(QUICK), f"output.dir={tmp_path / 'runs'}", override])
    assert result.exit_code != 0 and says in result.output
    swept = runner.invoke(app, ["sweep", str(QUICK), "--grid", "seed=0,1", override, f"output.dir={tmp_path / 'runs'}"])
    assert swept.exit_code != 0 and says in swept.output and "Traceback" not in swept.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("overrides", "says"), [
    (["model.args.embed_dim=99"], "dim should be divisible by num_heads"),
    (["model.args.act_layer=foo"], "no layer named 'foo'"),
    (["model.args.global_pool=token", "model.args.class_token=false"], "Token pooling needs the class token"),
    (["model.arch=vit_lab", "model.args.stem_channels=[8,8,8,8]"], "turn the image into a 2x2 grid, which 4-px"),
])
def test_a_shape_timm_cannot_build_is_one_paragraph_before_the_run_folder(tmp_path, overrides, says):
    result = runner.invoke(app, ["run", str(QUICK), f"output.dir={tmp_path / 'runs'}", *overrides])
    assert result.exit_code != 0 and says in result.output, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_a_plain_preset_given_a_conv_stem_is_saved_under_its_own_name_and_loads_again(tmp_path):
    """vit_lab has no conv tokenizer of its own; with stem_channels it needs finetune's, so it is
    not saved as plain timm's ViT (which has no such argument)."""
    recipe = quick(tmp_path, "model.arch=vit_lab", "model.args.stem_channels=[8]", "model.args.depth=1")
    run(recipe, quiet=True)
    folder = run_dir_for(recipe)
    assert json.loads((folder / "config.json").read_text())["architecture"] == "vit_lab"
    model = load_model(folder)
    assert model.patch_embed.grid_size == (4, 4) and len(model.blocks) == 1  # 16 px after one stage, 4-px patches
    assert runner.invoke(app, ["eval", str(folder)]).exit_code == 0


def test_recipes_with_args_hash_as_they_compare():
    one = load_recipe(QUICK, ["model.args.depth=1", "model.args.stem_channels=[8,16]"])
    same = load_recipe(QUICK, ["model.args.stem_channels=[8,16]", "model.args.depth=1"])
    other = load_recipe(QUICK, ["model.args.depth=1", "model.args.stem_channels=[8,32]"])
    assert one == same and hash(one) == hash(same)
    assert one != other and len({one, same, other}) == 2


def test_a_grid_and_an_override_of_the_whole_mapping_clash(tmp_path):
    result = runner.invoke(app, ["sweep", str(QUICK), "--grid", "model.args.depth=1,2", "model.args={depth: 3}",
                                 f"output.dir={tmp_path / 'runs'}"])
    assert result.exit_code != 0 and "both swept (--grid) and overridden" in result.output
    whole = runner.invoke(app, ["sweep", str(QUICK), "--grid", "model.args={depth: 1}", f"output.dir={tmp_path / 'runs'}"])
    assert whole.exit_code != 0 and "'model.args' is a mapping; sweep one entry of it" in whole.output
    assert not (tmp_path / "runs").exists()


def test_args_are_refused_for_a_pretrained_source():
    with pytest.raises(RecipeError, match="model.args: shapes a model built from scratch, but train.mode is 'full'"):
        load_recipe(REPO_ROOT / "recipes" / "deit_tiny_cifar.yaml", ["model.args.depth=3"])


def test_an_argument_the_architecture_does_not_take_is_a_message(tmp_path):
    result = runner.invoke(app, ["run", str(QUICK), f"output.dir={tmp_path / 'runs'}", "model.arch=vit_tiny_patch16_224",
                                 "model.img_size=32", "model.args.stem_channels=[8]"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "Cannot build 'vit_tiny_patch16_224'" in result.output and "stem_channels" in result.output
    assert not (tmp_path / "runs").exists()


def test_a_sweep_over_an_argument_runs_each_shape_and_reports_it(tmp_path):
    result = runner.invoke(app, ["sweep", str(QUICK), "--grid", "model.args.depth=1,2", f"output.dir={tmp_path / 'runs'}",
                                 "output.plots=false", "data.synthetic_train=64", "-q"])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "runs" / "quick_cpu_sweep_depth"
    assert [len(load_model(folder / name).blocks) for name in ("depth1", "depth2")] == [1, 2]
    report = (folder / "report.md").read_text()
    assert "| Run | Status | model.args.depth |" in report and "| depth2 | finished | 2 |" in report
    bad = runner.invoke(app, ["sweep", str(QUICK), "--grid", "model.args.de-pth=1,2", f"output.dir={tmp_path / 'bad'}"])
    assert bad.exit_code != 0 and "unknown key 'model.args.de-pth'" in bad.output
