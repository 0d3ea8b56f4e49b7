"""Between head-only and full: LoRA (peft), BitFit and attention-only fine-tuning.

Each mode trains exactly the parameters it names, leaves every other weight bit for bit as it was,
and saves a plain model; a LoRA run's merged model gives the adapted model's outputs and loads
without peft.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT, send_at_step
from finetune import create_model, load_model, save_model
from finetune.errors import FinetuneError, RunInterrupted
from finetune.models.params import add_lora, merge_lora, set_trainable
from finetune.recipe import load_recipe
from finetune.runs.run import prepare, resume, run, run_dir_for

QUICK = REPO_ROOT / "recipes" / "quick_cpu.yaml"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A saved vit_tiny_test (2 blocks, width 32) with random weights: the 'pretrained' source."""
    torch.manual_seed(0)
    model = create_model("vit_tiny_test", num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)  # no zero biases, so "unchanged" cannot hold by accident
    return save_model(model, tmp_path_factory.mktemp("toy") / "toy")


def recipe(tmp_path, toy, mode: str, *extra: str):
    return load_recipe(QUICK, [f"output.dir={tmp_path}", f"name={mode}", f"train.mode={mode}", f"model.source={toy}",
                               "model.arch=null", "output.plots=false", "train.epochs=2", "optim.lr=3e-3", *extra])


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_bitfit_and_attn_train_exactly_their_parameters():
    model = create_model("vit_tiny_test", num_classes=4)
    names = [n for n, _ in model.named_parameters()]
    counts = set_trainable(model, "bitfit")
    assert trainable(model) == {n for n in names if n.endswith(".bias")} | {"head.weight"}
    assert counts.trainable == sum(p.numel() for n, p in model.named_parameters() if n in trainable(model))
    set_trainable(model, "bitfit", bitfit_norms=True)
    norms = {n for n in names if "." in n and "norm" in n.split(".")[-2]}  # norm1, norm2, fc_norm (weights, biases)
    assert norms and trainable(model) == {n for n in names if n.endswith(".bias")} | {"head.weight"} | norms
    set_trainable(model, "attn")
    assert trainable(model) == {n for n in names if ".attn.qkv." in n or ".attn.proj." in n} | {"head.weight", "head.bias"}


def test_lora_trains_adapters_and_the_head_only():
    model = add_lora(create_model("vit_tiny_test", num_classes=4), r=4, alpha=8, dropout=0.0,
                     target_modules=("qkv", "fc2"))
    counts = set_trainable(model, "lora")
    names = trainable(model)
    assert all("lora_" in n or "head.modules_to_save" in n for n in names)
    assert {n.split("base_model.model.")[1].split(".lora_")[0] for n in names if "lora_" in n} == {
        "blocks.0.attn.qkv", "blocks.1.attn.qkv", "blocks.0.mlp.fc2", "blocks.1.mlp.fc2"}
    # 2 blocks x (qkv: 4 x (32 + 96) + fc2: 4 x (64 + 32)) adapters, plus the head (32 x 4 + 4)
    assert counts.trainable == 2 * (4 * (32 + 96) + 4 * (64 + 32)) + 32 * 4 + 4
    with pytest.raises(FinetuneError, match="names attention"):
        add_lora(create_model("vit_tiny_test", num_classes=4), r=4, alpha=8, dropout=0.0, target_modules=("attention",))


@pytest.mark.parametrize("mode, changed", [
    ("bitfit", lambda n: n.endswith(".bias") or n == "head.weight"),
    ("attn", lambda n: ".attn.qkv." in n or ".attn.proj." in n or n.startswith("head.")),
    ("lora", lambda n: n.endswith("attn.qkv.weight") or n.startswith("head.")),  # adapters merged into qkv
])
def test_frozen_weights_stay_bit_identical_and_the_saved_model_is_plain(tmp_path, toy, mode, changed):
    summary = run(recipe(tmp_path, toy, mode), quiet=True)
    source, saved = load_file(toy / "model.safetensors"), load_file(tmp_path / mode / "model.safetensors")
    assert saved.keys() == source.keys()  # a plain timm model: no adapter or wrapper names
    for name in source:
        if name.startswith("head."):
            continue  # a new 10-class head either way
        assert torch.equal(saved[name], source[name]) != changed(name), name
    assert summary["mode"] == mode and 0 < summary["params_trainable"] < summary["params_total"]
    assert summary["optimizer_state_mb"] > 0


def test_a_merged_lora_model_gives_the_adapted_outputs_and_loads_without_peft(tmp_path, toy):
    summary = run(recipe(tmp_path, toy, "lora", "train.lora.target_modules=[qkv, proj, fc1, fc2]", "train.lora.r=4"),
                  quiet=True)
    folder = tmp_path / "lora"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (folder / "adapter").iterdir()}
    adapter = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4
    assert {name.rsplit(".", 1)[-1] for name in adapter["target_modules"]} == {"fc1", "fc2", "proj", "qkv"}
    assert not any(name.startswith("patch_embed") for name in adapter["target_modules"])  # a conv, not a Linear

    # The adapted model (rebuilt from the checkpoint) and the merged one agree.
    from finetune.snapshot import load_state

    state = load_state(folder / "checkpoints" / "last.safetensors")
    from finetune.models.saving import model_from_config

    adapted = add_lora(model_from_config(state["model_config"]), r=4, alpha=16, dropout=0.0,
                       target_modules=("qkv", "proj", "fc1", "fc2"))
    adapted.load_state_dict(state["model"])
    merged = load_model(folder)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(x), adapted.eval()(x), rtol=1e-5, atol=1e-5)
    assert merge_lora(merged) is merged  # a plain model is left as it is

    # No peft at all: the saved folder still loads and predicts.
    script = textwrap.dedent(f'''
        import sys
        sys.modules["peft"] = None  # importing peft now fails
        from finetune import load_model
        import torch
        model = load_model({str(folder)!r})
        print(type(model).__name__, model(torch.zeros(1, 3, 32, 32)).shape[-1])
    ''')
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert out.stdout.split() == ["VisionTransformer", "10"]
    assert summary["final_acc1"] == pytest.approx(_accuracy(merged, tmp_path), abs=1e-9)


def _accuracy(model, tmp_path) -> float:
    from finetune.data.load import load_splits
    from finetune.data.loader import BatchLoader
    from finetune.training.evaluate import evaluate

    splits = load_splits(load_recipe(tmp_path / "lora" / "recipe.yaml").data, seed=0)
    loader = BatchLoader(splits.test, batch_size=64, train=False, device=torch.device("cpu"), out_size=(32, 32),
                         mean=(0.5,) * 3, std=(0.5,) * 3)
    return evaluate(model, loader, 10).acc1


def test_lora_with_layer_decay_and_ema_resumes_exactly(tmp_path, toy, monkeypatch):
    extra = ("optim.layer_decay=0.7", "train.ema=true", "train.ema_decay=0.9", "train.log_every=1", "data.val_split=32")
    send_at_step(monkeypatch, 5)
    stopped = recipe(tmp_path, toy, "lora", *extra)
    with pytest.raises(RunInterrupted):
        run(stopped, quiet=True)
    monkeypatch.undo()
    resume(run_dir_for(stopped), quiet=True)
    straight = recipe(tmp_path, toy, "lora", *extra, "name=straight")
    run(straight, quiet=True)
    a, b = (load_file(run_dir_for(r) / "model.safetensors") for r in (stopped, straight))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_modes_validate_in_recipes_and_compare_files():
    from finetune.experiments.spec import load_experiment

    for mode in ("lora", "bitfit", "attn"):
        assert load_recipe(REPO_ROOT / "recipes" / "deit_tiny_cifar.yaml", [f"train.mode={mode}"]).train.mode == mode
    for name in ("compare_cifar", "transfer_compare"):
        modes = {r.train.mode for _, r in load_experiment(REPO_ROOT / "recipes" / f"{name}.yaml").variants}
        assert {"head", "bitfit", "attn", "lora", "full", "scratch"} <= modes, name
    assert prepare is not None
