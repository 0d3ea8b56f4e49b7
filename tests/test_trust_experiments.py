"""Choosing on the test set: experiments rank on validation by default, and say so when they don't.

``finetune compare`` and ``finetune sweep`` give every variant that has no validation split the
same default hold-out (``finetune.experiments.spec.DEFAULT_VAL_SPLIT``), rank on it and report test top-1
at the epoch chosen there. Opting out (``val_split: 0`` in the experiment file, or the override
``data.val_split=0``) ranks on test, and then every table, CSV and figure title says "ranked on
test"; ``finetune report`` over any runs follows the same rule. Figures are checked through the
titles ``finetune.viz.plots`` writes into each PNG's text chunks. Runs use the synthetic data of
``recipes/quick_cpu.yaml`` and take a fraction of a second each; the shipped CIFAR experiments are
only resolved and planned, never trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from conftest import REPO_ROOT
from finetune.cli import app
from finetune.experiments.execute import run_experiment
from finetune.experiments.plan import plan_experiment
from finetune.experiments.spec import DEFAULT_VAL_SPLIT, EXPERIMENT_FILE, load_experiment
from finetune.recipe import SHIPPED_RECIPES
from finetune.runs.records import read_metrics
from finetune.experiments.report import write_report
from test_experiment import FAST, read_csv, write_experiment
from test_report import make_run

QUICK = REPO_ROOT / "recipes" / "quick_cpu.yaml"
SHIPPED_EXPERIMENTS = ["compare_cifar.yaml", "compare_cifar32.yaml", "transfer_compare.yaml"]
TEST = "ranked on test"
VAL = "ranked on validation"
runner = CliRunner()


def png_titles(path: Path) -> str:
    """Every title and y label of a report figure, as written into the PNG's text chunks."""
    with Image.open(path) as image:
        text = dict(image.text)
    assert text.get("Title"), f"{path.name} has no title"
    return text["Description"]


def figures(paths: dict[str, Path]) -> dict[str, Path]:
    return {kind: p for kind, p in paths.items() if p.suffix == ".png"}


def table_heading(markdown: str) -> str:
    return next(line for line in markdown.splitlines() if line.startswith("| Run |"))


def assert_ranked_on_test(md: str, rows: list[dict], pngs: dict[str, Path], printed: str | None = None) -> None:
    """Every output of a report says it ranks on test: heading, table, summary line, CSV, figures."""
    assert f"## Results, {TEST}" in md
    assert f"Final test top-1 (%, {TEST})" in table_heading(md)
    assert "\nRanked on test (" in md  # the summary line under the table
    assert rows and all(r["ranked_on"] == "test" for r in rows)
    assert pngs, "no figures to check"
    for kind, png in pngs.items():
        assert TEST in png_titles(png), kind
    if printed is not None:
        assert f"Final test top-1 (%, {TEST})" in printed and "Ranked on test (" in printed


def assert_ranked_on_validation(md: str, rows: list[dict], pngs: dict[str, Path]) -> None:
    assert f"## Results, {VAL}" in md and "\nRanked on validation: best **" in md
    assert TEST not in md
    assert rows and all(r["ranked_on"] == "validation" for r in rows)
    for kind, png in pngs.items():
        titles = png_titles(png)
        assert VAL in titles and TEST not in titles, kind


def chosen_epoch(run_dir: Path) -> dict:
    """The epoch line with the best validation top-1 (the first of equal ones), from metrics.jsonl."""
    epochs = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "epoch"]
    return max(epochs, key=lambda r: r["val_acc1"])


# --- (a) the shipped experiments hold out validation and rank on it ---------------------------------


@pytest.mark.parametrize("name", SHIPPED_EXPERIMENTS)
def test_shipped_experiments_hold_out_a_validation_split_and_rank_on_it(name, tmp_path):
    exp = load_experiment(SHIPPED_RECIPES / name, [f"output.dir={tmp_path}"])
    splits = {variant: recipe.data.val_split for variant, recipe in exp.variants}
    assert set(splits.values()) == {DEFAULT_VAL_SPLIT} and DEFAULT_VAL_SPLIT > 0, splits  # the same for all
    assert exp.rank_on == "val" and exp.describe_ranking().startswith(VAL)
    assert [p.action for p in plan_experiment(exp)] == ["run"] * len(splits)


def test_compare_cifar_as_shipped_shows_its_hold_out_and_plans_to_rank_on_validation(tmp_path):
    path = SHIPPED_RECIPES / "compare_cifar.yaml"
    shown = runner.invoke(app, ["validate", str(path), "--show"])
    assert shown.exit_code == 0, shown.output
    variants = len(load_experiment(path).variants)
    # Visible in each variant's resolved recipe, not hidden in the experiment machinery.
    assert shown.output.count(f"val_split: {DEFAULT_VAL_SPLIT}") == variants == 7

    # The from-scratch variants need no weights (the others need DeiT-tiny from the hub: test_experiment).
    dry = runner.invoke(app, ["compare", str(path), "--dry-run", f"output.dir={tmp_path}", "--only", "scratch*"])
    assert dry.exit_code == 0, dry.output
    assert "ranked on validation (data.val_split=0.1 for every variant)" in dry.output
    assert not (tmp_path / "compare_cifar").exists()  # a dry run writes nothing
    # The command-line opt-out (val_split: 0 in the file is the other one, run below).
    opted_out = load_experiment(path, ["data.val_split=0"])
    assert {r.data.val_split for _, r in opted_out.variants} == {0}
    assert opted_out.rank_on == "test" and opted_out.describe_ranking().startswith(TEST)
    # An explicit hold-out is kept as given, for every variant.
    assert {r.data.val_split for _, r in load_experiment(path, ["data.val_split=5000"]).variants} == {5000}


# --- (b) a tiny compare and sweep rank on validation, and report test at the chosen epoch ----------


def test_a_compare_ranks_on_validation_and_reports_test_at_the_chosen_epoch(tmp_path):
    path = write_experiment(tmp_path, {"slow": {"optim.lr": 3.0e-4}, "fast": {"optim.lr": 3.0e-3}},
                            overrides=[*FAST, f"output.dir={tmp_path / 'runs'}", "train.epochs=3"])
    exp = load_experiment(path)
    assert {r.data.val_split for _, r in exp.variants} == {DEFAULT_VAL_SPLIT}
    result = run_experiment(exp, quiet=True)
    assert [v.status for v in result.variants] == ["finished", "finished"]

    md = result.report["markdown"].read_text()
    rows = {r["name"]: r for r in read_csv(result.report["csv"])}
    assert_ranked_on_validation(md, list(rows.values()), figures(result.report))
    assert TEST not in result.table and result.table.splitlines()[-1].startswith("Ranked on validation: best **")

    best_val = {}
    for variant in result.variants:
        summary = json.loads((variant.run_dir / "summary.json").read_text())
        assert summary["selection"] == "val" and summary["val_images"] == 7
        chosen, row = chosen_epoch(variant.run_dir), rows[variant.name]
        # The test top-1 reported is the one at the epoch chosen on validation.
        assert int(row["best_epoch"]) == chosen["epoch"] == summary["best_epoch"]
        assert float(row["test_top1_at_best_val_pct"]) == pytest.approx(100 * chosen["test_acc1"], abs=1e-3)
        best_val[variant.name] = chosen["val_acc1"]
    winner = max(best_val, key=best_val.get)  # the ranking follows validation
    assert rows[winner]["rank"] == "1"
    assert f"Ranked on validation: best **{winner}**" in md


def test_a_sweep_ranks_on_validation_by_default(tmp_path):
    args = ["sweep", str(QUICK), "--grid", "optim.lr=1e-3,3e-3", *FAST, "train.epochs=2", f"output.dir={tmp_path}", "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    exp_dir = tmp_path / "quick_cpu_sweep_lr"
    assert "Ranked on validation: best **" in result.output and TEST not in result.output
    rows = read_csv(exp_dir / "report.csv")
    assert [r["selection"] for r in rows] == ["val", "val"]
    pngs = {p.stem: p for p in exp_dir.glob("*.png")}
    assert set(pngs) == {"acc_vs_epoch", "acc_vs_time", "sweep"}
    assert_ranked_on_validation((exp_dir / "report.md").read_text(), rows, pngs)
    recorded = yaml.safe_load((exp_dir / EXPERIMENT_FILE).read_text())
    assert recorded["val_split"] == DEFAULT_VAL_SPLIT
    assert all(v["data"]["val_split"] == DEFAULT_VAL_SPLIT for v in recorded["variants"].values())


# --- (c) opting out: every table, CSV and figure says "ranked on test" -----------------------------


def test_opting_out_in_the_experiment_file_ranks_on_test_and_says_so_everywhere(tmp_path):
    path = write_experiment(tmp_path, {"a": {"optim.lr": 1.0e-3}, "b": {"optim.lr": 3.0e-3}},
                            val_split=0, sweep_keys=["optim.lr"])
    exp = load_experiment(path)
    assert {r.data.val_split for _, r in exp.variants} == {0} and exp.rank_on == "test"
    cli = runner.invoke(app, ["compare", str(path), "-q"])
    assert cli.exit_code == 0, cli.output
    exp_dir = tmp_path / "runs" / "exp"
    pngs = {p.stem: p for p in exp_dir.glob("*.png")}
    assert set(pngs) == {"acc_vs_epoch", "acc_vs_time", "sweep"}
    assert_ranked_on_test((exp_dir / "report.md").read_text(), read_csv(exp_dir / "report.csv"), pngs, cli.output)
    # The opt-out is recorded: the folder reads back to the same runs, still opted out.
    again = load_experiment(exp_dir)
    assert again.variants == exp.variants and again.rank_on == "test"
    assert [p.action for p in plan_experiment(again)] == ["reuse", "reuse"]


def test_runs_made_without_a_hold_out_are_kept_and_the_opt_out_reuses_them(tmp_path):
    # Runs from before the default hold-out (here: opted out) are never replaced by the new default.
    run_experiment(load_experiment(write_experiment(tmp_path, {"a": {}}, val_split=0)), quiet=True)
    refused = runner.invoke(app, ["compare", str(write_experiment(tmp_path, {"a": {}})), "--dry-run"])
    assert refused.exit_code == 1
    assert "finished with another recipe (data.val_split: 0 -> 0.1)" in refused.output
    assert "add data.val_split=0" in refused.output and "Traceback" not in refused.output
    again = load_experiment(tmp_path / "exp.yaml", ["data.val_split=0"])
    assert [p.action for p in plan_experiment(again)] == ["reuse"] and again.rank_on == "test"


def test_opting_out_with_the_override_labels_the_sweep_heatmap(tmp_path):
    args = ["sweep", str(QUICK), "--grid", "optim.lr=1e-3,3e-3", "--grid", "data.batch_size=16,32",
            *FAST, "data.val_split=0", f"output.dir={tmp_path}", "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    exp_dir = tmp_path / "quick_cpu_sweep_lr_bs"
    pngs = {p.stem: p for p in exp_dir.glob("*.png")}
    assert set(pngs) == {"acc_vs_epoch", "acc_vs_time", "sweep"}
    assert "red box" in png_titles(pngs["sweep"])  # the heatmap's boxed best cell is the test set's choice
    assert_ranked_on_test((exp_dir / "report.md").read_text(), read_csv(exp_dir / "report.csv"), pngs, result.output)


# --- (d) a report never ranks on test silently -----------------------------------------------------


RUN_SETS = {
    "no run validates": [dict(name="a", peak=0.7), dict(name="b", peak=0.8)],
    "one run does not validate": [dict(name="a", peak=0.9, val=True), dict(name="b", peak=0.6, val=True),
                                  dict(name="c", peak=0.5)],
    "a failed run beside": [dict(name="a", peak=0.7), dict(name="x", status="failed", error="boom")],
    "one run": [dict(name="a", peak=0.7)],
    "every run validates": [dict(name="a", peak=0.9, val=True), dict(name="b", peak=0.6, val=True)],
}


@pytest.mark.parametrize("case", list(RUN_SETS))
def test_a_report_never_ranks_on_test_silently(case, tmp_path):
    specs = RUN_SETS[case]
    modes = ["scratch", "full", "head"]
    runs = [make_run(tmp_path / "runs", s.pop("name"), optim__lr=10.0 ** -(i + 2), data__batch_size=32 * (1 + i % 2),
                     train__mode=modes[i % 3], **s)
            for i, s in enumerate([dict(s) for s in specs])]
    keys = ["optim.lr", "data.batch_size"] if len(runs) > 1 else ["optim.lr"]
    paths = write_report(runs, tmp_path / "report", sweep_keys=keys)
    md, rows = paths["markdown"].read_text(), read_csv(paths["csv"])
    finished = [s for s in specs if s.get("status", "finished") == "finished"]
    on_test = not all(s.get("val") for s in finished)
    if on_test:
        assert_ranked_on_test(md, rows, figures(paths))
    else:
        assert_ranked_on_validation(md, rows, figures(paths))

    printed = runner.invoke(app, ["report", *map(str, runs), "--out", str(tmp_path / "cli")])
    assert printed.exit_code == 0, printed.output
    assert (TEST in printed.output) == on_test and (VAL in printed.output.lower()) == (not on_test)


def test_validation_not_test_picks_the_best_run(tmp_path):
    # "a" has the better test top-1, "b" the better validation top-1: b ranks first everywhere.
    runs = [make_run(tmp_path, "a", peak=0.9, val=True, val_accs=[0.5, 0.55, 0.6], optim__lr=1e-3),
            make_run(tmp_path, "b", peak=0.6, val=True, val_accs=[0.7, 0.65, 0.62], optim__lr=1e-4)]
    paths = write_report(runs, tmp_path / "out", sweep_keys=["optim.lr"])
    rows = {r["name"]: r for r in read_csv(paths["csv"])}
    assert (rows["b"]["rank"], rows["a"]["rank"]) == ("1", "2")
    assert float(rows["b"]["test_top1_at_best_val_pct"]) == pytest.approx(30.0)  # epoch 1, chosen on val
    assert "Ranked on validation: best **b**" in paths["markdown"].read_text()


@pytest.mark.parametrize("value", [1.5, -1, "ten", True])
def test_a_bad_experiment_val_split_is_a_clear_error(value, tmp_path):
    result = runner.invoke(app, ["compare", str(write_experiment(tmp_path, {"a": {}}, val_split=value)), "-q"])
    assert result.exit_code == 1
    assert "val_split must be a number of images (int) or a fraction of the train set" in result.output
    assert "`val_split: 0`" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_a_variant_that_failed_before_its_run_folder_is_marked_and_replaced_on_the_rerun(tmp_path):
    """A variant that fails before the engine creates its folder (here: its weights are missing)
    gets a folder from the experiment, with finetune's marker, so that the rerun may replace it
    once the cause is fixed (an unmarked folder is never replaced)."""
    from finetune.models.build import create_model
    from finetune.models.saving import save_model
    from finetune.runs.folder import is_owned_run_folder

    weights = tmp_path / "weights"
    path = write_experiment(tmp_path, {"ok": {}, "later": {"train.mode": "full", "model.source": str(weights),
                                                            "model.arch": "vit_tiny_test"}})
    first = runner.invoke(app, ["compare", str(path), "-q"])
    assert first.exit_code == 1 and "1 of 2 variants failed: later" in first.output, first.output
    failed = tmp_path / "runs" / "exp" / "later"
    assert json.loads((failed / "summary.json").read_text())["status"] == "failed"
    assert is_owned_run_folder(failed)

    save_model(create_model("vit_tiny_test", num_classes=10, img_size=32), weights)  # the cause, fixed
    second = runner.invoke(app, ["compare", str(path), "-q"])
    assert second.exit_code == 0, second.output
    assert json.loads((failed / "summary.json").read_text())["status"] == "finished"
