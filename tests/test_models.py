"""load_model from every source, the exactness of what loads, and every bad input."""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_patch_embed

import finetune.models.sources as ckpt_mod
from finetune import (
    CheckpointError,
    FinetuneError,
    GridError,
    OfflineError,
    SourceNotFoundError,
    create_model,
    load_model,
    resize_pos_embed,
    save_model,
)
from conftest import HUB_REPO, HUB_REVISION, random_state_dict


def assert_loaded_exactly(model, state_dict, skip=("head.", "head_dist.")):
    """Every tensor outside the new head equals the checkpoint's, bit for bit."""
    model_sd = model.state_dict()
    checked = 0
    for name, value in state_dict.items():
        if name.startswith(skip):
            continue
        assert torch.equal(model_sd[name], value), name
        checked += 1
    assert checked == len([k for k in model_sd if not k.startswith(skip)])


# ------------------------------------------------------------------------------------------
# Hub sources, offline


@pytest.mark.parametrize(
    "source",
    ["deit_tiny_patch16_224", "deit_tiny_patch16_224.fb_in1k", f"hf-hub:{HUB_REPO}", f"hf-hub:{HUB_REPO}@{HUB_REVISION}"],
)
def test_hub_cache_loads_with_hub_offline(source, hub_cache, deit_tiny_sd, no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_model(source, num_classes=10)
    assert_loaded_exactly(model, deit_tiny_sd)
    assert model.head.out_features == 10
    assert model.load_report.new_head == ["head.weight", "head.bias"]
    assert model.pretrained_cfg["mean"] == [0.485, 0.456, 0.406]
    assert model.pretrained_cfg["num_classes"] == 10


def test_hub_cache_loads_without_network_even_when_not_forced_offline(hub_cache, deit_tiny_sd, no_network, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(ckpt_mod, "endpoint_reachable", lambda *a, **k: pytest.fail("probed the network"))
    model = load_model("deit_tiny_patch16_224", num_classes=3)
    assert_loaded_exactly(model, deit_tiny_sd)


def test_hub_snapshot_folder_is_a_local_source(hub_cache, deit_tiny_sd):
    snapshot = hub_cache / f"models--{HUB_REPO.replace('/', '--')}" / "snapshots" / HUB_REVISION
    model = load_model(snapshot, num_classes=10)
    assert_loaded_exactly(model, deit_tiny_sd)


def test_uncached_hub_model_fails_fast_and_says_how_to_fix(tmp_path, no_network, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.monotonic()
    with pytest.raises(OfflineError) as err:
        load_model("deit_tiny_patch16_224", num_classes=10)
    assert time.monotonic() - start < 5
    msg = str(err.value)
    assert HUB_REPO in msg
    assert str(tmp_path / "empty-cache") in msg
    assert "hf download" in msg and "local weights file" in msg


def test_uncached_hub_model_with_hf_hub_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError, match="HF_HUB_OFFLINE"):
        load_model("hf-hub:timm/vit_tiny_patch16_224.augreg_in21k")


# ------------------------------------------------------------------------------------------
# Local files


def test_deit_release_pth_infers_arch_from_name(deit_release_pth, deit_tiny_sd):
    model = load_model(deit_release_pth, num_classes=10)
    assert model.load_report.arch == "deit_tiny_patch16_224"
    assert_loaded_exactly(model, deit_tiny_sd)


def test_bare_pth_needs_arch(tmp_path, deit_tiny_sd):
    path = tmp_path / "my_weights.pth"
    torch.save(deit_tiny_sd, path)
    with pytest.raises(CheckpointError, match="arch="):
        load_model(path, num_classes=10)
    model = load_model(path, arch="deit_tiny_patch16_224", num_classes=10)
    assert_loaded_exactly(model, deit_tiny_sd)


def test_safetensors_file(safetensors_file, deit_tiny_sd):
    model = load_model(safetensors_file, arch="deit_tiny_patch16_224", num_classes=7)
    assert_loaded_exactly(model, deit_tiny_sd)
    assert model.head.out_features == 7


def test_timm_training_checkpoint_state_dict_and_ema(timm_train_checkpoint, deit_tiny_sd):
    model = load_model(timm_train_checkpoint, num_classes=10)  # arch read from the checkpoint
    assert_loaded_exactly(model, deit_tiny_sd)
    ema = load_model(timm_train_checkpoint, num_classes=10, use_ema=True)
    assert torch.equal(ema.cls_token, deit_tiny_sd["cls_token"] + 1.0)


def test_use_ema_without_ema_weights_is_an_error_not_the_live_weights(tmp_path, deit_tiny_sd):
    # A timm training checkpoint saved without --model-ema has state_dict only.
    path = tmp_path / "checkpoint-3.pth.tar"
    torch.save({"epoch": 3, "arch": "deit_tiny_patch16_224", "state_dict": deit_tiny_sd}, path)
    with pytest.raises(CheckpointError, match="has no EMA weights"):
        load_model(path, num_classes=10, use_ema=True)
    assert_loaded_exactly(load_model(path, num_classes=10), deit_tiny_sd)


@pytest.mark.parametrize("prefix", ["module._orig_mod.", "_orig_mod.module.", "module.", "_orig_mod."])
def test_prefixed_keys_from_ddp_and_compile(tmp_path, deit_tiny_sd, prefix):
    # DDP wraps a compiled model or torch.compile wraps a DDP one: both orders are stripped.
    path = tmp_path / "deit_tiny_patch16_224_ddp.pth"
    torch.save({"state_dict": {f"{prefix}{k}": v for k, v in deit_tiny_sd.items()}}, path)
    assert_loaded_exactly(load_model(path, num_classes=10), deit_tiny_sd)


def test_keeping_the_checkpoint_head(deit_release_pth, deit_tiny_sd):
    model = load_model(deit_release_pth)
    assert_loaded_exactly(model, deit_tiny_sd, skip=())
    assert model.load_report.new_head == []


def test_distilled_checkpoint_gets_two_fresh_heads(distilled_pth, deit_tiny_distilled_sd):
    model = load_model(distilled_pth, num_classes=10, img_size=32, pos_embed_mode="bicubic")
    assert model.load_report.new_head == ["head.weight", "head.bias", "head_dist.weight", "head_dist.bias"]
    assert model.head.out_features == 10 and model.head_dist.out_features == 10
    assert torch.equal(model.dist_token, deit_tiny_distilled_sd["dist_token"])
    expected = resize_pos_embed(deit_tiny_distilled_sd["pos_embed"], 2, num_prefix_tokens=2)
    assert torch.equal(model.pos_embed, expected)
    assert torch.equal(model.pos_embed[:, :2], deit_tiny_distilled_sd["pos_embed"][:, :2])
    assert_loaded_exactly(model, deit_tiny_distilled_sd, skip=("head", "pos_embed"))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_fresh_head_is_timm_fine_tune_init(deit_release_pth):
    torch.manual_seed(0)
    model = load_model(deit_release_pth, num_classes=10)
    assert torch.count_nonzero(model.head.bias) == 0
    assert 0.01 < model.head.weight.std().item() < 0.03


@pytest.mark.parametrize("mode", ["bicubic", "bilinear", "nearest", "truncate", "crop"])
def test_resize_on_load_equals_the_tensor_function(mode, deit_release_pth, deit_tiny_sd):
    model = load_model(deit_release_pth, num_classes=10, img_size=32, pos_embed_mode=mode)
    assert torch.equal(model.pos_embed, resize_pos_embed(deit_tiny_sd["pos_embed"], 2, mode=mode))
    assert model.load_report.resized["pos_embed"] == ((1, 197, 192), (1, 5, 192))
    assert_loaded_exactly(model, deit_tiny_sd, skip=("head", "pos_embed"))
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_new_patch_size_resamples_the_kernel(deit_release_pth, deit_tiny_sd):
    model = load_model(deit_release_pth, num_classes=10, img_size=32, patch_size=4)
    kernel = resample_patch_embed(deit_tiny_sd["patch_embed.proj.weight"], [4, 4])
    torch.testing.assert_close(model.patch_embed.proj.weight, kernel)
    assert torch.equal(model.patch_embed.proj.bias, deit_tiny_sd["patch_embed.proj.bias"])
    assert model.pos_embed.shape == (1, 65, 192)
    assert_loaded_exactly(model, deit_tiny_sd, skip=("head", "pos_embed", "patch_embed.proj.weight"))
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)


def test_checkpoint_at_another_grid_loads_exactly_then_adapts(tmp_path):
    # A checkpoint fine-tuned at 384 px (24x24 grid) loads at its own grid first.
    sd = random_state_dict("deit_tiny_patch16_224", seed=5, depth=1, img_size=384)
    path = tmp_path / "deit384.safetensors"
    save_file(sd, str(path))
    model = load_model(path, arch="deit_tiny_patch16_224", depth=1, num_classes=10, img_size=224)
    expected = resize_pos_embed(sd["pos_embed"], 14)
    assert torch.equal(model.pos_embed, expected)
    assert_loaded_exactly(model, sd, skip=("head", "pos_embed"))


def test_save_and_reload_round_trip(tmp_path, deit_release_pth):
    model = load_model(deit_release_pth, num_classes=10, img_size=32, patch_size=8)
    save_model(model, tmp_path / "run", class_names=[f"c{i}" for i in range(10)])
    for source in (tmp_path / "run", tmp_path / "run" / "model.safetensors"):
        again = load_model(source)
        assert_loaded_exactly(again, model.state_dict(), skip=())
        assert again.pretrained_cfg["label_names"] == [f"c{i}" for i in range(10)]
        assert again.patch_embed.patch_size == (8, 8)
    assert not list((tmp_path / "run").glob(".*tmp"))


def test_presets_build_the_course_lab_model():
    model = create_model("vit_lab", num_classes=10)
    assert model.patch_embed.patch_size == (4, 4) and model.patch_embed.grid_size == (8, 8)
    assert model.embed_dim == 64 and len(model.blocks) == 12 and model.blocks[0].attn.num_heads == 8
    assert model.global_pool == "avg"
    assert model.blocks[0].mlp.fc1.out_features == 256  # MLP ratio 4
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)


def test_conv_tokenizer_preset_builds_an_8x8_grid_and_round_trips(tmp_path):
    model = create_model("vit_cifar_conv", num_classes=10)
    assert model.patch_embed.grid_size == (8, 8) and model.pos_embed.shape == (1, 64, 128)
    assert model.cls_token is None and model.global_pool == "avg" and len(model.blocks) == 4
    convs = [m for m in model.patch_embed.backbone if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128] and model.patch_embed.proj.kernel_size == (1, 1)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    save_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m").eval()
    assert_loaded_exactly(again, model.state_dict(), skip=())
    assert torch.equal(again(x), model(x))
    # Another image size keeps the stem's stride: 64 px gives a 16x16 grid, the pos_embed resized.
    bigger = load_model(tmp_path / "m", img_size=64)
    assert bigger.patch_embed.grid_size == (16, 16) and bigger(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    with pytest.raises(GridError, match="multiple of the conv stem"):
        create_model("vit_cifar_conv", num_classes=10, img_size=30)


def test_scratch_model_round_trip(tmp_path):
    model = create_model("vit_tiny_test", num_classes=4)
    save_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert_loaded_exactly(again, model.state_dict(), skip=())


# ------------------------------------------------------------------------------------------
# Bad input


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(SourceNotFoundError, match="deit_tiny_patch16_224"):
        load_model("deit_tiny_patch16_244", num_classes=10)


def test_unknown_tag_lists_valid_tags():
    with pytest.raises(SourceNotFoundError, match="fb_in1k"):
        load_model("deit_tiny_patch16_224.in22k", num_classes=10)


def test_missing_file(tmp_path):
    with pytest.raises(SourceNotFoundError, match="No such file"):
        load_model(tmp_path / "nope.pth", num_classes=10)


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224-x.pth", "w.safetensors"])
def test_corrupt_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(path, arch="deit_tiny_patch16_224", num_classes=10)


def test_truncated_safetensors(tmp_path, safetensors_file):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(safetensors_file.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(path, arch="deit_tiny_patch16_224")


def test_checkpoint_of_another_architecture_names_keys_and_shapes(deit_release_pth):
    with pytest.raises(CheckpointError) as err:
        load_model(deit_release_pth, arch="deit_small_patch16_224", num_classes=10)
    msg = str(err.value)
    assert "blocks.0.attn.qkv.weight" in msg or "cls_token: checkpoint [1, 1, 192] vs model [1, 1, 384]" in msg
    assert "embed dim 192" in msg and "arch=" in msg


def test_distilled_checkpoint_into_plain_deit_says_so(distilled_pth):
    with pytest.raises(CheckpointError, match="distilled"):
        load_model(distilled_pth, arch="deit_tiny_patch16_224")


def test_missing_and_unexpected_keys_are_named(tmp_path, deit_tiny_sd):
    sd = dict(deit_tiny_sd)
    sd.pop("blocks.3.mlp.fc1.bias")
    sd["extra.weight"] = torch.zeros(3)
    path = tmp_path / "deit_tiny_patch16_224-partial.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as err:
        load_model(path, num_classes=10)
    assert "blocks.3.mlp.fc1.bias" in str(err.value) and "extra.weight" in str(err.value)
    with pytest.warns(UserWarning, match="blocks.3.mlp.fc1.bias"):
        model = load_model(path, num_classes=10, strict=False)
    assert model.load_report.missing == ["blocks.3.mlp.fc1.bias"]
    assert model.load_report.unexpected == ["extra.weight"]


def test_image_size_not_divisible_by_patch(deit_release_pth):
    with pytest.raises(GridError, match="not divisible"):
        load_model(deit_release_pth, num_classes=10, img_size=100)


def test_truncation_to_a_larger_grid(deit_release_pth):
    with pytest.raises(GridError, match="bicubic"):
        load_model(deit_release_pth, num_classes=10, img_size=384, pos_embed_mode="truncate")


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("legacy", [False, True])
def test_pickled_code_payload_is_refused_and_never_runs(tmp_path, deit_tiny_sd, legacy):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "deit_tiny_patch16_224-evil.pth"
    obj = {"model": deit_tiny_sd, "extra": _Payload(marker)}
    if legacy:
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    else:
        torch.save(obj, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError) as err:
        load_model(path, num_classes=10)
    assert not marker.exists()
    assert "Refused" in str(err.value) and "none of its code ran" in str(err.value)
    if legacy:  # a plain pickle, which torch's reader calls corrupt: its opcodes name the payload
        assert "pathlib" in str(err.value) and "touch" in str(err.value) and "corrupt" not in str(err.value)
    else:  # torch's safe unpickler's own reason is quoted
        assert "Unsupported global" in str(err.value)


def test_bad_model_kwarg_is_a_clear_error(deit_release_pth):
    with pytest.raises(FinetuneError, match="'not_an_arg' is not an argument finetune passes on"):
        load_model(deit_release_pth, not_an_arg=3)


def test_timm_model_smoke_pretrained_false_still_matches_timm():
    # Our preset registration must not disturb timm's own names.
    assert timm.is_model("deit_tiny_patch16_224") and timm.is_model("vit_lab")


@pytest.mark.parametrize("content", [b"", b"x", b"PK\x03\x04 truncated zip"])
def test_empty_or_damaged_pth_is_corrupt_not_code(tmp_path, content):
    path = tmp_path / "deit_tiny_patch16_224-damaged.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="corrupt") as err:
        load_model(path)
    assert "Refused" not in str(err.value)


def test_deit3_release_layer_scale_keys_are_renamed(tmp_path):
    # The DeiT-III release files call layer scale blocks.N.gamma_1/2; timm calls it blocks.N.ls1.gamma.
    sd = random_state_dict("deit3_small_patch16_224", seed=3, depth=2)
    release = {k.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2"): v for k, v in sd.items()}
    path = tmp_path / "deit3_small_224_release.pth"
    torch.save({"model": release}, path)
    model = load_model(path, arch="deit3_small_patch16_224", depth=2, num_classes=10)
    assert_loaded_exactly(model, sd)


def test_save_model_keeps_timm_constructor_arguments(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", global_pool="avg", fc_norm=False, depth=2, num_classes=3)
    save_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert again.global_pool == "avg" and len(again.blocks) == 2
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(again.eval()(x), model.eval()(x))


def test_hub_id_errors(tmp_path):
    with pytest.raises(SourceNotFoundError, match="hf-hub:timm/deit_tiny"):
        load_model("timm/deit_tiny_patch16_224.fb_in1k")  # a repo id without the hf-hub: prefix
    with pytest.raises(SourceNotFoundError, match="not a valid hub repository id"):
        load_model("hf-hub:a/b/c")


def test_use_ema_on_a_safetensors_file_is_an_error(safetensors_file):
    with pytest.raises(CheckpointError, match="no EMA"):
        load_model(safetensors_file, arch="deit_tiny_patch16_224", use_ema=True)


def test_connection_lost_during_download_is_an_offline_error(tmp_path, monkeypatch):
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(ckpt_mod, "endpoint_reachable", lambda *a, **k: True)

    def lost(*args, **kwargs):
        raise LocalEntryNotFoundError("connection error")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", lost)
    with pytest.raises(OfflineError, match="stopped answering"):
        load_model("deit_tiny_patch16_224", num_classes=10)


def test_probe_honours_no_proxy(monkeypatch):
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # a dead proxy
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        assert ckpt_mod.endpoint_reachable(f"http://127.0.0.1:{port}")
        monkeypatch.delenv("NO_PROXY")
        assert not ckpt_mod.endpoint_reachable(f"http://127.0.0.1:{port}")
    finally:
        server.close()
