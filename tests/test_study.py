"""Studies: an experiment file's ``grid`` (finetune.experiments.grid), run by ``finetune compare``,
resumed after a kill, and reported averaged over seeds (finetune.experiments.study_report).

Runs use the toy setup of test_experiment.py (quick_cpu's synthetic images, vit_tiny_test), so a
whole 8-run study takes seconds.
"""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from conftest import REPO_ROOT, send_at_step
from finetune import create_model, save_model
from finetune.cli import app
from finetune.errors import ExperimentError, RunInterrupted
from finetune.experiments.execute import run_experiment
from finetune.experiments.grid import run_tag
from finetune.experiments.spec import EXPERIMENT_FILE, load_experiment, read_experiment_folder
from finetune.runs.records import read_run
from test_experiment import PNG_MAGIC, spy_resumes, spy_runs, summary_of, write_experiment

runner = CliRunner()
GRID = {"seed": [0, 1], "data.train_subset": {24: {"train.epochs": 2}, 48: None}}


def toy_source(folder: Path) -> str:
    """A saved vit_tiny_test with random weights: the 'pretrained' model the variants fine-tune."""
    if not (folder / "toy").is_dir():
        torch.manual_seed(0)
        save_model(create_model("vit_tiny_test", num_classes=10), folder / "toy")
    return str(folder / "toy")


def variants(tmp_path: Path) -> dict:
    source = {"model.source": toy_source(tmp_path), "model.arch": None, "data.batch_size": 8}
    return {"head": {"train.mode": "head", "optim.lr": 3.0e-3, **source}, "full": {"train.mode": "full", **source}}


def study_file(tmp_path, name="study", **top):
    return write_experiment(tmp_path, variants(tmp_path), name=name, grid=GRID, **top)


def test_a_grid_runs_every_variant_at_every_point_first_axis_slowest(tmp_path):
    exp = load_experiment(study_file(tmp_path))
    names = [n for n, _ in exp.variants]
    assert names == ["head_s0_n24", "full_s0_n24", "head_s0_n48", "full_s0_n48",
                     "head_s1_n24", "full_s1_n24", "head_s1_n48", "full_s1_n48"]
    recipes = dict(exp.variants)
    # The point's settings come after the variant's; its own settings only at its value.
    assert recipes["head_s1_n24"].seed == 1 and recipes["head_s1_n24"].data.train_subset == 24
    assert recipes["head_s1_n24"].train.epochs == 2 and recipes["head_s0_n48"].train.epochs == 1
    assert recipes["head_s0_n48"].train.mode == "head" and recipes["full_s0_n48"].train.mode == "full"
    assert recipes["head_s0_n48"].optim.lr == 3.0e-3
    assert exp.study.x_key == "data.train_subset"
    assert exp.study.runs["full_s1_n48"] == ("full", {"seed": 1, "data.train_subset": 48})
    assert exp.study.variants == ["head", "full"]


def test_run_tags_are_folder_safe():
    assert run_tag("seed", 3) == "s3" and run_tag("data.train_subset", 250) == "n250"
    assert run_tag("optim.lr", 0.001) == "lr0.001" and run_tag("model.pos_embed_mode", "bicubic") == "pos_embed_modebicubic"
    assert run_tag("data.mean", "a/b c") == "meana-b-c"


@pytest.mark.parametrize(
    "grid, message",
    [
        ({"seeed": [0, 1]}, "unknown key 'seeed'"),
        ({"seed": []}, "has no values"),
        ({"seed": [0, 0]}, "lists a value twice"),
        ({"seed": 3}, "must be a list of values or a mapping"),
        ({"data.train_subset": {24: {"train.epoch": 2}}}, "unknown key 'train.epoch'"),
        ({"data.train_subset": {24: 5}}, "must be a mapping of dotted.key: value"),
        ({"name": ["a", "b"]}, "cannot be set here"),
        ([1, 2], "must be a mapping of dotted recipe keys"),
    ],
)
def test_a_bad_grid_is_refused_by_name(tmp_path, grid, message):
    path = write_experiment(tmp_path, variants(tmp_path), grid=grid)
    with pytest.raises(ExperimentError, match=message):
        load_experiment(path)


def test_a_command_line_override_of_a_grid_axis_is_refused(tmp_path):
    with pytest.raises(ExperimentError, match="command-line override sets seed, which the grid sets for every run"):
        load_experiment(study_file(tmp_path), ["seed=5"])


@pytest.mark.parametrize("where, message", [
    ("variant", "variant 'head' sets data.train_subset"),
    ("overrides", "the file's overrides sets seed"),
    ("value", "grid.data.train_subset value 24 sets seed"),
])
def test_a_grid_axis_set_anywhere_else_is_refused(tmp_path, where, message):
    own = variants(tmp_path)
    grid = {"seed": [0, 1], "data.train_subset": {24: {"train.epochs": 2}, 48: None}}
    top = {}
    if where == "variant":
        own["head"]["data.train_subset"] = 100  # silently replaced by the grid's values
    elif where == "overrides":
        top["overrides_extra"] = ["seed=3"]
    else:
        grid["data.train_subset"][24]["seed"] = 7  # two runs of one recipe under two names
    path = write_experiment(tmp_path, own, grid=grid)
    if top:
        doc = yaml.safe_load(path.read_text())
        doc["overrides"] += top["overrides_extra"]
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(ExperimentError, match=message):
        load_experiment(path)


def test_a_study_with_a_bad_value_names_the_run_that_does_not_validate(tmp_path):
    path = write_experiment(tmp_path, variants(tmp_path), grid={"data.train_subset": ["many"]})
    with pytest.raises(ExperimentError, match="variant 'head' at nmany does not validate"):
        load_experiment(path)


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("study")
    exp = load_experiment(study_file(tmp_path))
    return tmp_path, exp, run_experiment(exp, quiet=True)


def test_the_study_report_averages_seeds_per_variant_and_size(finished_study):
    _, exp, result = finished_study
    assert not result.failed and len(result.variants) == 8
    rows = list(csv.DictReader((exp.dir / "study.csv").open()))
    assert [(r["variant"], r["data.train_subset"]) for r in rows] == [("head", "24"), ("full", "24"), ("head", "48"), ("full", "48")]
    for row in rows:
        runs = [read_run(exp.dir / f"{row['variant']}_s{s}_n{row['data.train_subset']}") for s in (0, 1)]
        # Every run held out a validation split, so the study reads test top-1 at the epoch chosen on it.
        scores = [100 * r.best_test_acc1 for r in runs]
        assert row["ranked_on"] == "validation" and row["seeds_finished"] == "2"
        assert float(row["score_mean_pct"]) == pytest.approx(statistics.fmean(scores), abs=1e-3)
        assert float(row["score_std_pct"]) == pytest.approx(statistics.stdev(scores), abs=1e-3)
        assert row["scores_pct"] == " ".join(f"{s:.2f}" for s in scores)
        # Every run's training time, so a median or the least disturbed run can be read from the file.
        times = [float(t) for t in row["train_times_s"].split()]
        assert times == pytest.approx([r.train_time_s for r in runs], abs=0.05)
        assert float(row["train_time_mean_s"]) == pytest.approx(statistics.fmean(times), abs=0.05)
        assert int(row["params_trainable"]) == runs[0].params_trainable
    head, full = rows[0], rows[1]
    assert int(head["params_trainable"]) < int(full["params_trainable"])
    # The table compare prints is the study's (one row per variant and size), not one row per run.
    assert "| head | 24 | 2/2 |" in result.table and "full_s1_n48" not in result.table
    study_md = (exp.dir / "study.md").read_text()
    assert "study.png" in study_md and "over 2 seeds per row" in study_md
    assert "mean of 2 seeds per point" in Image.open(exp.dir / "study.png").text["Title"]
    assert "study.md" in (exp.dir / "report.md").read_text()
    png = exp.dir / "study.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert "ranked on validation" in Image.open(png).text["Title"]
    assert (exp.dir / "study_tradeoff.png").read_bytes()[:8] == PNG_MAGIC


def test_the_study_figure_shows_each_points_fastest_seed(finished_study):
    """study.png's time panel: per point the training time of the fastest seed (a run slowed by
    another process on the machine must not move it), beside every seed's score."""
    from finetune.experiments.study_report import _series, study_cells

    _, exp, _ = finished_study
    runs = [read_run(exp.dir / name) for name, _ in exp.variants]
    series = _series(study_cells(runs, exp.study, "val"), exp.study, "val")
    assert sorted(series) == ["full", "head"]
    for variant, points in series.items():
        for x, scores, time_s in points:
            seeds = [read_run(exp.dir / f"{variant}_s{s}_n{x}") for s in (0, 1)]
            assert time_s == min(r.train_time_s for r in seeds)
            assert scores == [100 * r.best_test_acc1 for r in seeds]


def test_the_convergence_tool_reads_each_runs_last_rise_of_validation(finished_study, tmp_path):
    """tools/study_convergence.py: every finished run with two evaluations, in the study's order,
    the last rise of validation top-1 exact, the table's cell its mean over seeds, and the same
    table again from the CSV it wrote."""
    import importlib.util

    _, exp, _ = finished_study
    spec = importlib.util.spec_from_file_location("study_convergence", REPO_ROOT / "tools" / "study_convergence.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "convergence.csv"
    result = CliRunner().invoke(tool.app, [str(exp.dir), "--csv", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    # 24 images train 2 epochs (two evaluations); 48 images one, which says nothing about a rise.
    assert [r["run"] for r in rows] == ["head_s0_n24", "full_s0_n24", "head_s1_n24", "full_s1_n24"]
    for row in rows:
        evals = read_run(exp.dir / row["run"]).epoch_rows
        assert float(row["rise_pts"]) == pytest.approx(100 * (evals[1]["val_acc1"] - evals[0]["val_acc1"]), abs=1e-3)
    head = statistics.fmean(float(r["rise_pts"]) for r in rows if r["variant"] == "head")
    assert result.output.splitlines()[0] == "| images | head | full |"
    assert result.output.splitlines()[2].startswith(f"| 24 | {head:+.1f} |".replace("+0.0", "0.0").replace("-0.0", "0.0"))
    again = CliRunner().invoke(tool.app, ["--from-csv", str(out)])
    assert again.exit_code == 0 and again.output == result.output
    assert CliRunner().invoke(tool.app, [str(tmp_path / "nothing"), "--from-csv", str(out)]).exit_code == 2
    missing = CliRunner().invoke(tool.app, [str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "is not a folder" in missing.output


def test_experiment_yaml_remembers_the_study_and_report_rebuilds_it(finished_study, tmp_path):
    _, exp, _ = finished_study
    raw = yaml.safe_load((exp.dir / EXPERIMENT_FILE).read_text())
    assert "grid" not in raw and raw["study"]["runs"]["head_s1_n24"] == {"variant": "head", "point": {"seed": 1, "data.train_subset": 24}}
    dirs, _, _, study = read_experiment_folder(exp.dir)
    assert len(dirs) == 8 and study.runs == exp.study.runs
    # Read back from its folder, the experiment is the same study.
    again = load_experiment(exp.dir)
    assert again.study.runs == exp.study.runs and [n for n, _ in again.variants] == [n for n, _ in exp.variants]
    out = tmp_path / "report"
    result = runner.invoke(app, ["report", str(exp.dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "study.csv").read_text() == (exp.dir / "study.csv").read_text()
    assert "| full | 48 | 2/2 |" in result.output


def test_a_killed_study_resumes_where_it_stopped_and_reruns_nothing_finished(tmp_path, monkeypatch):
    path = study_file(tmp_path)
    send_at_step(monkeypatch, 2, run="head_s0_n48")  # the third run, at its second step
    with pytest.raises(RunInterrupted):
        run_experiment(load_experiment(path), quiet=True)
    exp_dir = tmp_path / "runs" / "study"
    assert [summary_of(exp_dir / n)["status"] for n in ("head_s0_n24", "full_s0_n24", "head_s0_n48")] == [
        "finished", "finished", "interrupted"]
    assert not (exp_dir / "full_s0_n48").exists()
    monkeypatch.undo()
    calls, resumed = spy_runs(monkeypatch), spy_resumes(monkeypatch)
    result = runner.invoke(app, ["compare", str(path), "-q"])
    assert result.exit_code == 0, result.output
    assert resumed == ["head_s0_n48"]
    # Even with -q the log says which folder was resumed and why.
    assert "head_s0_n48: (resuming: status interrupted, from its last checkpoint)" in " ".join(result.output.split())
    assert calls == ["full_s0_n48", "head_s1_n24", "full_s1_n24", "head_s1_n48", "full_s1_n48"]
    rows = list(csv.DictReader((exp_dir / "study.csv").open()))
    assert all(r["seeds_finished"] == "2" and math.isfinite(float(r["score_mean_pct"])) for r in rows)


def test_dry_run_counts_runs_variants_and_points(tmp_path):
    result = runner.invoke(app, ["compare", str(study_file(tmp_path)), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "8 runs (2 variants at 4 grid points) validate" in result.output


def test_the_shipped_study_validates_with_three_seeds_and_four_sizes():
    exp = load_experiment(REPO_ROOT / "recipes" / "transfer_study.yaml")
    assert [k for k, _ in exp.study.axes] == ["seed", "data.train_subset"]
    assert len(exp.variants) == 7 * 3 * 4
    recipes = dict(exp.variants)
    # One validation split per seed: every variant at every size holds out the same 2,500 images.
    assert {r.data.val_split for r in recipes.values()} == {2500}
    assert {r.data.train_subset + r.data.val_split for r in recipes.values()} <= {2750, 3500, 7500, 25000}
    assert recipes["scratch_s2_n250"].model.source is None and recipes["full_s2_n250"].model.source


# --- steering an experiment: --only, --skip, and the dry run's weights check ----------------


def test_only_and_skip_choose_what_trains_and_the_report_covers_the_rest(tmp_path, monkeypatch):
    path = study_file(tmp_path)
    calls = spy_runs(monkeypatch)
    result = runner.invoke(app, ["compare", str(path), "-q", "--only", "full"])  # a study's variant: all its runs
    assert result.exit_code == 0, result.output
    assert calls == ["full_s0_n24", "full_s0_n48", "full_s1_n24", "full_s1_n48"]
    exp_dir = tmp_path / "runs" / "study"
    rows = {(r["variant"], r["data.train_subset"]): r for r in csv.DictReader((exp_dir / "study.csv").open())}
    assert rows[("full", "24")]["seeds_finished"] == "2" and rows[("head", "24")]["seeds_finished"] == "0"
    assert "over 2 seeds per row" in (exp_dir / "study.md").read_text()  # the head rows, unfinished, are not drawn
    calls.clear()
    result = runner.invoke(app, ["compare", str(path), "-q", "--skip", "*_n48", "--skip", "head_s1_n24"])
    assert result.exit_code == 0, result.output
    assert calls == ["head_s0_n24"]  # the full runs are reused, the rest left out
    # A part-finished study says how many seeds its points rest on, not how many were asked.
    assert "over 1 to 2 seeds (of 2 asked) per row" in (exp_dir / "study.md").read_text()
    assert "mean of 1 to 2 seeds (of 2 asked) per point" in Image.open(exp_dir / "study.png").text["Title"]


def test_only_or_skip_that_matches_nothing_is_refused(tmp_path):
    result = runner.invoke(app, ["compare", str(study_file(tmp_path)), "--dry-run", "--only", "ful"])
    assert result.exit_code == 1 and "'ful' match(es) no run" in result.stderr and "full_s0_n24" in result.stderr


def test_dry_run_names_the_variants_whose_weights_cannot_be_had(tmp_path):
    missing = {"model.source": str(tmp_path / "not_trained_yet"), "model.arch": None, "data.batch_size": 8}
    path = write_experiment(tmp_path, {**variants(tmp_path), "other": {"train.mode": "full", **missing}},
                            name="avail")
    result = runner.invoke(app, ["compare", str(path), "--dry-run"])
    assert result.exit_code == 1, result.output
    assert "1 of the 3 to train cannot get their weights: other: no such file or folder" in result.stderr
    assert not (tmp_path / "runs" / "avail").exists()
    result = runner.invoke(app, ["compare", str(path), "--dry-run", "--skip", "other"])
    assert result.exit_code == 0 and "2 to train, each with its weights at hand" in result.stdout
