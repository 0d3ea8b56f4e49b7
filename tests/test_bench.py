"""The benchmark harness (benchmarks/bench.py) and the rule that speed work must not change results.

The harness runs end to end with ``--tiny`` on the CPU; the GPU figures come from the same code
with full-size settings. FINETUNE_TEST_COMPILE=1 adds the torch.compile case of the fast-path
test, which takes minutes on a CPU with a cold compile cache.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from finetune.data.loader import BatchLoader
from finetune.models.params import param_groups
from finetune.runs.records import read_run
from finetune.recipe import load_recipe, recipe_from_dict
from finetune.runs.run import prepare, run, run_dir_for

BENCH_PATH = REPO_ROOT / "benchmarks" / "bench.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench", BENCH_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


bench = _load_bench()
ALL_ROWS = {"course", "timm", "finetune", "finetune32", "scratch-vit_lab", "scratch-vit_cifar_s"}


def invoke(*args: str):
    result = CliRunner().invoke(bench.app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def only_results(out: Path) -> tuple[dict, str]:
    (json_file,) = out.glob("*.json")
    (md_file,) = out.glob("*.md")
    assert json_file.stem == md_file.stem
    return json.loads(json_file.read_text()), md_file.read_text()


# --- the whole harness, tiny, on the CPU ------------------------------------------------------


def test_tiny_run_times_every_pipeline_and_writes_json_and_markdown(tmp_path):
    out = tmp_path / "results"
    result = invoke("--tiny", "--device", "cpu", "--steps", "3", "--out", str(out))
    assert result.exit_code == 0, result.output
    results, markdown = only_results(out)

    assert {r["name"] for r in results["pipelines"]} == ALL_ROWS
    for row in results["pipelines"]:
        assert row["status"] == "ok", (row["name"], row.get("traceback"))
        assert row["images_per_s"] > 0
        assert row["epoch_s"] == pytest.approx(50_000 / row["images_per_s"])
        assert row["flops_per_image"] > 0
        assert row["mfu"] is None  # no peak for a CPU
        assert row["peak_memory_mib"] is None
        assert row["step_time_s"]["median"] > 0
        assert row["settings"]
    assert results["device"]["type"] == "cpu" and results["device"]["peak_tflops"] is None
    assert results["date"] in markdown and results["device"]["name"] in markdown
    assert json.loads(json.dumps(results["versions"]))["torch"] == torch.__version__
    assert "--tiny" in results["command"] and results["settings"]["steps"] == 3
    assert {c["cache"] for c in results["hub_caches"]} >= {"huggingface", "torch"}
    # course and timm decoded files written to disk: the CIFAR pickles and the JPEG folder.
    by_name = {r["name"]: r for r in results["pipelines"]}
    assert results["data"]["source"] == "synthetic" and results["data"]["cifar_pickle"]
    assert by_name["course"]["settings"]["dataset"].startswith("torchvision CIFAR10")
    assert by_name["course"]["settings"]["dataset_images"] == results["data"]["train_images"]
    assert by_name["timm"]["settings"]["dataset_images"] == results["data"]["train_images"]
    # The engine's rows carry the recipe that ran.
    assert by_name["finetune32"]["settings"]["recipe"]["model"]["patch_size"] == 4
    for name in ALL_ROWS:
        assert f"| {name} |" in markdown and f"| {name} |" in result.output


def test_course_and_timm_read_the_given_imagefolder(tmp_path):
    data = tmp_path / "jpegs"
    for split, per_class in (("train", 4), ("test", 1)):
        for c, colour in enumerate(("red", "green", "blue")):
            folder = data / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (32, 32), colour).save(folder / f"{i}.jpg")
    out = tmp_path / "results"
    result = invoke(
        "--tiny", "--device", "cpu", "--pipelines", "course,timm", "--data", str(data),
        "--steps", "2", "--warmup", "0", "--batch-scale", "0.5", "--out", str(out),
    )
    assert result.exit_code == 0, result.output
    results, _ = only_results(out)
    assert results["data"] == {"source": str(data), "imagefolder": str(data), "cifar_pickle": None, "train_images": 12}
    for row in results["pipelines"]:
        assert row["status"] == "ok", row.get("traceback")
        assert row["settings"]["dataset_images"] == 12 and row["batch_size"] == 4
    assert "ImageFolder" in results["pipelines"][0]["settings"]["dataset"]


def test_a_failing_pipeline_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    def broken(ctx):
        raise RuntimeError("CUDA out of memory (pretend)")

    monkeypatch.setitem(bench.BENCHES, "course", broken)
    out = tmp_path / "results"
    result = invoke("--tiny", "--device", "cpu", "--pipelines", "course,finetune", "--steps", "2", "--out", str(out))
    assert result.exit_code == 0, result.output
    results, markdown = only_results(out)
    course, finetune = results["pipelines"]
    assert course["status"] == "error" and course["error"] == "RuntimeError: CUDA out of memory (pretend)"
    assert "Traceback" in course["traceback"]
    assert finetune["status"] == "ok" and finetune["images_per_s"] > 0
    assert "| course | error: RuntimeError: CUDA out of memory (pretend) |" in markdown


def test_unknown_pipeline_is_refused(tmp_path):
    result = invoke("--pipelines", "course,fast", "--out", str(tmp_path))
    assert result.exit_code == 2
    assert "fast" in result.output and not list(tmp_path.iterdir())


def test_results_of_the_same_day_are_not_overwritten(tmp_path):
    (tmp_path / "gpu-2025-01-02.json").write_text("{}")
    assert bench.results_stem(tmp_path, "gpu", "2025-01-02") == tmp_path / "gpu-2025-01-02-2"
    assert bench.results_stem(tmp_path, "cpu", "2025-01-02") == tmp_path / "cpu-2025-01-02"


# --- the pieces behind the figures ------------------------------------------------------------


def test_flops_per_image_matches_a_hand_count():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 10))
    # Forward 2*in*out per layer; backward 2*in*out for each weight gradient and for the input
    # gradient of the second layer only (the image needs no gradient).
    hand = 2 * 48 * 16 + 2 * 16 * 10 + 2 * 48 * 16 + 2 * (2 * 16 * 10)
    assert bench.flops_per_image(model, 4, batch=3) == pytest.approx(hand, rel=0.01)
    assert all(p.grad is None for p in model.parameters())


def test_deit_tiny_flops_agree_with_timms_published_count():
    import timm

    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10)
    # timm lists 1.26 GMACs forward at 224 px; a training step is about 3x the forward.
    per_image = bench.flops_per_image(model, 224, batch=1)
    assert 2.9 * 2.52e9 < per_image < 3.1 * 2.52e9


def test_flop_count_does_not_depend_on_the_attention_kernel():
    import timm

    # 64 px in 4-px patches: 257 tokens, so attention is most of the work and cannot go unnoticed.
    model = timm.create_model("vit_tiny_test", pretrained=False, num_classes=10, img_size=64, patch_size=4)
    attention = [m for m in model.modules() if hasattr(m, "fused_attn")]
    assert len(attention) == len(model.blocks) == 2
    counts = {}
    for fused in (True, False):
        for module in attention:
            module.fused_attn = fused
        counts[fused] = bench.flops_per_image(model, 64)
        assert all(m.fused_attn is fused for m in attention)  # the model is left as it was given
    assert counts[True] == counts[False]
    tokens, dim = 1 + 16 * 16, model.embed_dim
    # Forward: q @ k.T and attn @ v, 2 * tokens^2 * dim FLOPs each, per block; the blocks'
    # linear layers 2 * weights * tokens. A training step is about 3x the forward.
    attention_forward = len(model.blocks) * 2 * (2 * tokens**2 * dim)
    linear_forward = sum(2 * p.numel() * tokens for n, p in model.named_parameters() if p.ndim == 2 and "blocks" in n)
    assert attention_forward > linear_forward  # the case this test is for
    assert counts[True] > 3 * linear_forward + 2 * attention_forward


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A10G", 125.0),
        ("Tesla T4", None),
    ],
)
def test_peak_flops_are_looked_up_by_device_name(name, peak):
    assert bench.peak_tflops(name)[0] == peak
    assert bench.peak_tflops(name, "cpu") == (None, None)


def test_step_statistics_use_the_median_not_the_mean():
    stats = bench.step_time_stats([0.1, 0.1, 0.1, 0.1, 5.0], batch=10)
    assert stats["images_per_s"] == pytest.approx(100.0)
    assert stats["window_images_per_s"] == pytest.approx(50 / 5.4)
    assert stats["step_time_s"]["n"] == 5 and stats["step_time_s"]["p90"] == 5.0


def test_engine_steps_drop_whole_warmup_intervals():
    settings = bench.BenchSettings(("finetune",), steps=100, warmup=15, batch_scale=1.0, device="cuda", tiny=False, data=None, out=Path("x"))
    assert bench.engine_steps(settings) == (10, 20, 120)


def test_full_size_engine_recipes_validate(tmp_path, monkeypatch):
    """The GPU run's recipes cannot run here, but they must validate and say what the issue asks."""
    settings = bench.BenchSettings(bench.PIPELINES, steps=100, warmup=20, batch_scale=1.0, device="cuda", tiny=False, data=None, out=tmp_path)
    ctx = bench.Context(settings, torch.device("cuda"), bench.DiskData(tmp_path, None, 0, True), tmp_path, 989.0)
    monkeypatch.setattr(bench, "pretend_pretrained", lambda ctx: tmp_path / "deit")
    captured = {}

    def fake_engine(ctx, raw):
        captured[raw["name"]] = copy.deepcopy(raw)
        return {"name": raw["name"]}

    monkeypatch.setattr(bench, "bench_engine", fake_engine)
    for name in ("finetune", "finetune32", "scratch"):
        bench.BENCHES[name](ctx)
    assert set(captured) == {"finetune", "finetune32", "scratch-vit_lab", "scratch-vit_cifar_s"}
    for raw in captured.values():
        recipe = recipe_from_dict(raw)
        assert recipe.train.compile and recipe.train.channels_last and recipe.optim.fused
        assert recipe.train.precision == "bf16" and recipe.data.in_memory
        assert recipe.data.synthetic_train == 120 * recipe.data.batch_size  # exactly one epoch of steps
    assert recipe_from_dict(captured["finetune"]).model.img_size == 224


def test_cache_scan_lists_entries_and_sizes_without_credentials(tmp_path, monkeypatch):
    hf, torch_home = tmp_path / "hf", tmp_path / "torch"
    repo = hf / "hub" / "models--timm--deit_tiny_patch16_224.fb_in1k"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc").write_bytes(b"x" * 1000)
    (repo / "snapshots" / "rev").mkdir(parents=True)
    os.symlink(repo / "blobs" / "abc", repo / "snapshots" / "rev" / "model.safetensors")  # not counted twice
    (hf / "token").write_text("secret")
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    (torch_home / "hub" / "checkpoints" / "deit.pth").write_bytes(b"y" * 300)
    monkeypatch.setenv("HF_HOME", str(hf))
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    caches = {c["cache"]: c for c in bench.scan_caches()}
    hub_entries = caches["huggingface"]["entries"]
    assert [e["path"] for e in hub_entries] == ["hub/models--timm--deit_tiny_patch16_224.fb_in1k"]
    assert hub_entries[0]["bytes"] == 1000 + len(os.readlink(repo / "snapshots" / "rev" / "model.safetensors"))
    assert caches["torch"]["entries"] == [{"path": "hub/checkpoints/deit.pth", "bytes": 300}]


def test_fast_recipe_is_a_plain_vit_with_fast_settings():
    recipe = load_recipe(REPO_ROOT / "recipes" / "vit_cifar_fast.yaml")
    assert recipe.train.mode == "scratch" and recipe.model.arch.startswith("vit_cifar")
    assert recipe.train.compile and recipe.train.precision == "auto"  # bf16 on a GPU that has it
    assert "NOT" in (REPO_ROOT / "recipes" / "vit_cifar_fast.yaml").read_text()


# --- speed work must not change results -------------------------------------------------------


def _fused_available() -> bool:
    weight = torch.zeros(1, requires_grad=True)
    try:
        torch.optim.AdamW([weight], lr=1e-3, fused=True)
    except (RuntimeError, TypeError):
        return False
    return True


@pytest.mark.parametrize(
    "compile_model",
    [
        False,
        pytest.param(
            True,
            marks=pytest.mark.skipif(
                not os.environ.get("FINETUNE_TEST_COMPILE"),
                reason="torch.compile takes minutes on a cold CPU cache; set FINETUNE_TEST_COMPILE=1",
            ),
        ),
    ],
)
def test_fast_path_losses_match_a_plain_eager_fp32_loop(tmp_path, compile_model):
    """The engine's fast settings (compile, channels-last, fused AdamW, bf16 request) give the same
    per-step losses as a plain eager fp32 loop over the same batches from the same initial weights."""
    steps, batch = 5, 16
    fused = _fused_available()
    recipe = recipe_from_dict(
        {
            "name": "fast",
            "seed": 3,
            "device": "cpu",
            "model": {"arch": "vit_tiny_test", "img_size": 32},
            "train": {
                "mode": "scratch", "epochs": 1, "precision": "bf16", "compile": compile_model,
                "channels_last": True, "label_smoothing": 0.1, "log_every": 1,
            },
            "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.05, "fused": fused},
            "schedule": {"name": "constant", "warmup_epochs": 0.0},
            "data": {
                "name": "synthetic", "synthetic_train": steps * batch, "synthetic_test": batch,
                "batch_size": batch, "augment": {"hflip": True, "crop_padding": 4},
            },
            "output": {"dir": str(tmp_path), "save_model": False, "plots": False},
        }
    )
    prepared = prepare(recipe)
    eager_model = copy.deepcopy(prepared.model)  # the engine trains prepared.model in place
    run(recipe, prepared=prepared, quiet=True)
    rows = [json.loads(line) for line in (run_dir_for(recipe) / "metrics.jsonl").read_text().splitlines()]
    fast_losses = [row["loss"] for row in rows if row["kind"] == "step"]

    # The plain loop: contiguous fp32 batches, eager model, unfused single-tensor AdamW.
    loader = BatchLoader(
        prepared.data.train, batch_size=batch, train=True, device=torch.device("cpu"), out_size=prepared.out_size,
        mean=prepared.mean, std=prepared.std, augment=recipe.data.augment, seed=recipe.seed,
    )
    loader.set_epoch(1)  # the engine's first epoch
    optimizer = torch.optim.AdamW(
        param_groups(eager_model, weight_decay=0.05), lr=3e-3, betas=(0.9, 0.999), foreach=False, fused=False
    )
    eager_model.train()
    eager_losses = []
    for x, y in loader:
        loss = F.cross_entropy(eager_model(x), y, label_smoothing=0.1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        eager_losses.append(loss.item())

    assert len(fast_losses) == len(eager_losses) == steps
    # The losses move by ~1e-2 per step at this lr, so a mismatch in data, init or update shows.
    assert max(abs(a - b) for a, b in zip(eager_losses, eager_losses[1:])) > 1e-2
    # Step 1's loss depends only on the initial weights, the batch and the forward pass: the two loops
    # agree to fp32 rounding there. Later losses also pass through different update kernels (fused
    # AdamW against a per-parameter loop) whose rounding differs and grows step by step, by a
    # different amount on each CPU (4.1e-4 at step 5 on an AMD EPYC, less on an Intel Xeon). A wrong
    # batch, init or update moves the loss by 1e-2 or more (asserted above), five times the
    # tolerance kept for the later steps.
    torch.testing.assert_close(fast_losses[0], eager_losses[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(fast_losses), torch.tensor(eager_losses), rtol=0, atol=2e-3)


def test_checkpoint_cost_measures_a_real_checkpoint():
    spec = importlib.util.spec_from_file_location("checkpoint_cost", REPO_ROOT / "benchmarks" / "checkpoint_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    row = module.measure("vit_cifar_s", "cpu", batch=8, steps=1, repeats=1)
    # AdamW keeps two moments per weight: the checkpoint is about three copies of the model.
    assert 2.5 * 4 * row["params"] / 2**20 < row["checkpoint_mb"] < 3.5 * 4 * row["params"] / 2**20
    assert row["checkpoint_s_median"] > 0 and row["step_s_median"] > 0
    assert row["share_of_epoch"] == pytest.approx(row["checkpoint_s_median"] / row["epoch_s_estimate"])
    assert row["epoch_s_estimate"] == pytest.approx(50_000 // 8 * row["step_s_median"])


def test_cpu_lab_tiny_run_times_every_path(tmp_path):
    """benchmarks/cpu_lab.py --tiny: the lab loop, the timm-style loop and finetune, all in one process."""
    spec = importlib.util.spec_from_file_location("cpu_lab", REPO_ROOT / "benchmarks" / "cpu_lab.py")
    cpu_lab = importlib.util.module_from_spec(spec)
    sys.modules["cpu_lab"] = cpu_lab  # dataclasses look their module up by name
    spec.loader.exec_module(cpu_lab)
    out = tmp_path / "results"
    env_before = {k: os.environ.get(k) for k in ("FINETUNE_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")}
    result = CliRunner().invoke(cpu_lab.app, ["--tiny", "--out", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    (json_file,) = out.glob("cpu-lab-*.json")
    assert json_file.with_suffix(".md").is_file()
    results = json.loads(json_file.read_text())
    rows = {r["name"]: r for r in results["rows"]}
    for path, name in results["headline"].items():
        assert name in rows, path
        assert rows[name]["status"] == "ok" and rows[name]["images_per_s"] > 0, path
        assert rows[name]["epoch_s"] == pytest.approx(50_000 / rows[name]["images_per_s"])
    assert {rows[n]["path"] for n in results["headline"].values()} == {"lab", "timm", "finetune"}
    assert results["peak"]["fp32"]["best_gflops"] > 0
    assert all(v is not None for v in results["ratios"].values())
    # The run's caches lived in its own temp folder; the environment is as it was.
    assert {k: os.environ.get(k) for k in env_before} == env_before


def test_time_to_accuracy_reads_a_real_run_folder(tmp_path):
    """benchmarks/time_to_accuracy.py on a run folder finetune wrote: the first epoch at the target,
    the accuracy by given minutes, and the three files."""
    spec = importlib.util.spec_from_file_location("time_to_accuracy", REPO_ROOT / "benchmarks" / "time_to_accuracy.py")
    tta = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tta)
    recipe = load_recipe(REPO_ROOT / "recipes" / "quick_cpu.yaml",
                         [f"output.dir={tmp_path}", "output.plots=false", "train.epochs=3", "data.val_split=64"])
    run(recipe, quiet=True)
    folder = run_dir_for(recipe)
    rows = read_run(folder).epoch_rows
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    # A target below every epoch's accuracy is reached at epoch 1; one above them all never.
    assert tta.first_at(rows, "test_acc1", -1.0)["epoch"] == 1 and tta.first_at(rows, "test_acc1", 1.01) is None
    assert tta.at_minutes(rows, "val_acc1", 0.0) is None  # no epoch ends within 0 s of training
    assert tta.at_minutes(rows, "val_acc1", 1e6) == rows[-1]["val_acc1"]
    out = tmp_path / "result"
    result = CliRunner().invoke(tta.app, [str(folder), "--target", "0.5", "--out", str(out), "--note", "made 'here'"])
    assert result.exit_code == 0, result.output
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["runs"][0]["epochs_done"] == 3 and saved["runs"][0]["val_images"] == 64
    text = out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 0 and "first epoch at 50.00% test" in text
    assert "- made 'here'" in text and saved["notes"] == ["made 'here'"]
    bad = CliRunner().invoke(tta.app, [str(tmp_path / "nothing")])
    assert bad.exit_code == 2 and "not a run folder" in bad.output


def test_time_to_accuracy_reports_a_budgeted_run_its_selection_and_share_of_peak(tmp_path, monkeypatch):
    """A run trained to a time budget: the table shows its plan and use, the figure is the test
    top-1 at the epoch validation chose, and --flops with a given peak gives the share of it."""
    import finetune.training.budget as budget

    spec = importlib.util.spec_from_file_location("time_to_accuracy", REPO_ROOT / "benchmarks" / "time_to_accuracy.py")
    tta = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tta)
    # A fixed probe record (0.01 s a step), so the plan does not depend on how busy the machine is.
    monkeypatch.setattr(budget, "time_steps", lambda step, **kwargs: {
        "median_s": 0.01, "p90_s": 0.01, "steps": 7, "seconds": 0.5, "noisy": False})
    recipe = load_recipe(REPO_ROOT / "recipes" / "quick_cpu.yaml",
                         [f"output.dir={tmp_path}", "output.plots=false", "train.time_budget=0.004",
                          "data.val_split=64"])
    run(recipe, quiet=True)
    folder = run_dir_for(recipe)
    record = read_run(folder)
    planned = record.summary["time_budget"]["planned_steps"]
    assert planned == math.floor(0.004 * 60 * 0.95 / 0.01)  # 22 steps of 0.01 s in 95% of 0.24 s
    epochs = record.summary["time_budget"]["planned_epochs"]
    assert epochs == math.ceil(planned / record.summary["time_budget"]["steps_per_epoch"])
    out = tmp_path / "result"
    result = CliRunner().invoke(tta.app, [str(folder), "--out", str(out), "--flops", "--peak-gflops", "100"])
    assert result.exit_code == 0, result.output
    described = json.loads(out.with_suffix(".json").read_text())["runs"][0]
    best = max(record.epoch_rows, key=lambda r: r["val_acc1"])  # the first best, as the run keeps it
    assert described["selected"]["epoch"] == record.best_epoch == best["epoch"]
    assert described["selected"]["test_acc1"] == best["test_acc1"]
    assert described["time_budget"]["planned_steps"] == planned
    assert described["flops_per_image"] > 0
    assert described["achieved_gflops"] == pytest.approx(described["flops_per_image"] * record.summary["images_per_s"] / 1e9)
    assert described["share_of_peak"] == pytest.approx(described["achieved_gflops"] / 100)
    text = out.with_suffix(".md").read_text()
    row = next(line for line in text.splitlines() if line.startswith(f"| {folder} | 0.004 min"))
    within = {True: "yes", False: "no"}[record.summary["time_budget"]["within_budget"]]  # the fake probe may be short
    assert f"| {planned:,} ({epochs}) |" in row and f"| {within} |" in row
    assert f"{100 * described['share_of_peak']:.1f}%" in text and "given with --peak-gflops" in text
