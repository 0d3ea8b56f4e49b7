"""Every ViT family timm offers, loaded at a new input size with a new head.

Each family is a tiny random model saved by ``finetune.save_model`` into ``tmp_path`` and read
back with ``load_model(folder, num_classes=7, img_size=NEW)``. The adapted tensors are checked
against timm's own functions (absolute embeddings against ``resample_abs_pos_embed``; relative
tables keep their zero-offset value; rotary embeddings and Swin windows follow the new grid),
and the model trains in every ``train.mode``, or is refused with a message where it cannot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

from finetune import load_model, save_model
from finetune.errors import CheckpointError, FinetuneError, GridError
from finetune.models.params import add_lora, set_trainable
from finetune.models.pos_embed import (POS_EMBED_MODES, check_runs_at_input_size, pos_embed_prefix_tokens,
                                       resize_model_input, resize_pos_embed, supported_modes)
from finetune.viz.visual import attention_rollout, last_layer_attention


@dataclass(frozen=True)
class Family:
    """A tiny member of a family: its timm name, shrinking arguments, a new image size and a new patch."""

    arch: str
    args: dict = field(default_factory=dict)
    new_size: int = 64
    new_patch: int | None = None  # a patch-size change timm supports for the family
    global_attention: bool = True


VIT = dict(depth=1, embed_dim=32, num_heads=2)
SWIN = dict(depths=(1, 1), embed_dim=16, num_heads=(1, 2))
FAMILIES = {
    "deit": Family("deit_tiny_patch16_224", VIT, 64, 8),
    "deit_distilled": Family("deit_tiny_distilled_patch16_224", VIT, 96),
    "deit3": Family("deit3_small_patch16_224", VIT, 64),  # layer scale, no_embed_class
    "dinov2_reg": Family("vit_small_patch14_reg4_dinov2", dict(VIT, img_size=112), 56),  # 4 registers
    "clip": Family("vit_base_patch16_clip_224", VIT, 64),
    "siglip": Family("vit_base_patch16_siglip_224", VIT, 64),  # no class token, attention-pool head
    "flexivit": Family("flexivit_small", VIT, 96, 8),
    "eva02": Family("eva02_tiny_patch14_224", VIT, 56, 7),  # absolute + rotary
    "beit": Family("beit_base_patch16_224", VIT, 64, 8),  # relative position bias tables
    "beit_abs": Family("beit_base_patch16_224", dict(VIT, use_abs_pos_emb=True), 64),  # tables + absolute
    "swin": Family("swin_tiny_patch4_window7_224", dict(SWIN, img_size=112), 160, 2, False),
    "swinv2": Family("swinv2_tiny_window8_256", dict(SWIN, img_size=128), 160, 2, False),
}
IDS = list(FAMILIES)


def _saved(tmp_path_factory, name: str):
    family = FAMILIES[name]
    torch.manual_seed(0)
    model = timm.create_model(family.arch, num_classes=5, **family.args)
    folder = save_model(model, tmp_path_factory.mktemp(name) / name)
    return model.eval(), folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = _saved(tmp_path_factory, name)
        return cache[name]

    return get


def _has_abs(model) -> bool:
    return isinstance(getattr(model, "pos_embed", None), torch.Tensor)


def _rel_tables(model) -> dict[str, torch.Tensor]:
    """Each attention's relative table value at zero offset (a patch token to itself), per module."""
    return {name: m.relative_position_bias_table[m.relative_position_index[-1, -1]].detach().clone()
            for name, m in model.named_modules()
            if hasattr(m, "relative_position_bias_table") and hasattr(m, "relative_position_index")}


def _step(model, size: int) -> None:
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", IDS)
def test_family_loads_at_a_new_size_and_trains(saved, name):
    """New head, new size: forward and backward run; the adapted tensors are the documented ones."""
    family = FAMILIES[name]
    original, folder = saved(name)
    model = load_model(folder, num_classes=7, img_size=family.new_size)
    assert tuple(model.patch_embed.img_size) == (family.new_size, family.new_size)
    assert model.pretrained_cfg["input_size"] == (3, family.new_size, family.new_size)
    _step(model, family.new_size)
    if _has_abs(original):  # timm's own resample: the numbers agree
        expected = resample_abs_pos_embed(original.pos_embed.detach(), list(model.patch_embed.grid_size),
                                          list(original.patch_embed.grid_size),
                                          num_prefix_tokens=pos_embed_prefix_tokens(original))
        torch.testing.assert_close(model.pos_embed.detach(), expected)
    before, after = _rel_tables(original), _rel_tables(model)
    assert before.keys() == after.keys()
    for key in before:  # relative tables resized: the value at zero offset is kept
        torch.testing.assert_close(after[key], before[key], atol=1e-5, rtol=1e-4)
    if getattr(model, "rope", None) is not None:  # EVA: rotary embedding for the new grid
        tokens = model.patch_embed.num_patches
        assert model.rope.get_embed().shape[0] == tokens
    if name.startswith("swin"):  # windows tile the new grid; buffers rebuilt for them
        for layer in model.layers:
            for block in layer.blocks:
                area = block.window_size[0] * block.window_size[1]
                assert block.attn.relative_position_index.shape == (area, area)
                assert block.window_size[0] <= max(block.input_resolution[0], 7)


@pytest.mark.parametrize("name", IDS)
def test_family_modes_are_explicit(saved, name):
    """truncate/crop/bilinear shape an absolute embedding where there is one; without one they are refused."""
    original, folder = saved(name)
    size = FAMILIES[name].new_size
    if not _has_abs(original):
        assert supported_modes(original) == ("bicubic",)
        for mode in ("truncate", "crop", "bilinear", "nearest"):
            with pytest.raises(GridError, match="no absolute position embedding"):
                load_model(folder, num_classes=7, img_size=size, pos_embed_mode=mode)
        with pytest.raises(GridError, match="antialias=False"):
            load_model(folder, num_classes=7, img_size=size, antialias=False)
        return
    assert supported_modes(original) == POS_EMBED_MODES
    for mode in ("truncate", "crop", "bilinear"):
        model = load_model(folder, num_classes=7, img_size=size, pos_embed_mode=mode)
        expected = resize_pos_embed(original.pos_embed.detach(), tuple(model.patch_embed.grid_size),
                                    old_grid=tuple(original.patch_embed.grid_size),
                                    num_prefix_tokens=pos_embed_prefix_tokens(original), mode=mode)
        assert torch.equal(model.pos_embed.detach(), expected)
        _step(model, size)


@pytest.mark.parametrize("name", IDS)
def test_family_trains_in_every_mode(saved, name):
    """head, full, bitfit, attn and lora each run a training step on the adapted model."""
    _, folder = saved(name)
    size = FAMILIES[name].new_size
    for mode in ("head", "full", "bitfit", "attn", "lora"):
        model = load_model(folder, num_classes=7, img_size=size)
        if mode == "lora":
            model = add_lora(model, r=2, alpha=4.0, dropout=0.0, target_modules=("qkv",))
        counts = set_trainable(model, mode)
        assert 0 < counts.trainable <= counts.total
        _step(model, size)


@pytest.mark.parametrize("name", [n for n in IDS if FAMILIES[n].new_patch])
def test_family_patch_size_change(saved, name):
    """A new patch size: the kernel is resampled (FlexiViT's PI-resize) and the model runs."""
    family = FAMILIES[name]
    _, folder = saved(name)
    size = family.new_size
    model = load_model(folder, num_classes=7, img_size=size, patch_size=family.new_patch)
    assert tuple(model.patch_embed.proj.weight.shape[-2:]) == (family.new_patch, family.new_patch)
    assert tuple(model.patch_embed.grid_size) == (size // family.new_patch, size // family.new_patch)
    _step(model, size)


@pytest.mark.parametrize("name", IDS)
def test_family_attention_draws_or_refuses(saved, name):
    """``finetune show attention`` draws global-attention families and refuses Swin's windows in words."""
    family = FAMILIES[name]
    original, folder = saved(name)
    model = load_model(folder, num_classes=7, img_size=family.new_size)
    x = torch.randn(1, 3, family.new_size, family.new_size)
    if not family.global_attention:
        with pytest.raises(GridError, match="not global attention.*attends within shifted attention windows"):
            attention_rollout(model, x)
        return
    grid = tuple(model.patch_embed.grid_size)
    rollout, last = attention_rollout(model, x), last_layer_attention(model, x)
    assert rollout.shape == (1, *grid) and last.shape[-2:] == grid
    assert (rollout >= 0).all() and float(rollout.sum()) <= 1 + 1e-5


def test_swin_saved_at_a_new_size_reloads_with_its_windows(saved, tmp_path):
    """Windows grown with the grid are recorded in config.json, so the saved model loads exactly."""
    _, folder = saved("swin")
    model = load_model(folder, num_classes=7, img_size=224)  # 56x56 grid: windows 7 -> 14
    assert tuple(model.layers[0].blocks[0].window_size) == (14, 14)
    again = load_model(save_model(model, tmp_path / "again"))
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(again.eval()(x), model.eval()(x))


def test_swin_windows_do_not_shrink_below_the_checkpoints(saved):
    """At 32 px timm's ratio rule would give 1x1 windows (no attention); the checkpoint's 7 is kept as the
    least window, and a stage grid under two windows (8x8) is one window of its own size, not 7 padded to 14."""
    _, folder = saved("swin")
    model = load_model(folder, num_classes=7, img_size=32)
    assert [tuple(layer.blocks[0].window_size) for layer in model.layers] == [(8, 8), (4, 4)]
    _step(model, 32)


def test_a_model_that_does_not_run_is_refused_at_load(saved, monkeypatch):
    """The load-time guarantee: a family model that fails its one check forward is a GridError naming
    what was resized and a size that works, not a crash at its first batch."""
    _, folder = saved("beit")

    def broken(self, x):
        raise RuntimeError("The size of tensor a (50) must match the size of tensor b (197)")

    monkeypatch.setattr(timm.models.beit.Beit, "forward", broken)
    with pytest.raises(GridError, match=r"cannot be adapted to 64x64 px.*relative position bias tables.*224x224"):
        load_model(folder, num_classes=7, img_size=64)


def test_check_forward_restores_training_mode(saved):
    original, _ = saved("eva02")
    model = original.train()
    check_runs_at_input_size(model, (224, 224))
    assert model.training
    original.eval()


def test_a_model_without_set_input_size_is_refused():
    model = timm.create_model("resnet10t", num_classes=3)
    with pytest.raises(GridError, match="Cannot resize the input of"):
        resize_model_input(model, 64)


@pytest.mark.parametrize("args, message", [
    ({"depths": [1] * 9}, "depths"),
    ({"window_size": "7"}, "window_size"),
    ({"window_size": [[7, 7, 7]]}, "window_size"),
    ({"num_heads": [0, 2]}, "num_heads"),
    ({"depths": [2, 1]}, "blocks per stage"),
    ({"checkpoint_path": "/etc/passwd"}, "checkpoint_path"),
])
def test_swin_config_args_are_checked_as_data(saved, tmp_path, args, message):
    """config.json's stage arguments are accepted within bounds and against the weights, never as code."""
    import json
    import shutil

    _, folder = saved("swin")
    copy = tmp_path / "swin"
    shutil.copytree(folder, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["model_args"].update(args)
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        load_model(copy, num_classes=7)


def test_unknown_mode_is_refused_for_every_family(saved):
    _, folder = saved("eva02")
    with pytest.raises(FinetuneError, match="Unknown position-embedding mode"):
        load_model(folder, num_classes=7, img_size=56, pos_embed_mode="lanczos")


@pytest.mark.parametrize("name, draws_attention, draws_pos_embed", [
    ("eva02", True, True), ("beit", True, False), ("swin", False, False), ("dinov2_reg", True, True),
])
def test_show_commands_draw_or_refuse_each_family(saved, tmp_path, name, draws_attention, draws_pos_embed):
    """``finetune show attention`` / ``pos-embed`` on a saved family model: a PNG, or exit 1 with a message."""
    from PIL import Image
    from typer.testing import CliRunner

    from finetune.cli import app

    _, folder = saved(name)
    photo = tmp_path / "cat.png"
    Image.new("RGB", (40, 30), (200, 40, 40)).save(photo)
    runner = CliRunner()
    for command, draws, refusal in (
        (["attention", str(folder), str(photo)], draws_attention, "not global attention"),
        (["pos-embed", str(folder)], draws_pos_embed, "no absolute position embedding"),
    ):
        result = runner.invoke(app, ["show", *command, "--out", str(tmp_path / f"{command[0]}.png")])
        if draws:
            assert result.exit_code == 0, result.output
            assert (tmp_path / f"{command[0]}.png").read_bytes().startswith(b"\x89PNG")
        else:
            assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
            assert refusal in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("name", IDS)
def test_family_adapted_and_saved_rebuilds_from_its_config(saved, tmp_path, name):
    """What a resumed run does: the adapted model saved, rebuilt from config.json alone, gives the same outputs."""
    import json

    from safetensors.torch import load_file

    from finetune.models.saving import model_from_config

    size = FAMILIES[name].new_size
    model = load_model(saved(name)[1], num_classes=7, img_size=size).eval()
    folder = save_model(model, tmp_path / "adapted")
    state = load_file(folder / "model.safetensors")
    rebuilt = model_from_config(json.loads((folder / "config.json").read_text()), state)
    rebuilt.load_state_dict(state)
    x = torch.randn(1, 3, size, size)
    torch.testing.assert_close(rebuilt.eval()(x), model(x))


def test_timms_own_refusal_is_a_message(saved, monkeypatch):
    """If timm's set_input_size itself refuses (another timm version, another signature), load_model says so."""
    _, folder = saved("swin")

    def refuse(self, **kwargs):
        raise TypeError("set_input_size() got an unexpected keyword argument 'window_size'")

    monkeypatch.setattr(timm.models.swin_transformer.SwinTransformer, "set_input_size", refuse)
    with pytest.raises(GridError, match=r"timm cannot resize .* to 64x64 px.*own size \(112x112 px\)"):
        load_model(folder, num_classes=7, img_size=64)


@pytest.mark.parametrize("name, size", [("eva02", 28), ("beit", 32), ("swin", 32), ("dinov2_reg", 28)])
def test_finetune_run_takes_a_family_as_model_source(saved, tmp_path, name, size):
    # The recipes need nothing new: model.source names the saved folder, model.img_size the new size.
    import json

    from conftest import REPO_ROOT
    from finetune.recipe import load_recipe
    from finetune.runs.run import run, run_dir_for

    _, folder = saved(name)
    recipe = load_recipe(REPO_ROOT / "recipes" / "quick_cpu.yaml", [
        f"output.dir={tmp_path}", f"name={name}", f"model.source={folder}", "model.arch=null",
        f"model.img_size={size}", f"data.synthetic_size={size}", "train.mode=full", "output.plots=false",
        "data.synthetic_train=64", "data.synthetic_test=32"])
    summary = run(recipe, quiet=True)
    assert summary["status"] == "finished" and summary["img_size"] == [size, size]
    config = json.loads((run_dir_for(recipe) / "config.json").read_text())
    reloaded = load_model(run_dir_for(recipe))  # the run's model folder loads as it was trained
    assert config["num_classes"] == 10 and reloaded(torch.zeros(1, 3, size, size)).shape == (1, 10)
