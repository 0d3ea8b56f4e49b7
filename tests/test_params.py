"""Trainable parts and parameter groups."""

from __future__ import annotations

import pytest
import timm
import torch

from finetune import FinetuneError, count_parameters, param_groups, set_trainable


@pytest.fixture
def deit():
    return timm.create_model("deit_tiny_patch16_224", num_classes=10, depth=4)


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_head_only_is_a_linear_probe(deit):
    counts = set_trainable(deit, "head")
    assert _trainable(deit) == {"head.weight", "head.bias"}
    assert counts.trainable == 192 * 10 + 10
    assert counts.total == sum(p.numel() for p in deit.parameters())


def test_head_only_on_distilled_trains_both_heads():
    model = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=10, depth=1)
    set_trainable(model, "head")
    assert _trainable(model) == {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"}


@pytest.mark.parametrize("mode", ["full", "scratch"])
def test_full_trains_everything(deit, mode):
    set_trainable(deit, "head")
    counts = set_trainable(deit, mode)
    assert counts.trainable == counts.total


def test_last_k_trains_last_blocks_norm_and_head(deit):
    set_trainable(deit, "last_k", last_k=2)
    names = _trainable(deit)
    assert any(n.startswith("blocks.3.") for n in names) and any(n.startswith("blocks.2.") for n in names)
    assert not any(n.startswith(("blocks.1.", "blocks.0.", "patch_embed", "pos_embed", "cls_token")) for n in names)
    assert {"norm.weight", "norm.bias", "head.weight", "head.bias"} <= names


@pytest.mark.parametrize("k", [0, 5])
def test_last_k_out_of_range(deit, k):
    with pytest.raises(FinetuneError, match="between 1 and 4"):
        set_trainable(deit, "last_k", last_k=k)


def test_unknown_mode(deit):
    with pytest.raises(FinetuneError, match="last_k"):
        set_trainable(deit, "everything")


def test_no_weight_decay_on_norms_biases_and_tokens(deit):
    groups = param_groups(deit, weight_decay=0.05)
    by_id = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(deit.named_parameters())
    for name in ("pos_embed", "cls_token", "norm.weight", "blocks.0.norm1.bias", "head.bias"):
        assert by_id[id(named[name])] == 0.0, name
    for name in ("blocks.0.attn.qkv.weight", "head.weight", "patch_embed.proj.weight"):
        assert by_id[id(named[name])] == 0.05, name


def test_param_groups_skip_frozen(deit):
    set_trainable(deit, "head")
    groups = param_groups(deit, weight_decay=0.05)
    assert sum(p.numel() for g in groups for p in g["params"]) == count_parameters(deit).trainable


def test_layer_decay_scales_grow_towards_the_head(deit):
    groups = param_groups(deit, weight_decay=0.05, layer_decay=0.5)
    named = dict(deit.named_parameters())
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    s_embed = scale[id(named["patch_embed.proj.weight"])]
    s_b0 = scale[id(named["blocks.0.attn.qkv.weight"])]
    s_b3 = scale[id(named["blocks.3.attn.qkv.weight"])]
    s_head = scale[id(named["head.weight"])]
    assert s_embed < s_b0 < s_b3 < s_head == 1.0
    assert s_b0 / s_embed == pytest.approx(2.0)
    torch.optim.AdamW(groups, lr=1e-3)  # the groups are valid optimizer input
