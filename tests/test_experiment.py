"""Experiments (finetune.experiments and the compare / sweep / report commands).

Every run starts from the shipped ``recipes/quick_cpu.yaml`` (synthetic images, the toy
``vit_tiny_test`` preset) shrunk to 72 training images (7 held out for validation by the
experiment's default, 65 to train on: two batches of 32) and without per-run plots, so a run takes
a fraction of a second. The shipped compare files reference hub weights and CIFAR-10, so they are
only validated, never run.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import REPO_ROOT, send_at_step
from finetune.runs import run as train
from finetune.cli import app
from finetune.errors import ExperimentError
from finetune.experiments.execute import run_experiment
from finetune.experiments.plan import plan_experiment
from finetune.experiments.spec import EXPERIMENT_FILE, load_experiment
from finetune.experiments.sweep import format_run_value, sweep_experiment
from finetune.recipe import SHIPPED_RECIPES

QUICK = REPO_ROOT / "recipes" / "quick_cpu.yaml"
# Shared by every test experiment: tiny data, no per-run plots or weights (the report's plots stay).
FAST = [
    "data.synthetic_train=72",  # 10% held out for validation by default: 65 images, 2 batches of 32
    "data.synthetic_test=32",
    "output.plots=false",
    "output.save_model=false",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
runner = CliRunner()


def write_experiment(tmp_path: Path, variants: dict, name: str = "exp", **top) -> Path:
    """An experiment file over quick_cpu.yaml whose runs go under ``tmp_path/runs``."""
    doc = {
        "description": "test experiment",
        "name": name,
        "base": str(QUICK),
        "overrides": [*FAST, f"output.dir={tmp_path / 'runs'}"],
        **top,
        "variants": variants,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def spy_runs(monkeypatch) -> list[str]:
    """Record the name of every recipe that finetune.runs.run.run trains (from scratch, not resumed)."""
    calls: list[str] = []
    real_run = train.run

    def spy(recipe, **kwargs):
        calls.append(recipe.name)
        return real_run(recipe, **kwargs)

    monkeypatch.setattr(train, "run", spy)
    return calls


def spy_resumes(monkeypatch) -> list[str]:
    """Record the folder name of every run that finetune.runs.run.resume continues."""
    calls: list[str] = []
    real_resume = train.resume

    def spy(run_dir, **kwargs):
        calls.append(Path(run_dir).name)
        return real_resume(run_dir, **kwargs)

    monkeypatch.setattr(train, "resume", spy)
    return calls


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


# --- compare ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A three-variant compare, run once for the tests that only read its results."""
    tmp_path = tmp_path_factory.mktemp("compare")
    variants = {
        "base": {},
        "lr3e-3": {"optim.lr": 3.0e-3},
        "two_epochs": {"train": {"epochs": 2}, "data.batch_size": 16},  # a nested section works too
    }
    exp = load_experiment(write_experiment(tmp_path, variants))
    return exp, run_experiment(exp, quiet=True)


def test_compare_trains_every_variant_into_one_folder(finished):
    exp, result = finished
    assert [(v.name, v.status) for v in result.variants] == [
        ("base", "finished"), ("lr3e-3", "finished"), ("two_epochs", "finished"),
    ]
    assert exp.dir == result.variants[0].run_dir.parent
    for variant in result.variants:
        recorded = yaml.safe_load((variant.run_dir / "recipe.yaml").read_text())
        assert recorded["name"] == variant.name
        assert recorded["output"]["dir"] == str(exp.dir)
    # Variants differ only where they say so; everything else, seed and data included, is shared.
    recipes = dict(exp.variants)
    assert recipes["lr3e-3"].optim.lr == 3e-3 and recipes["base"].optim.lr == 1e-3
    assert (recipes["two_epochs"].train.epochs, recipes["two_epochs"].data.batch_size) == (2, 16)
    assert recipes["base"].data.synthetic_train == recipes["two_epochs"].data.synthetic_train == 72
    assert recipes["base"].data.val_split == recipes["two_epochs"].data.val_split == 0.1  # the default hold-out
    assert {r.seed for r in recipes.values()} == {0}


def test_compare_writes_the_table_and_plots(finished):
    exp, result = finished
    rows = read_csv(exp.dir / "report.csv")
    assert [r["name"] for r in rows] == ["base", "lr3e-3", "two_epochs"]
    assert [r["status"] for r in rows] == ["finished"] * 3
    # The varied settings are columns; settings all variants share are not.
    assert {"optim.lr", "train.epochs", "data.batch_size"} <= set(rows[0])
    assert "data.synthetic_train" not in rows[0]
    assert [r["train.epochs"] for r in rows] == ["1", "1", "2"]
    assert all(0 <= float(r["final_top1_pct"]) <= 100 for r in rows)
    for kind in ("acc_vs_epoch", "acc_vs_time"):
        assert result.report[kind].read_bytes().startswith(PNG_MAGIC)
    assert "sweep" not in result.report  # a comparison, not a sweep
    table, ranking = result.table.split("\n\n")  # the table, then the line on how it is ranked
    table_rows = table.splitlines()[2:]  # after the header and the alignment row
    assert [line.split("|")[1].strip() for line in table_rows] == ["base", "lr3e-3", "two_epochs"]
    assert ranking.startswith("Ranked on validation: best **")  # the default hold-out
    # What is printed is the terminal's compact table; report.md has every column and the same ranking.
    assert ranking in result.report["markdown"].read_text() and "Images/s" not in table


def test_experiment_yaml_reads_back_to_the_same_runs(finished):
    exp, _ = finished
    again = load_experiment(exp.dir)  # the folder stands for its experiment.yaml
    assert again.name == exp.name
    assert again.variants == exp.variants
    assert [p.action for p in plan_experiment(again)] == ["reuse"] * 3


def test_experiment_folder_reads_back_from_another_working_directory(tmp_path, monkeypatch):
    # experiment.yaml records a relative output.dir; the folder itself says where the runs are.
    monkeypatch.chdir(tmp_path)
    doc = {"name": "rel", "base": str(QUICK), "overrides": [*FAST, "output.dir=out"], "variants": {"a": {}}}
    (tmp_path / "rel.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    run_experiment(load_experiment(tmp_path / "rel.yaml"), quiet=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    again = load_experiment(tmp_path / "out" / "rel")
    assert again.dir == tmp_path / "out" / "rel"
    assert [p.action for p in plan_experiment(again)] == ["reuse"]


def test_report_command_rebuilds_an_experiment_report(finished, tmp_path):
    exp, _ = finished
    out = tmp_path / "report"
    result = runner.invoke(app, ["report", str(exp.dir), "--out", str(out), "--sweep-keys", "optim.lr"])
    assert result.exit_code == 0, result.output
    assert "| two_epochs | " in result.output and "| Status |" not in result.output  # all finished: no status column
    assert {r["name"] for r in read_csv(out / "report.csv")} == {"base", "lr3e-3", "two_epochs"}
    assert (out / "sweep.png").read_bytes().startswith(PNG_MAGIC)

    # Run folders one by one work too; a file is refused without a traceback.
    runs = [str(exp.dir / "base"), str(exp.dir / "lr3e-3")]
    assert runner.invoke(app, ["report", *runs, "--out", str(out)]).exit_code == 0
    assert [r["name"] for r in read_csv(out / "report.csv")] == ["base", "lr3e-3"]
    bad = runner.invoke(app, ["report", str(exp.dir / "report.md")])
    assert bad.exit_code == 1
    assert "is a file, not a run folder" in bad.output and "Traceback" not in bad.output


def test_overrides_apply_to_every_variant_after_its_own_settings(tmp_path):
    path = write_experiment(
        tmp_path, {"a": {"optim.lr": 3.0e-3}, "b": {"train.epochs": 2}}, overrides=[f"output.dir={tmp_path}", "seed=7"]
    )
    exp = load_experiment(path, ["train.epochs=3"])
    recipes = dict(exp.variants)
    assert recipes["a"].train.epochs == recipes["b"].train.epochs == 3  # the command line has the last word
    assert recipes["a"].optim.lr == 3e-3 and recipes["b"].optim.lr == 1e-3
    assert recipes["a"].seed == recipes["b"].seed == 7
    # quick_cpu.yaml's output.overwrite: true is not the experiment's to use.
    assert not recipes["a"].output.overwrite
    assert load_experiment(path, name="other").dir == tmp_path / "other"


# --- resume -----------------------------------------------------------------------------------


def test_rerun_reuses_finished_runs_resumes_interrupted_ones_and_replaces_the_rest(tmp_path, monkeypatch):
    path = write_experiment(tmp_path, {"a": {}, "b": {"optim.lr": 3.0e-3}, "c": {"train.epochs": 2}})
    calls, resumed = spy_runs(monkeypatch), spy_resumes(monkeypatch)
    run_experiment(load_experiment(path), quiet=True)
    assert calls == ["a", "b", "c"]
    exp_dir = tmp_path / "runs" / "exp"
    a_mtime = (exp_dir / "a" / "summary.json").stat().st_mtime_ns

    # b was interrupted (Ctrl-C) and c was killed before writing a summary or a checkpoint.
    summary = summary_of(exp_dir / "b") | {"status": "interrupted"}
    (exp_dir / "b" / "summary.json").write_text(json.dumps(summary))
    (exp_dir / "c" / "summary.json").unlink()
    (exp_dir / "c" / "checkpoints" / "last.safetensors").unlink()
    (exp_dir / "c" / "stale.txt").write_text("left by the killed run")

    assert [(p.action, p.reason) for p in plan_experiment(load_experiment(path))] == [
        ("reuse", ""), ("resume", "status interrupted, from its last checkpoint"),
        ("replace", "no readable summary.json"),
    ]
    calls.clear()
    from finetune.experiments.execute import console

    with console.capture() as captured:
        result = run_experiment(load_experiment(path), quiet=True)
    assert calls == ["c"] and resumed == ["b"]
    said = " ".join(captured.get().split())  # quiet, yet a log says what was resumed or replaced
    assert "c: (replacing an unfinished run: no readable summary.json)" in said and "b: (resuming: " in said
    assert [v.status for v in result.variants] == ["reused", "finished", "finished"]
    assert (exp_dir / "a" / "summary.json").stat().st_mtime_ns == a_mtime
    assert summary_of(exp_dir / "b")["status"] == "finished"
    assert not (exp_dir / "c" / "stale.txt").exists()  # the folder was replaced, not patched
    assert sorted(p.name for p in exp_dir.iterdir() if p.name.startswith(".")) == []  # nothing left aside

    calls.clear()
    assert [v.status for v in run_experiment(load_experiment(path), quiet=True).variants] == ["reused"] * 3
    assert calls == []


def test_an_experiment_stopped_mid_variant_resumes_it_exactly(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from finetune.errors import RunInterrupted
    from finetune.runs.folder import CHECKPOINT

    path = write_experiment(tmp_path, {"a": {}, "b": {"train.epochs": 3}, "c": {}})
    send_at_step(monkeypatch, 5, run="b")
    with pytest.raises(RunInterrupted):
        run_experiment(load_experiment(path), quiet=True)
    exp_dir = tmp_path / "runs" / "exp"
    assert summary_of(exp_dir / "b")["status"] == "interrupted" and not (exp_dir / "c").exists()

    monkeypatch.undo()
    calls, resumed = spy_runs(monkeypatch), spy_resumes(monkeypatch)
    result = runner.invoke(app, ["compare", str(path), "-q"])
    assert result.exit_code == 0, result.output
    assert calls == ["c"] and resumed == ["b"]
    # The same variant trained without the interruption ends with the same weights.
    again = write_experiment(tmp_path, {"b": {"train.epochs": 3}}, name="again")
    run_experiment(load_experiment(again), quiet=True)
    resumed_w = load_file(exp_dir / "b" / CHECKPOINT)
    straight_w = load_file(tmp_path / "runs" / "again" / "b" / CHECKPOINT)
    model_keys = [k for k in straight_w if k.startswith("model/")]
    assert model_keys and all(torch.equal(resumed_w[k], straight_w[k]) for k in model_keys)


def test_a_variant_being_trained_elsewhere_is_not_touched(tmp_path):
    from finetune.recipe import load_recipe
    from finetune.runs.rundir import RunDir

    path = write_experiment(tmp_path, {"a": {}})
    folder = tmp_path / "runs" / "exp" / "a"
    holder = RunDir.create(folder, load_recipe(QUICK), {"status": "running"}, overwrite=False)
    try:
        with pytest.raises(ExperimentError, match="being trained by another finetune process"):
            run_experiment(load_experiment(path), quiet=True)
    finally:
        holder.close()


def test_a_finished_run_with_another_recipe_is_refused(tmp_path, monkeypatch):
    path = write_experiment(tmp_path, {"a": {}, "b": {"optim.lr": 3.0e-3}})
    run_experiment(load_experiment(path), quiet=True)
    changed = write_experiment(tmp_path, {"a": {}, "b": {"optim.lr": 1.0e-2}})
    calls = spy_runs(monkeypatch)
    with pytest.raises(ExperimentError) as info:
        run_experiment(load_experiment(changed), quiet=True)
    message = str(info.value)
    assert "exp/b finished with another recipe (optim.lr: 0.003 -> 0.01)" in message
    assert "exp/a" not in message  # a's recipe did not change
    assert "--name" in message and "delete" in message
    assert calls == []  # refused before anything ran

    cli = runner.invoke(app, ["compare", str(changed), "-q"])
    assert cli.exit_code == 1
    assert "finished with another recipe" in cli.output and "Traceback" not in cli.output

    # A new experiment name starts afresh, leaving the earlier results alone.
    assert [p.action for p in plan_experiment(load_experiment(changed, name="exp2"))] == ["run", "run"]


# --- failures ---------------------------------------------------------------------------------


def test_failed_variants_are_recorded_and_the_rest_still_run(tmp_path, monkeypatch):
    import finetune.training.loop as loop

    real_evaluate = loop.evaluate

    def evaluate(model, loader, num_classes, **kwargs):
        if loader.batch_size == 48:  # only the `crash` variant: a bug inside the training loop
            raise RuntimeError("boom in evaluation")
        return real_evaluate(model, loader, num_classes, **kwargs)

    monkeypatch.setattr(loop, "evaluate", evaluate)
    missing = tmp_path / "missing.safetensors"
    path = write_experiment(tmp_path, {
        "first": {},
        "no_weights": {"train.mode": "full", "model.source": str(missing)},  # fails before a run folder exists
        "crash": {"data.eval_batch_size": 48},
        "last": {"optim.lr": 3.0e-3},
    })
    result = runner.invoke(app, ["compare", str(path), "-q"])
    assert result.exit_code == 1
    assert "2 of 4 variants failed: no_weights, crash" in result.output
    assert "| last | finished |" in result.output  # the table is printed before the error
    # Even with -q each failure says what went wrong, where it happened: a run refused before it
    # could write its folder (a resume from an unusable checkpoint, say) is recorded nowhere else.
    assert "[2/4] no_weights failed: " in result.output and "[3/4] crash failed: RuntimeError: boom in evaluation" in result.output

    exp_dir = tmp_path / "runs" / "exp"
    rows = {r["name"]: r for r in read_csv(exp_dir / "report.csv")}
    assert [rows[n]["status"] for n in ("first", "no_weights", "crash", "last")] == [
        "finished", "failed", "failed", "finished",
    ]
    assert rows["no_weights"]["error"].startswith("SourceNotFoundError:")
    assert rows["crash"]["error"] == "RuntimeError: boom in evaluation"
    # The run that failed before training still has a self-describing folder.
    assert yaml.safe_load((exp_dir / "no_weights" / "recipe.yaml").read_text())["model"]["source"] == str(missing)
    assert summary_of(exp_dir / "no_weights")["status"] == "failed"
    assert (exp_dir / "crash" / "metrics.jsonl").exists()  # the engine's own record of the crash
    assert "## Errors" in (exp_dir / "report.md").read_text()

    # Rerunning retries only the failed variants.
    calls = spy_runs(monkeypatch)
    runner.invoke(app, ["compare", str(path), "-q"])
    assert calls == ["no_weights", "crash"]


# --- sweep ------------------------------------------------------------------------------------


def test_sweep_runs_the_grid_and_writes_the_sweep_report(tmp_path):
    args = ["sweep", str(QUICK), "--grid", "optim.lr=1e-3,3e-4", "--grid", "data.batch_size=16,32",
            *FAST, f"output.dir={tmp_path}", "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    exp_dir = tmp_path / "quick_cpu_sweep_lr_bs"
    rows = read_csv(exp_dir / "report.csv")
    assert [r["name"] for r in rows] == ["lr1e-3_bs16", "lr1e-3_bs32", "lr3e-4_bs16", "lr3e-4_bs32"]
    assert list(rows[0])[2:4] == ["optim.lr", "data.batch_size"]  # the swept keys lead the settings
    assert [(r["optim.lr"], r["data.batch_size"]) for r in rows] == [
        ("0.001", "16"), ("0.001", "32"), ("0.0003", "16"), ("0.0003", "32"),
    ]
    for png in ("sweep.png", "acc_vs_epoch.png", "acc_vs_time.png"):
        assert (exp_dir / png).read_bytes().startswith(PNG_MAGIC)
    assert yaml.safe_load((exp_dir / EXPERIMENT_FILE).read_text())["sweep_keys"] == ["optim.lr", "data.batch_size"]
    assert "| lr3e-4_bs32 | " in result.output


def test_sweep_values_are_typed_against_the_schema(tmp_path):
    exp = sweep_experiment(
        QUICK, ["data.train_subset=0.5,48", "train.ema=true,false"], [f"output.dir={tmp_path}"]
    )
    assert exp.name == "quick_cpu_sweep_n_ema"
    assert exp.sweep_keys == ["data.train_subset", "train.ema"]
    subsets = {name: recipe.data.train_subset for name, recipe in exp.variants}
    assert subsets == {"n0.5_ema-true": 0.5, "n0.5_ema-false": 0.5, "n48_ema-true": 48, "n48_ema-false": 48}
    assert isinstance(subsets["n0.5_ema-true"], float) and isinstance(subsets["n48_ema-true"], int)
    assert dict(exp.variants)["n48_ema-false"].train.ema is False
    assert sweep_experiment(QUICK, ["seed=1,2"], name="seeds").dir == Path("runs") / "seeds"


@pytest.mark.parametrize(
    ("value", "text"),
    [(1e-3, "1e-3"), (3e-4, "3e-4"), (0.01, "0.01"), (0.5, "0.5"), (2.0, "2"), (1.5e-5, "1.5e-5"),
     (128, "128"), (True, "true"), (None, "null"), ([0.5, 0.5], "0.5-0.5"), ("a/b c", "a-b-c")],
)
def test_run_names_show_values_compactly(value, text):
    assert format_run_value(value) == text


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        (["optim.lr"], "bad --grid 'optim.lr': expected KEY=VALUE1,VALUE2,..."),
        (["optim.lr="], "bad --grid 'optim.lr=': empty value"),
        (["optim.lr=1e-3,,3e-4"], "empty value"),
        (["=1,2"], "expected KEY=VALUE1"),
        (["optim.lrr=1e-3,3e-4"], "unknown key 'optim.lrr'. Did you mean 'optim.lr'?"),
        (["batch_size=32,64"], "Did you mean 'data.batch_size'?"),
        (["optim.lr=1e-3,0.001"], "the value 1e-3 is given twice"),
        (["optim.lr=1e-3", "optim.lr=3e-4"], "--grid optim.lr is given twice"),
        (["optim.lr=fast"], "optim.lr: expected a number, got 'fast'"),
        (["name=a,b"], "'name' cannot be set here"),
        ([], "a sweep needs at least one --grid"),
    ],
)
def test_bad_grids_are_clear_errors(grid, message, tmp_path):
    args = ["sweep", str(QUICK), *(a for g in grid for a in ("--grid", g)), f"output.dir={tmp_path}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output
    assert not list(tmp_path.iterdir())  # nothing ran


# --- experiment file errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variants", "message"),
    [
        ({"ok": {}, "typo": {"optim.lrr": 1.0e-3}}, "variant 'typo': unknown key 'optim.lrr'. Did you mean 'optim.lr'?"),
        ({"typo": {"train": {"epoch": 2}}}, "variant 'typo': unknown key 'train.epoch'. Did you mean 'train.epochs'?"),
        ({"bad": {"train.mode": "hed"}}, "variant 'bad' does not validate:"),
        ({"bad": {"optim.lr": -1}}, "optim.lr: must be > 0.0, got -1"),
        ({"moved": {"output.dir": "elsewhere"}}, "variant 'moved': 'output.dir' cannot be set here"),
        ({"my run": {}}, "variant 'my run': a variant name becomes a folder"),
    ],
)
def test_bad_variants_are_clear_errors(variants, message, tmp_path, monkeypatch):
    calls = spy_runs(monkeypatch)
    result = runner.invoke(app, ["compare", str(write_experiment(tmp_path, variants)), "-q"])
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output
    assert calls == [] and not (tmp_path / "runs").exists()  # validated before anything ran


def test_bad_experiment_files_are_clear_errors(tmp_path):
    recipe_as_experiment = runner.invoke(app, ["compare", str(QUICK)])
    assert recipe_as_experiment.exit_code == 1
    assert "unknown experiment key(s)" in recipe_as_experiment.output
    assert "Run it with `finetune run`" in recipe_as_experiment.output

    typo = tmp_path / "typo.yaml"
    typo.write_text(f"base: {QUICK}\nvariant:\n  a: {{}}\n")
    assert "'variant' (did you mean 'variants'?)" in runner.invoke(app, ["compare", str(typo)]).output

    missing_base = tmp_path / "missing_base.yaml"
    missing_base.write_text("base: nowhere.yaml\nvariants:\n  a: {}\n")
    assert "base recipe 'nowhere.yaml' not found" in runner.invoke(app, ["compare", str(missing_base)]).output

    renamed = runner.invoke(app, ["compare", str(write_experiment(tmp_path, {"a": {}})), "name=x"])
    assert renamed.exit_code == 1 and "--name" in renamed.output


# --- the shipped compare files ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["compare_cifar.yaml", "compare_cifar32.yaml", "transfer_compare.yaml"])
def test_shipped_compare_file_validates(name, tmp_path, monkeypatch):
    from huggingface_hub import constants

    path = SHIPPED_RECIPES / name
    assert path.read_text().splitlines()[0].startswith(f"# finetune compare recipes/{name}")
    exp = load_experiment(path, [f"output.dir={tmp_path}"])
    assert exp.name == path.stem and exp.description
    recipes = [recipe for _, recipe in exp.variants]
    # One data split and seed for all, so the table compares like with like.
    assert len({(r.seed, r.data.model_dump_json()) for r in recipes}) == 1
    assert [p.action for p in plan_experiment(exp)] == ["run"] * len(recipes)
    # No weights here: an empty hub cache, offline, and no base run under ./runs.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    needs = [n for n, r in exp.variants if r.model.source and r.train.mode != "scratch"]
    result = runner.invoke(app, ["compare", str(path), "--dry-run", f"output.dir={tmp_path}"])
    assert needs and result.exit_code == 1, result.output
    assert f"{len(needs)} of the {len(recipes)} to train cannot get their weights" in result.stderr
    assert all(n in result.stderr for n in needs) and "--skip" in result.stderr
    # Leaving them out, the rest have what they need.
    result = runner.invoke(app, ["compare", str(path), "--dry-run", f"output.dir={tmp_path}", "--skip", ",".join(needs)])
    assert result.exit_code == 0, result.output
    assert f"{len(recipes) - len(needs)} to train, each with its weights at hand" in result.stdout
    assert not (tmp_path / exp.name).exists()  # a dry run writes nothing


def test_compare_cifar_contrasts_head_full_and_scratch():
    variants = dict(load_experiment(SHIPPED_RECIPES / "compare_cifar.yaml").variants)
    assert [(n, r.train.mode) for n, r in variants.items()] == [
        ("head", "head"), ("bitfit", "bitfit"), ("attn", "attn"), ("lora_r8", "lora"), ("full", "full"),
        ("scratch", "scratch"), ("scratch_20ep", "scratch"),
    ]
    for name in ("head", "bitfit", "attn", "lora_r8"):
        assert variants[name].model == variants["full"].model, name  # same pretrained DeiT-tiny
    for name in ("head", "bitfit", "attn"):
        assert variants[name].optim == variants["full"].optim, name  # only the trained part differs
    assert variants["scratch"].model.source is None and variants["scratch"].model.img_size == 32
    assert (variants["scratch"].train.epochs, variants["scratch_20ep"].train.epochs) == (2, 20)


def test_compare_cifar32_contrasts_position_embedding_fits():
    variants = dict(load_experiment(SHIPPED_RECIPES / "compare_cifar32.yaml").variants)
    settings = {n: (r.model.img_size, r.model.patch_size, r.model.pos_embed_mode) for n, r in variants.items()}
    assert settings == {
        "truncate": (32, None, "truncate"),
        "bicubic": (32, None, "bicubic"),
        "crop": (32, None, "crop"),
        "patch4": (32, 4, "bicubic"),
    }


def test_a_diverging_variant_is_marked_diverged_and_the_others_run(tmp_path):
    path = write_experiment(tmp_path, {"ok": {}, "boom": {"optim.lr": 1.0e6, "optim.name": "sgd"}, "after": {}})
    result = runner.invoke(app, ["compare", str(path), "-q"])
    assert result.exit_code == 1 and "1 of 3 variants failed: boom" in result.output
    assert "| boom | diverged: Training diverged" in result.output
    rows = {r["name"]: r for r in read_csv(tmp_path / "runs" / "exp" / "report.csv")}
    assert [rows[n]["status"] for n in ("ok", "boom", "after")] == ["finished", "diverged", "finished"]
    assert summary_of(tmp_path / "runs" / "exp" / "boom")["status"] == "diverged"
