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
    ("model.args.checkpoint_path=/etc/passwd", "'checkpoint_path' is not an argument finetune passes on"),
    ("model.args.img_size=64", "set model.img_size instead of model.args.img_size"),
    ("model.args.depth={a: 1}", "is not a plain value"),
])
def test_bad_args_are_one_paragraph_before_anything_is_written(tmp_path, override, says):
    result = runner.invoke(app, ["run", str(QUICK), f"output.dir={tmp_path / 'runs'}", override])
    assert result.exit_code != 0
    assert says in result.output and "Traceback" not in result.output
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
