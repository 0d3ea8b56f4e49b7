"""The batch plan: one source of order, rows and augmentation seeds for both loaders.

The in-memory and the streamed loader read the same :class:`~finetune.data.plan.BatchPlan`, so on
the same images they give the same batches, augmentation included; a batch's images and seed do not
depend on where an epoch started, on the device the images live on, or on the number of processes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.data.decode import decode_files
from finetune.data.loader import BatchLoader
from finetune.data.plan import AUGMENT_STREAM, SHUFFLE_STREAM, BatchPlan, stream_seed
from finetune.data.splits import EncodedImages, SkippedFiles
from finetune.errors import DataError, FinetuneError
from finetune.recipe.schema import AugmentConfig


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    """40 random 16x16 PNGs (lossless, so a decoded file equals the array written) and labels."""
    folder = tmp_path_factory.mktemp("pngs")
    rng = np.random.default_rng(0)
    files, labels = [], []
    for i in range(40):
        path = folder / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
        files.append(str(path))
        labels.append(i % 4)
    return files, labels


def loader(data, **kwargs):
    base = dict(batch_size=8, train=True, device="cpu", out_size=(16, 16), mean=(0.5, 0.4, 0.3),
                std=(0.2, 0.25, 0.3), seed=3, workers=2)
    return BatchLoader(data, **{**base, **kwargs})


def batches(batch_loader, epoch, start=0):
    batch_loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in batch_loader.iter_from(start)]


@pytest.mark.parametrize("augment", [AugmentConfig(hflip=True, crop_padding=2), AugmentConfig(hflip=False, crop_padding=0)])
def test_in_memory_and_streamed_loaders_give_the_same_batches(pngs, augment):
    files, labels = pngs
    decoded = decode_files(files, labels, None, SkippedFiles())
    encoded = EncodedImages(files, torch.tensor(labels), files, 16)
    for epoch in (0, 1):
        memory = batches(loader(decoded, augment=augment), epoch)
        streamed = batches(loader(encoded, augment=augment), epoch)
        assert len(memory) == len(streamed) == 5
        for (xm, ym), (xs, ys) in zip(memory, streamed):
            assert torch.equal(ym, ys)
            assert torch.equal(xm, xs)


def test_the_plan_decides_order_rows_and_seeds(pngs):
    plan = BatchPlan(40, 8, train=True, drop_last=True, seed=3)
    order = plan.order(1)
    expected = torch.randperm(40, generator=torch.Generator().manual_seed(stream_seed(3, 1, SHUFFLE_STREAM)))
    assert torch.equal(order, expected)
    assert torch.equal(plan.positions(order, 2), order[16:24])
    assert plan.augment_seed(1, 2) == (stream_seed(3, 1, AUGMENT_STREAM) + 2) % 2**63
    assert plan.order(0).tolist() != order.tolist()  # each epoch has its own order
    # Two processes: each takes its half of the same global batch, with the batch's seed.
    halves = [BatchPlan(40, 8, train=True, drop_last=True, seed=3, rank=r, world_size=2) for r in (0, 1)]
    assert [h.rows for h in halves] == [(0, 8), (4, 8)]
    assert torch.equal(torch.cat([h.positions(h.order(1), 2) for h in halves]), plan.positions(order, 2))
    # Evaluation: in order, the last batch partial, no augmentation stream.
    evaluation = BatchPlan(30, 8, train=False, drop_last=False)
    assert evaluation.order(0) is None and evaluation.rows is None and len(evaluation) == 4
    assert evaluation.positions(None, 3) == slice(24, 30)


def test_loader_batches_follow_the_plan_and_resume_part_way(pngs):
    files, labels = pngs
    decoded = decode_files(files, labels, None, SkippedFiles())
    plain = loader(decoded, augment=None)
    epoch = batches(plain, 2)
    order = plain.plan.order(2)
    for i, (_, y) in enumerate(epoch):
        assert torch.equal(y, decoded.labels[plain.plan.positions(order, i)])
    augmented = loader(decoded, augment=AugmentConfig(hflip=True, crop_padding=2))
    whole, rest = batches(augmented, 2), batches(augmented, 2, start=3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(whole[3:], rest))


def test_the_plan_refuses_what_cannot_be_batched():
    with pytest.raises(FinetuneError, match="does not divide among 3 processes"):
        BatchPlan(64, 8, train=True, drop_last=True, world_size=3)
    with pytest.raises(DataError, match="fewer than one batch of 32"):
        BatchPlan(20, 32, train=True, drop_last=True)


def test_a_resumed_run_keeps_the_data_path_it_started_with(tmp_path, monkeypatch):
    # data.in_memory: auto chooses from the free memory at start-up; a resume must not choose again.
    import json

    import finetune.data.decode as decode_mod
    import finetune.training.setup as setup
    from conftest import REPO_ROOT, send_at_step
    from finetune.errors import RunInterrupted
    from finetune.recipe import load_recipe
    from finetune.runs.run import resume, run, run_dir_for

    rng = np.random.default_rng(1)
    for split, count in (("train", 12), ("test", 4)):
        for name in ("a", "b"):
            (tmp_path / "photos" / split / name).mkdir(parents=True)
            for i in range(count):
                image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(image).save(tmp_path / "photos" / split / name / f"{i}.png")
    recipe = load_recipe(REPO_ROOT / "recipes" / "quick_cpu.yaml", [
        f"output.dir={tmp_path / 'runs'}", "name=auto", "data.name=imagefolder", f"data.root={tmp_path / 'photos'}",
        "data.in_memory=auto", "data.batch_size=4", "model.img_size=16", "train.epochs=2", "output.plots=false"])
    monkeypatch.setattr(decode_mod, "host_memory_budget", lambda: 0)  # nothing fits: auto streams
    send_at_step(monkeypatch, 3)
    with pytest.raises(RunInterrupted):
        run(recipe, quiet=True)
    monkeypatch.undo()  # memory to spare now: auto alone would decode the images into memory
    paths = []
    real = setup.load_splits

    def watched(*args, **kwargs):
        splits = real(*args, **kwargs)
        paths.append(splits.path)
        return splits

    monkeypatch.setattr(setup, "load_splits", watched)
    resume(run_dir_for(recipe), quiet=True)
    assert paths == ["streamed"]
    summary = json.loads((run_dir_for(recipe) / "summary.json").read_text())
    assert summary["data_path"] == "streamed" and summary["stored_size"] is None
