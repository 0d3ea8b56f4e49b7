"""Trust, round 4: model families and loading. Each test failed before its fix.

Swin's windows at small sizes and Swin V2's continuous position bias are checked against timm's own
model built natively at the new size (timm's constructor and its ``checkpoint_filter_fn``); the rest
are saved folders and files damaged the way a user meets them. Tiny random models, CPU, seconds.
"""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from finetune import CheckpointError, FinetuneError, create_model, load_model, save_model
from finetune.models.pos_embed import fit_window, resize_pos_embed, stage_window_sizes

SWIN = "swin_tiny_patch4_window7_224"
SWINV2 = "swinv2_tiny_window8_256"
# Swin-T's own stages, windows and patches at tiny widths: 4 stages, window 7, 224 px (56x56 grid).
SWIN_T = dict(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
# The families test's tiny Swins: 2 stages at a 28x28 (window 7) or 32x32 (window 8) grid.
SWIN_SMALL = dict(depths=(1, 1), embed_dim=16, num_heads=(1, 2))


def _saved(tmp_path, arch: str, name: str, **args):
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=5, **args).eval()
    return model, save_model(model, tmp_path / name)


def _padding(side: int, window: int) -> int:
    """Zero tokens timm adds to a stage side of ``side`` tokens for ``window``-token windows."""
    return -side % window


def _rewrite(folder, change) -> None:
    """Change a saved folder's weights and drop its checksum, as a folder copied without one would be."""
    weights = load_file(folder / "model.safetensors")
    change(weights)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config.pop("weights_sha256")
    (folder / "config.json").write_text(json.dumps(config))


# ------------------------------------------------------------------------------------------
# Swin: windows at small sizes


def test_swin_t_at_32px_pads_no_stage(tmp_path):
    # Swin-T at 32 px: stage 0 is an 8x8 grid. Its window stayed 7, which timm pads to 14x14 with
    # unmasked zero tokens (64 real of 196, 3x the compute). Each stage is now one window of its grid.
    _, folder = _saved(tmp_path, SWIN, "swin_t", **SWIN_T)
    model = load_model(folder, img_size=32)
    stages = [(tuple(layer.blocks[0].input_resolution), tuple(layer.blocks[0].window_size)) for layer in model.layers]
    assert stages == [((8, 8), (8, 8)), ((4, 4), (4, 4)), ((2, 2), (2, 2)), ((1, 1), (1, 1))]
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 5)


@pytest.mark.parametrize("img_size", range(32, 737, 24))
def test_swin_t_windows_never_pad_a_stage_beyond_its_needs(img_size):
    # Every stage at every size: fewer padding tokens per side than windows (so less than one
    # window's worth), none for a stage under two windows, and never a window below the checkpoint's
    # 7 unless the stage itself is smaller. Built on the meta device: the rule alone, at no cost.
    with torch.device("meta"):
        model = timm.create_model(SWIN, **SWIN_T)
    grid = img_size // 4
    windows = stage_window_sizes(model, (grid, grid))
    side = grid
    for stage, (window, _) in enumerate(windows):
        side = side if stage == 0 else (side + 1) // 2
        count = math.ceil(side / window)
        assert _padding(side, window) < count, (img_size, stage, side, window)
        if side < 2 * 7:
            assert window == side
        assert window >= min(side, 7)


def test_fit_window_keeps_a_window_that_divides_the_stage():
    # The checkpoints' own layouts are untouched: Swin-T's stages at 224 px (window 7) and at 384 px (window 12).
    assert [fit_window(side, 7) for side in (56, 28, 14, 7)] == [7, 7, 7, 7]
    assert [fit_window(side, 12) for side in (96, 48, 24, 12)] == [12, 12, 12, 12]
    assert [fit_window(side, 7) for side in (8, 13, 16, 15, 4)] == [8, 13, 8, 8, 4]


@pytest.mark.parametrize("img_size", [32, 48, 64, 160, 224])
def test_swin_resized_equals_timms_model_built_at_that_size(tmp_path, img_size):
    # The same windows asked of timm's constructor, the checkpoint loaded through timm's own
    # checkpoint_filter_fn (which resizes each relative table to its block's window): the same
    # tensors, the same buffers, the same outputs.
    original, folder = _saved(tmp_path, SWIN, "swin", img_size=112, **SWIN_SMALL)
    model = load_model(folder, img_size=img_size).eval()
    windows = [tuple(w) for w in model.finetune_spec["model_args"]["window_size"]]  # what config.json records
    for layer, window in zip(model.layers, windows):
        side = layer.blocks[0].input_resolution[0]
        assert _padding(side, layer.blocks[0].window_size[0]) < math.ceil(side / window[0])
    native = timm.create_model(SWIN, num_classes=5, img_size=img_size, window_size=windows, **SWIN_SMALL).eval()
    filtered = timm.models.swin_transformer.checkpoint_filter_fn(original.state_dict(), native)
    native.load_state_dict(filtered, strict=True)
    ours, theirs = model.state_dict(), native.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)
    for (name, buffer), (_, other) in zip(model.named_buffers(), native.named_buffers()):
        assert (buffer is None) == (other is None) and (buffer is None or torch.equal(buffer, other)), name
    x = torch.randn(2, 3, img_size, img_size)
    torch.testing.assert_close(model(x), native(x))


# ------------------------------------------------------------------------------------------
# Swin V2: the continuous position bias keeps the offsets it learned


def _cpb_bias(attn) -> torch.Tensor:
    """An attention's bias per relative offset: ``(2 Wh - 1, 2 Ww - 1, heads)``, as its forward makes it."""
    table = attn.cpb_mlp(attn.relative_coords_table).view(-1, attn.num_heads)
    h, w = attn.window_size
    return (16 * torch.sigmoid(table)).view(2 * h - 1, 2 * w - 1, attn.num_heads)


@pytest.mark.parametrize("img_size, windows", [(160, (10, 10)), (32, (8, 4))])
def test_swinv2_bias_keeps_the_offsets_it_learned(tmp_path, img_size, windows):
    # Windows 8 -> 10 at 160 px: timm divided the offsets by the new window - 1 (9) instead of the
    # learned 7, so each offset read the bias learned for a smaller one. Now every offset the two
    # windows share gives the bias it gave (timm's pretrained_window_size rule), at 160 px and at 32
    # px (stage 1 there is a 4x4 grid, one window of 4).
    original, folder = _saved(tmp_path, SWINV2, "swinv2", img_size=128, **SWIN_SMALL)
    model = load_model(folder, num_classes=7, img_size=img_size).eval()
    with torch.no_grad():
        for layer, old_layer, window in zip(model.layers, original.layers, windows):
            attn, old = layer.blocks[0].attn, old_layer.blocks[0].attn
            assert tuple(attn.window_size) == (window, window) and tuple(attn.pretrained_window_size) == (8, 8)
            new_bias, old_bias = _cpb_bias(attn), _cpb_bias(old)
            torch.testing.assert_close(new_bias[window - 1, window - 1], old_bias[7, 7])  # zero offset
            shared = min(window, 8) - 1  # offsets -shared..shared are in both tables
            new_part = new_bias[window - 1 - shared:window + shared, window - 1 - shared:window + shared]
            torch.testing.assert_close(new_part, old_bias[7 - shared:8 + shared, 7 - shared:8 + shared])
    assert model.finetune_spec["model_args"]["pretrained_window_sizes"] == [[8, 8], [8, 8]]


def test_swinv2_resized_equals_timms_model_built_with_its_pretrained_window(tmp_path):
    # timm's own model at 160 px with window 10 and pretrained_window_sizes=8: the same buffers and outputs;
    # and the saved folder records the pretrained windows, so it rebuilds the same.
    original, folder = _saved(tmp_path, SWINV2, "swinv2", img_size=128, **SWIN_SMALL)
    model = load_model(folder, img_size=160).eval()
    native = timm.create_model(SWINV2, num_classes=5, img_size=160, window_size=10, pretrained_window_sizes=(8, 8),
                               **SWIN_SMALL).eval()
    native.load_state_dict(timm.models.swin_transformer_v2.checkpoint_filter_fn(original.state_dict(), native))
    for (name, buffer), (_, other) in zip(model.named_buffers(), native.named_buffers()):
        assert (buffer is None) == (other is None) and (buffer is None or torch.equal(buffer, other)), name
    x = torch.randn(2, 3, 160, 160)
    torch.testing.assert_close(model(x), native(x))
    saved = save_model(model, tmp_path / "again")
    assert json.loads((saved / "config.json").read_text())["model_args"]["pretrained_window_sizes"] == [[8, 8], [8, 8]]
    again = load_model(saved).eval()
    assert all(tuple(layer.blocks[0].attn.pretrained_window_size) == (8, 8) for layer in again.layers)
    torch.testing.assert_close(again(x), model(x))


def test_swinv2_pretrained_window_sizes_are_checked_as_data(tmp_path):
    _, folder = _saved(tmp_path, SWINV2, "swinv2", img_size=128, **SWIN_SMALL)
    config = json.loads((folder / "config.json").read_text())
    config["model_args"]["pretrained_window_sizes"] = [[8, 8, 8]]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="pretrained_window_sizes"):
        load_model(folder)


# ------------------------------------------------------------------------------------------
# Saved folders that disagree with themselves, and load_model's arguments


@pytest.fixture
def tiny_vit(tmp_path):
    """A saved 2-block ViT: 32 px, 8-px patches (a 4x4 grid), width 32, 10 classes."""
    torch.manual_seed(0)
    return save_model(create_model("vit_tiny_test", num_classes=10), tmp_path / "tiny")


def test_a_config_size_that_disagrees_with_pos_embed_is_refused_at_load(tiny_vit):
    # config.json says 32 px, pos_embed holds a 2x2 grid: it loaded as a 16-px model without a word,
    # and its first 32-px batch failed with timm's AssertionError.
    _rewrite(tiny_vit, lambda w: w.update(pos_embed=resize_pos_embed(w["pos_embed"], 2)))
    with pytest.raises(CheckpointError, match=r"img_size 32x32 .*4x4 patches.* holds 4 grid positions, a 2x2 grid "
                                              r"\(16x16 px\).*model_args.img_size to \[16, 16\]"):
        load_model(tiny_vit)
    with pytest.raises(CheckpointError, match="img_size 32x32"):
        load_model(tiny_vit, num_classes=3, img_size=32)


def test_a_weights_file_without_a_recorded_size_still_loads_at_its_own_grid(tmp_path):
    # What the check leaves alone: a bare file records no size and is built at its pos_embed's grid.
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", num_classes=3, img_size=64, depth=1)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    loaded = load_model(tmp_path / "w.safetensors", arch="deit_tiny_patch16_224", depth=1)
    assert tuple(loaded.patch_embed.img_size) == (64, 64)


@pytest.mark.parametrize("flag", ["strict", "use_ema", "antialias"])
@pytest.mark.parametrize("value", ["no", "false", 0, None])
def test_load_model_flags_must_be_true_or_false(tiny_vit, flag, value):
    # strict='no' loaded strictly: any non-empty string is true.
    with pytest.raises(FinetuneError, match=rf"{flag} must be True or False"):
        load_model(tiny_vit, **{flag: value})


def test_load_model_strict_false_still_loads_what_fits(tiny_vit):
    _rewrite(tiny_vit, lambda w: w.pop("blocks.1.mlp.fc2.bias"))
    with pytest.warns(UserWarning, match="blocks.1.mlp.fc2.bias"):
        model = load_model(tiny_vit, strict=False)
    assert model.load_report.missing == ["blocks.1.mlp.fc2.bias"]


def test_integer_weights_are_refused_by_name(tiny_vit):
    # int8 weights were cast to float without a word: a quantized file's integers without their scales.
    _rewrite(tiny_vit, lambda w: w.update({"cls_token": w["cls_token"].mul(100).to(torch.int8),
                                           "blocks.0.attn.qkv.weight": w["blocks.0.attn.qkv.weight"].to(torch.int32)}))
    with pytest.raises(CheckpointError, match=r"2 tensors of whole numbers") as err:
        load_model(tiny_vit)
    assert "cls_token (int8)" in str(err.value) and "blocks.0.attn.qkv.weight (int32)" in str(err.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_by_name(tiny_vit, tmp_path, bad):
    # NaN weights loaded without a word when the folder had no checksum; a single weights file too.
    def poison(w):
        w["blocks.1.attn.proj.weight"][3, 4] = bad

    _rewrite(tiny_vit, poison)
    with pytest.raises(CheckpointError, match=r"NaN or infinite weights in 1 tensors: blocks.1.attn.proj.weight "
                                              r"\(1 of 1,024\)"):
        load_model(tiny_vit, num_classes=3)
    with pytest.raises(CheckpointError, match="blocks.1.attn.proj.weight"):
        load_model(tiny_vit / "model.safetensors", arch="vit_tiny_test")


def test_half_precision_and_huge_finite_weights_still_load(tiny_vit):
    # What the checks leave alone: float16 casts exactly; a tensor whose float32 sum overflows is finite.
    def change(w):
        w["blocks.0.mlp.fc1.weight"] = w["blocks.0.mlp.fc1.weight"].half()
        w["blocks.0.norm1.weight"] = torch.full_like(w["blocks.0.norm1.weight"], 3e38)

    _rewrite(tiny_vit, change)
    expected = load_file(tiny_vit / "model.safetensors")
    model = load_model(tiny_vit)
    assert torch.equal(model.blocks[0].mlp.fc1.weight.detach(), expected["blocks.0.mlp.fc1.weight"].float())
    assert torch.equal(model.blocks[0].norm1.weight.detach(), expected["blocks.0.norm1.weight"])


@pytest.mark.parametrize("build", ["load", "create"])
def test_a_billion_classes_is_refused_before_allocating(tiny_vit, build):
    # load_model(num_classes=10**9) asked the allocator for 128 GB; now the bound config.json is held to.
    with pytest.raises(FinetuneError, match=r"num_classes must be a whole number of classes, 1 or more "
                                            r"\(at most 1,000,000\); got 1000000000"):
        if build == "load":
            load_model(tiny_vit, num_classes=10**9)
        else:
            create_model("vit_tiny_test", num_classes=10**9)


@pytest.mark.parametrize("drop, missing", [("head.weight", "head.weight"), ("head.bias", "head.bias")])
def test_a_missing_head_tensor_is_named_as_missing(tiny_vit, drop, missing):
    # Without head.weight the model was built headless, so the message called head.bias an extra tensor.
    _rewrite(tiny_vit, lambda w: w.pop(drop))
    with pytest.raises(CheckpointError) as err:
        load_model(tiny_vit)
    message = str(err.value)
    assert f"missing from the checkpoint: {missing}." in message and "not in the model" not in message
    assert "  " not in message


def test_swinv2_resized_by_hand_and_saved_rebuilds_the_same(tmp_path):
    # resize_model_input on a model timm built, then save_model: config.json comes from timm's own record
    # of its constructor arguments, which must carry the pretrained windows as well as the new ones.
    from finetune.models.pos_embed import resize_model_input

    torch.manual_seed(0)
    model = timm.create_model(SWINV2, num_classes=5, img_size=128, **SWIN_SMALL).eval()
    resize_model_input(model, 160)
    folder = save_model(model, tmp_path / "by_hand")
    assert json.loads((folder / "config.json").read_text())["model_args"]["pretrained_window_sizes"] == [[8, 8], [8, 8]]
    x = torch.randn(1, 3, 160, 160)
    torch.testing.assert_close(load_model(folder).eval()(x), model(x))
