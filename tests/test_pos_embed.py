"""resize_pos_embed and resize_model_input: modes, prefix tokens, grids, and timm equivalence."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed

from finetune import GridError, resize_model_input, resize_pos_embed


def _pe(prefix: int, h: int, w: int, dim: int = 8, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, prefix + h * w, dim, generator=g).to(dtype)


GRIDS = [
    ((14, 14), (2, 2), False),  # the course's 224 -> 32 shrink, old grid inferred
    ((14, 14), (24, 24), False),  # grow
    ((14, 14), (8, 12), False),  # square -> non-square
    ((6, 10), (4, 5), True),  # non-square -> non-square, old grid given
    ((6, 10), (12, 7), True),
]


@pytest.mark.parametrize("mode", ["bicubic", "bilinear", "nearest"])
@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("prefix", [0, 1, 2])
@pytest.mark.parametrize("old,new,give_old", GRIDS)
def test_interpolation_matches_timm(mode, antialias, prefix, old, new, give_old):
    pe = _pe(prefix, *old)
    ours = resize_pos_embed(
        pe, new, old_grid=old if give_old else None, num_prefix_tokens=prefix, mode=mode, antialias=antialias
    )
    # torch only antialiases bilinear/bicubic; timm passes the flag through, so ask it without.
    ref = resample_abs_pos_embed(
        pe, list(new), old_size=list(old), num_prefix_tokens=prefix, interpolation=mode,
        antialias=antialias and mode != "nearest",
    )
    assert ours.shape == (1, prefix + new[0] * new[1], pe.shape[-1])
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(ours[:, :prefix], pe[:, :prefix])  # prefix slots bit-exact


@pytest.mark.parametrize("mode", ["bicubic", "bilinear", "nearest", "truncate", "crop"])
@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_prefix_tokens_bit_exact_and_dtype_kept(mode, prefix):
    pe = _pe(prefix, 14, 14, dtype=torch.bfloat16)
    out = resize_pos_embed(pe, (3, 5), num_prefix_tokens=prefix, mode=mode)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[:, :prefix], pe[:, :prefix])
    assert out.shape[1] == prefix + 15


@pytest.mark.parametrize("mode", ["bicubic", "truncate", "crop"])
def test_same_grid_returns_input_unchanged(mode):
    pe = _pe(1, 7, 7)
    assert resize_pos_embed(pe, 7, mode=mode) is pe
    pe = _pe(2, 3, 5)
    assert resize_pos_embed(pe, (3, 5), old_grid=(3, 5), num_prefix_tokens=2, mode=mode) is pe


def test_truncate_keeps_first_positions_like_the_course():
    pe = _pe(1, 14, 14)
    out = resize_pos_embed(pe, 2, mode="truncate")
    # The course: keep the first 5 of 197 slots (cls + 4 positions of the top row).
    assert torch.equal(out, pe[:, :5])


def test_crop_keeps_top_left_window():
    pe = _pe(2, 6, 10)
    out = resize_pos_embed(pe, (2, 3), old_grid=(6, 10), num_prefix_tokens=2, mode="crop")
    grid = pe[:, 2:].reshape(1, 6, 10, -1)
    expected = torch.cat([pe[:, :2], grid[:, :2, :3].reshape(1, 6, -1)], dim=1)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("mode", ["truncate", "crop"])
def test_truncate_or_crop_to_larger_grid_suggests_interpolation(mode):
    with pytest.raises(GridError, match="bicubic"):
        resize_pos_embed(_pe(1, 2, 2), 3, mode=mode)


def test_crop_taller_than_old_grid_is_an_error():
    with pytest.raises(GridError, match="larger"):
        resize_pos_embed(_pe(1, 4, 10), (5, 2), old_grid=(4, 10), mode="crop")


def test_non_square_old_grid_must_be_given():
    with pytest.raises(GridError, match="old_grid"):
        resize_pos_embed(_pe(1, 6, 10), (3, 5))
    with pytest.raises(GridError, match="slots"):
        resize_pos_embed(_pe(1, 6, 10), (3, 5), old_grid=(5, 5))


def test_unknown_mode_lists_modes():
    with pytest.raises(GridError, match="truncate"):
        resize_pos_embed(_pe(1, 4, 4), 2, mode="lanczos")


# ------------------------------------------------------------------------------------------
# On a model


def test_model_resize_keeps_patch_embed_consistent_and_runs():
    model = timm.create_model("deit_tiny_patch16_224", num_classes=10, depth=2)
    resize_model_input(model, 32, mode="truncate")
    assert model.patch_embed.img_size == (32, 32)
    assert model.patch_embed.grid_size == (2, 2)
    assert model.patch_embed.num_patches == 4
    assert model.pos_embed.shape == (1, 5, 192)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_model_resize_with_new_patch_matches_timm_set_input_size():
    torch.manual_seed(0)
    ours = timm.create_model("deit_tiny_patch16_224", depth=1)
    ref = timm.create_model("deit_tiny_patch16_224", depth=1)
    ref.load_state_dict(ours.state_dict())
    old_kernel = ours.patch_embed.proj.weight.detach().clone()
    resize_model_input(ours, 32, patch_size=4, mode="bicubic")
    assert ours.patch_embed.proj.weight.shape == (192, 3, 4, 4)
    torch.testing.assert_close(ours.patch_embed.proj.weight, resample_patch_embed(old_kernel, [4, 4]))
    assert ours.patch_embed.grid_size == (8, 8) and ours.patch_embed.patch_size == (4, 4)
    assert ours(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
    if hasattr(ref, "set_input_size"):  # timm's own bicubic path, where this timm has it
        ref.set_input_size(img_size=(32, 32), patch_size=(4, 4))
        torch.testing.assert_close(ours.pos_embed, ref.pos_embed)
        torch.testing.assert_close(ours.patch_embed.proj.weight, ref.patch_embed.proj.weight)


def test_model_resize_distilled_keeps_two_prefix_slots():
    model = timm.create_model("deit_tiny_distilled_patch16_224", depth=1)
    before = model.pos_embed.detach().clone()
    resize_model_input(model, (48, 64), mode="bilinear")
    assert model.pos_embed.shape == (1, 2 + 3 * 4, 192)
    assert torch.equal(model.pos_embed[:, :2], before[:, :2])
    assert model(torch.randn(1, 3, 48, 64)).shape == (1, 1000)


def test_model_resize_keeps_requires_grad():
    model = timm.create_model("deit_tiny_patch16_224", depth=1)
    model.requires_grad_(False)
    resize_model_input(model, 64, patch_size=8)
    assert not model.pos_embed.requires_grad and not model.patch_embed.proj.weight.requires_grad


@pytest.mark.parametrize("img,patch", [(30, None), (224, 15), ((32, 50), 16)])
def test_image_size_not_divisible_by_patch_is_an_error(img, patch):
    model = timm.create_model("deit_tiny_patch16_224", depth=1)
    with pytest.raises(GridError, match="not divisible"):
        resize_model_input(model, img, patch_size=patch)
