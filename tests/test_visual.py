"""What a ViT sees: tensors with the properties the pictures rely on, and the pictures themselves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import REPO_ROOT
from finetune import create_model, resize_pos_embed, save_model
from finetune.cli import app
from finetune.data.loader import BatchLoader
from finetune.data.splits import ImageTensors
from finetune.errors import GridError
from finetune.viz.visual import (
    attention_maps,
    attention_rollout,
    attention_rollout_matrix,
    denormalise,
    last_layer_attention,
    patch_grid,
    pos_embed_similarity,
    training_samples,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
runner = CliRunner()


def toy(**kwargs):
    torch.manual_seed(0)
    return create_model("vit_tiny_test", num_classes=5, **kwargs).eval()


def test_patch_grid_counts_and_order():
    image = torch.arange(3 * 32 * 48, dtype=torch.float32).reshape(3, 32, 48)
    patches, grid = patch_grid(image, 8)
    assert grid == (4, 6) and patches.shape == (4 * 6, 3, 8, 8)  # (H/p) * (W/p)
    assert torch.equal(patches[7], image[:, 8:16, 8:16])  # patch 7: row 1, column 1 (row by row)
    with pytest.raises(GridError, match="does not split"):
        patch_grid(image[:, :30], 8)


@pytest.mark.parametrize("kwargs, prefix", [
    ({}, 1),                                              # a cls token, mean-pooled head (the lab's layout)
    ({"global_pool": "token"}, 1),                        # DeiT/ViT: the head reads the cls token
    ({"class_token": False, "global_pool": "avg"}, 0),    # no prefix token at all
    ({"reg_tokens": 1, "global_pool": "token"}, 2),       # two prefix tokens
])
def test_rollout_rows_sum_to_one_and_maps_fit_the_grid(kwargs, prefix):
    model = toy(img_size=48, patch_size=8, **kwargs)  # resized input: a 6x6 grid
    assert model.num_prefix_tokens == prefix
    x = torch.randn(2, 3, 48, 48)
    maps = attention_maps(model, x)
    assert len(maps) == 2 and maps[0].shape == (2, model.blocks[0].attn.num_heads, prefix + 36, prefix + 36)
    rollout = attention_rollout_matrix(maps)
    torch.testing.assert_close(rollout.sum(-1), torch.ones(2, prefix + 36))
    grid = attention_rollout(model, x)
    assert grid.shape == (2, 6, 6) and (grid >= 0).all() and (grid.sum((1, 2)) <= 1 + 1e-5).all()
    heads = last_layer_attention(model, x)
    assert heads.shape == (2, model.blocks[-1].attn.num_heads, 6, 6)
    # The model is put back as it was: fused attention on, same outputs.
    assert all(b.attn.fused_attn == model.blocks[0].attn.fused_attn for b in model.blocks)


def test_rollout_on_a_distilled_deit_reads_both_prefix_tokens():
    torch.manual_seed(0)
    model = create_model("deit_tiny_distilled_patch16_224", num_classes=3, img_size=64).eval()  # a 4x4 grid
    assert model.num_prefix_tokens == 2
    grid = attention_rollout(model, torch.randn(1, 3, 64, 64))
    assert grid.shape == (1, 4, 4) and 0 < float(grid.sum()) <= 1 + 1e-5
    assert last_layer_attention(model, torch.randn(1, 3, 64, 64)).shape == (1, 3, 4, 4)


def test_rollout_of_known_attention():
    # Every block attends only to itself: the rollout is the identity (each token draws on itself).
    maps = [torch.eye(17).expand(1, 2, 17, 17) for _ in range(2)]
    torch.testing.assert_close(attention_rollout_matrix(maps), torch.eye(17)[None])
    # Uniform attention: after mixing with the residual, each row is half itself, half uniform.
    uniform = [torch.full((1, 2, 4, 4), 0.25)]
    torch.testing.assert_close(attention_rollout_matrix(uniform)[0], 0.5 * torch.eye(4) + 0.125)


def test_a_model_without_attention_layers_is_refused_clearly():
    convnet = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with pytest.raises(GridError, match="no timm attention layers"):
        attention_maps(convnet, torch.zeros(1, 3, 8, 8))
    import timm

    swin = timm.create_model("swin_tiny_patch4_window7_224", num_classes=3, img_size=56, embed_dim=8,
                             depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)).eval()
    with pytest.raises(GridError, match="not global attention"):
        attention_rollout(swin, torch.zeros(1, 3, 56, 56))


def test_each_position_is_most_similar_to_itself():
    torch.manual_seed(1)
    pos_embed = torch.randn(1, 1 + 7 * 7, 16)
    sims = pos_embed_similarity(pos_embed, 7)
    assert sims.shape == (49, 7, 7)
    flat = sims.reshape(49, 49)
    torch.testing.assert_close(flat.diagonal(), torch.ones(49))
    assert torch.equal(flat.argmax(dim=1), torch.arange(49))
    with pytest.raises(GridError, match="not 6x6"):
        pos_embed_similarity(pos_embed, 6)
    truncated = resize_pos_embed(pos_embed, 2, mode="truncate")
    assert pos_embed_similarity(truncated, 2).shape == (4, 2, 2)


def test_samples_denormalise_back_to_the_stored_pixels():
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    loader = BatchLoader(ImageTensors(images, torch.arange(8) % 2), batch_size=8, train=True, device=torch.device("cpu"),
                         out_size=(16, 16), mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    shown, labels = training_samples(loader)
    loader.set_epoch(1)
    order = next(iter(loader))[1]
    assert torch.equal(labels, order)
    # No augmentation and no resize: what the model receives, de-normalised, is the stored image.
    stored = {tuple(img.flatten().tolist()) for img in images}
    assert all(tuple(img.flatten().tolist()) in stored for img in shown)
    x = (images.float() / 255 - torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    assert torch.equal(denormalise(x, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)), images)


def photo(path, colour=(200, 40, 40), size=(40, 30)):
    Image.new("RGB", size, colour).save(path)
    return path


def test_show_commands_draw_their_pictures(tmp_path):
    model = save_model(toy(img_size=32, patch_size=8), tmp_path / "toy", class_names=list("abcde"))
    cat = photo(tmp_path / "cat.png")
    for args, name in (
        (["patches", str(cat), "--img-size", "32", "--patch-size", "8"], "patches.png"),
        (["patches", str(cat), "--model", str(model)], "patches_model.png"),
        (["attention", str(model), str(cat), str(photo(tmp_path / "dog.png", (20, 200, 20)))], "attention.png"),
        (["pos-embed", str(model), "--img-size", "16", "--modes", "truncate,crop,bicubic"], "pos_embed.png"),
    ):
        result = runner.invoke(app, ["show", *args, "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
    result = runner.invoke(app, ["show", "patches", str(cat)])
    assert result.exit_code == 1 and "Give --model, or both --img-size and --patch-size" in result.output
    result = runner.invoke(app, ["show", "patches", str(cat), "--img-size", "30", "--patch-size", "8"])
    assert result.exit_code == 1 and "does not split" in result.output


def test_a_run_folder_gets_samples_and_mistakes_and_tensorboard(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import finetune.viz.visual as visual

    passes = []
    real = visual.most_confident_mistakes
    monkeypatch.setattr(visual, "most_confident_mistakes", lambda *a, **k: passes.append(1) or real(*a, **k))
    result = runner.invoke(app, ["run", str(REPO_ROOT / "recipes" / "quick_cpu.yaml"), f"output.dir={tmp_path}",
                                 "train.epochs=2", "output.tensorboard=true", "-q"])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "quick_cpu"
    for png in ("samples.png", "mistakes.png"):
        assert (folder / png).read_bytes().startswith(PNG_MAGIC), png
    events = EventAccumulator(str(folder / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    epochs = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "epoch"]
    acc = [(e.step, e.value) for e in events.Scalars("test/acc1")]
    assert acc == [(row["epoch"], pytest.approx(row["test_acc1"])) for row in epochs]
    assert len(events.Scalars("train/loss")) == 8  # a log line every 2 of 16 steps
    assert {"samples/training_inputs", "test/most_confident_mistakes"} <= set(events.Tags()["images"])
    assert len(passes) == 1  # the run folder and TensorBoard share one pass over the test set


def test_resuming_without_tensorboard_fails_before_touching_the_run(tmp_path, monkeypatch):
    import finetune.viz.tensorboard as tensorboard
    from conftest import send_at_step
    from finetune.errors import FinetuneError, RunInterrupted
    from finetune.recipe import load_recipe
    from finetune.runs.run import resume, run, run_dir_for

    pytest.importorskip("tensorboard")
    recipe = load_recipe(REPO_ROOT / "recipes" / "quick_cpu.yaml",
                         [f"output.dir={tmp_path}", "output.tensorboard=true", "output.plots=false"])
    send_at_step(monkeypatch, 3)
    with pytest.raises(RunInterrupted):
        run(recipe, quiet=True)
    monkeypatch.undo()
    folder = run_dir_for(recipe)
    checkpoint = (folder / "checkpoints" / "last.safetensors").read_bytes()

    def missing():
        raise FinetuneError("output.tensorboard is true, but the tensorboard package is not installed.", "Install it.")

    monkeypatch.setattr(tensorboard, "require_tensorboard", missing)
    with pytest.raises(FinetuneError, match="not installed"):
        resume(folder, quiet=True)
    assert json.loads((folder / "summary.json").read_text())["status"] == "interrupted"
    assert (folder / "checkpoints" / "last.safetensors").read_bytes() == checkpoint


def test_show_patches_of_a_conv_tokenizer_draws_its_token_grid(tmp_path, monkeypatch):
    import finetune.viz.figures as figures
    import timm

    drawn = []
    monkeypatch.setattr(figures, "draw_patches", lambda image, patch, out, prefix_tokens=1: drawn.append(
        (tuple(image.shape), patch, prefix_tokens)) or Path(out))
    model = save_model(timm.create_model("vit_cifar_conv", num_classes=5), tmp_path / "conv")
    result = runner.invoke(app, ["show", "patches", str(photo(tmp_path / "cat.png")), "--model", str(model),
                                 "--out", str(tmp_path / "p.png")])
    assert result.exit_code == 0, result.output
    # Two stride-2 stages make 32 px an 8x8 grid of 64 tokens, each 4 px of the image (not 1-px patches).
    assert drawn == [((3, 32, 32), 4, 0)]


@pytest.mark.parametrize("maps", [1, 3])
def test_the_pos_embed_picture_title_fits_its_figure(tmp_path, monkeypatch, maps):
    import finetune.viz.figures as figures

    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, out: drawn.append(fig) or Path(out))
    figures.draw_pos_embed_similarity({f"m{i}": torch.rand(16, 4, 4) for i in range(maps)}, tmp_path / "p.png")
    fig = drawn[0]
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    box, frame = fig._suptitle.get_window_extent(renderer), fig.bbox
    assert frame.x0 <= box.x0 and box.x1 <= frame.x1  # not clipped on either side
