"""Hugging Face transformers ViT and DeiT checkpoints: read without transformers, as timm's equal.

Each transformers class is built with random weights at a tiny size, saved with ``save_pretrained``,
and loaded by ``load_model``: its logits must equal transformers' own on the same images, and it
must then adapt (new head, new input size) and train like any other source. transformers itself
is used only here, to make the reference models.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from conftest import REPO_ROOT, write_hub_cache  # noqa: E402
from finetune import load_model, save_model  # noqa: E402
from finetune.errors import CheckpointError  # noqa: E402
from finetune.recipe import load_recipe  # noqa: E402
from finetune.runs.run import run  # noqa: E402

QUICK = REPO_ROOT / "recipes" / "quick_cpu.yaml"
# timm's LayerNorm eps, so that logits can be compared tightly at random init (where activations are
# tiny and transformers' default 1e-12 against timm's 1e-6 would show); see test_transformers_eps_...
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
            patch_size=8, layer_norm_eps=1e-6)
CLASSES = ("ViTForImageClassification", "DeiTForImageClassification", "DeiTForImageClassificationWithTeacher")


def build(name: str, **config):
    """A transformers model of class ``name`` with random weights, in eval mode."""
    config_cls = transformers.ViTConfig if name.startswith("ViT") else transformers.DeiTConfig
    torch.manual_seed(0)
    return getattr(transformers, name)(config_cls(**{**TINY, "num_labels": 5, **config})).eval()


def reference(model, images: torch.Tensor) -> torch.Tensor:
    """transformers' logits (the normalised class token for the bare models)."""
    with torch.no_grad():
        out = model(pixel_values=images)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state[:, 0]


def logits(model, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(images)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (folder saved by transformers, its reference logits) for the three classes."""
    root = tmp_path_factory.mktemp("transformers")
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    found = {}
    for name in CLASSES:
        model = build(name)
        model.save_pretrained(root / name)
        found[name] = (root / name, reference(model, images))
    return found, images


@pytest.mark.parametrize("name", CLASSES)
def test_logits_equal_transformers_own(saved, name):
    folders, images = saved
    folder, expected = folders[name]
    model = load_model(folder)
    assert torch.allclose(logits(model, images), expected, atol=1e-4, rtol=0)
    assert model.num_classes == 5 and model.load_report.missing == model.load_report.unexpected == []
    assert "label_names" not in model.pretrained_cfg  # transformers' placeholders LABEL_0... are no names
    # no timm name has this tiny shape: the family's base model, every shape argument set from config.json
    assert (model.pretrained_cfg["architecture"], model.num_prefix_tokens, hasattr(model, "head_dist")) == {
        "ViTForImageClassification": ("vit_base_patch16_224", 1, False),
        "DeiTForImageClassification": ("deit_base_patch16_224", 2, False),  # cls + distillation token
        "DeiTForImageClassificationWithTeacher": ("deit_base_distilled_patch16_224", 2, True)}[name]


@pytest.mark.parametrize("name", CLASSES)
def test_adapts_to_a_new_task_and_size(saved, name):
    folder, _ = saved[0][name]
    model = load_model(folder, num_classes=3, img_size=48)
    out = logits(model, torch.randn(2, 3, 48, 48))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    assert model.pos_embed.shape[1] == model.num_prefix_tokens + 36  # a 6x6 grid of 8-pixel patches
    assert set(model.load_report.new_head) >= {"head.weight", "head.bias"}
    model = load_model(folder, num_classes=3, img_size=48, patch_size=4)  # the patch kernel resampled too
    assert model.pos_embed.shape[1] == model.num_prefix_tokens + 144
    assert logits(model, torch.randn(1, 3, 48, 48)).shape == (1, 3)


@pytest.mark.parametrize("name", CLASSES)
def test_a_run_trains_from_a_transformers_folder(tmp_path, saved, name):
    folder, _ = saved[0][name]
    recipe = load_recipe(QUICK, [f"output.dir={tmp_path}", f"name={name}", f"model.source={folder}", "model.arch=null",
                                 "train.mode=full", "output.plots=false"])
    summary = run(recipe, quiet=True)
    assert summary["mode"] == "full" and summary["status"] == "finished"
    trained = load_file(tmp_path / name / "model.safetensors")["blocks.0.attn.qkv.weight"]
    assert not torch.equal(trained, load_model(folder).state_dict()["blocks.0.attn.qkv.weight"])  # full: it trained
    assert (tmp_path / name / "model.safetensors").is_file() and (tmp_path / name / "config.json").is_file()
    reloaded = load_model(tmp_path / name)  # a finetune save: timm layout and arguments only
    assert reloaded.num_classes == 10
    assert "norm_eps" not in json.loads((tmp_path / name / "config.json").read_text())["model_args"]


def test_transformers_eps_becomes_timms_and_logits_stay_within_fp32_noise_at_a_realistic_scale(tmp_path):
    # transformers' ViT default eps is 1e-12; the timm model uses its own 1e-6, which config.json
    # can express (plain timm loads every saved copy). With activations of a trained model's scale
    # (here: weights drawn with std 1), eps/(2 var) is ~1e-6 of each LayerNorm output.
    model = build("ViTForImageClassification", layer_norm_eps=1e-12, initializer_range=1.0)
    model.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    assert {m.eps for m in ours.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-6}
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    expected = reference(model, images)
    torch.testing.assert_close(logits(ours, images), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_pytorch_model_bin_and_the_new_layout_load_the_same(tmp_path, saved):
    folders, images = saved
    folder, expected = folders["DeiTForImageClassificationWithTeacher"]
    pickled = tmp_path / "bin"
    pickled.mkdir()
    shutil.copy(folder / "config.json", pickled / "config.json")
    torch.save(load_file(folder / "model.safetensors"), pickled / "pytorch_model.bin")
    assert torch.equal(logits(load_model(pickled), images), logits(load_model(folder), images))
    # transformers 5 can also write its own new names (q_proj, o_proj, mlp.fc1, layers.N)
    build("DeiTForImageClassificationWithTeacher").save_pretrained(tmp_path / "new", save_original_format=False)
    assert "deit.layers.0.attention.q_proj.weight" in load_file(tmp_path / "new" / "model.safetensors")
    assert torch.allclose(logits(load_model(tmp_path / "new"), images), expected, atol=1e-4, rtol=0)


def test_bare_models_give_the_class_token_and_activations_and_eps_are_kept(tmp_path):
    images = torch.randn(2, 3, 32, 32)
    for name, config in (("ViTModel", {"hidden_act": "gelu_new"}), ("DeiTModel", {"layer_norm_eps": 1e-6})):
        model = build(name, **config)
        model.save_pretrained(tmp_path / name)
        ours = load_model(tmp_path / name)
        assert ours.num_classes == 0  # no head: the pooler is dropped, a new head reads the class token
        assert torch.allclose(logits(ours, images), reference(model, images), atol=1e-4, rtol=0)
        assert "pooler.dense.weight" not in ours.state_dict()


def test_class_names_and_preprocessing_come_along_and_survive_a_save(tmp_path):
    labels = {0: "cat", 1: "dog", 2: "cow", 3: "owl", 4: "eel"}
    model = build("ViTForImageClassification", id2label=labels, label2id={v: k for k, v in labels.items()})
    model.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.4, 0.4, 0.4], "image_std": [0.2, 0.2, 0.2], "resample": 3}))
    ours = load_model(tmp_path / "hf")
    assert ours.pretrained_cfg["label_names"] == list(labels.values())
    assert (ours.pretrained_cfg["mean"], ours.pretrained_cfg["interpolation"]) == ((0.4, 0.4, 0.4), "bicubic")
    assert ours.pretrained_cfg.get("hf_hub_id") is None  # these are not timm's weights of the arch it names
    images = torch.randn(2, 3, 32, 32)
    again = load_model(save_model(ours, tmp_path / "saved"))
    assert torch.equal(logits(again, images), logits(ours, images))
    assert again.pretrained_cfg["label_names"] == list(labels.values())


def test_a_hub_repository_of_transformers_loads_offline(tmp_path, monkeypatch, saved):
    from huggingface_hub import constants

    folders, images = saved
    folder, expected = folders["ViTForImageClassification"]
    cache = tmp_path / "hub"
    write_hub_cache(cache, "google/vit-tiny-test", json.loads((folder / "config.json").read_text()),
                    load_file(folder / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    model = load_model("hf-hub:google/vit-tiny-test", cache_dir=cache)
    assert model.load_report.origin == "hf-hub:google/vit-tiny-test"
    assert torch.allclose(logits(model, images), expected, atol=1e-4, rtol=0)


def _config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_what_cannot_be_read_is_a_clear_error(tmp_path, saved):
    source, _ = saved[0]["ViTForImageClassification"]
    folder = tmp_path / "m"
    shutil.copytree(source, folder)
    _config(folder, model_type="swin", architectures=["SwinForImageClassification"])
    with pytest.raises(CheckpointError, match=r"model_type 'swin'.*'vit' and 'deit'.*timm's own weights"):
        load_model(folder)
    _config(folder, model_type="vit", architectures=["ViTForMaskedImageModeling"])
    with pytest.raises(CheckpointError, match="ViTForMaskedImageModeling.*ViTForImageClassification"):
        load_model(folder)
    _config(folder, architectures=["ViTForImageClassification"], hidden_act="mish", layer_norm_eps="small")
    with pytest.raises(CheckpointError, match=r"hidden_act='mish' should be one of gelu.*layer_norm_eps='small'"):
        load_model(folder)
    _config(folder, hidden_act="gelu", layer_norm_eps=1e-6, num_attention_heads=5)
    with pytest.raises(CheckpointError, match="num_attention_heads=5 does not divide hidden_size=32"):
        load_model(folder)
    _config(folder, num_attention_heads=4, hidden_size=48)
    with pytest.raises(CheckpointError, match="embed_dim=48 but the weights are 32 wide"):
        load_model(folder)
    _config(folder, hidden_size=32, id2label={"0": "a", "1": "b"})
    with pytest.raises(CheckpointError, match="id2label should map each of the head's 5 outputs"):
        load_model(folder)
    _config(folder, id2label=None)
    state_dict = load_file(folder / "model.safetensors")
    state_dict["vit.encoder.layer.0.crossattention.weight"] = torch.zeros(1)
    del state_dict["vit.encoder.layer.1.attention.attention.key.bias"]
    torch.save(state_dict, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no transformers ViT or DeiT has: vit.encoder.layer.0.crossattention"):
        load_model(folder)
    del state_dict["vit.encoder.layer.0.crossattention.weight"]
    torch.save(state_dict, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="block 1's attention has the bias of q, v only"):
        load_model(folder)


def test_standard_shapes_take_timm_names():
    from finetune.models.transformers_ckpt import _timm_arch

    tiny = {"width": 192, "depth": 12, "heads": 3, "img": 224, "patch": 16}
    base384 = {"width": 768, "depth": 12, "heads": 12, "img": 384, "patch": 16}
    assert _timm_arch(tiny, "teacher", "deit") == "deit_tiny_distilled_patch16_224"
    assert _timm_arch(base384, "classifier", "vit") == "vit_base_patch16_384"
    assert _timm_arch({**tiny, "img": [224, 160]}, "backbone", "deit") == "deit_base_patch16_224"  # not square
