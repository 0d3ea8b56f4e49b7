"""Reports over fake run directories, written in the training engine's on-disk format."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from finetune.errors import FinetuneError
from finetune.runs.records import read_run, varied_keys
from finetune.experiments.report import format_table, write_report
from finetune.viz.plots import plot_confusion, plot_curves

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def recipe(**overrides) -> dict:
    """A resolved recipe; ``overrides`` use dotted keys (``optim__lr`` for ``optim.lr``)."""
    raw = {
        "description": "fake",
        "name": None,
        "seed": 0,
        "model": {"arch": "vit_lab", "img_size": 32, "num_classes": 10},
        "train": {"mode": "scratch", "epochs": 3, "precision": "fp32"},
        "optim": {"name": "adam", "lr": 1e-3, "weight_decay": 0.0, "betas": [0.9, 0.999]},
        "data": {"name": "cifar10", "batch_size": 32, "mean": [0.5, 0.5, 0.5]},
        "output": {"dir": "runs", "overwrite": False},
    }
    for dotted, value in overrides.items():
        *path, leaf = dotted.split("__")
        section = raw
        for part in path:
            section = section[part]
        section[leaf] = value
    return raw


def make_run(
    root: Path,
    name: str,
    *,
    epochs: int = 3,
    steps_per_epoch: int = 20,
    peak: float = 0.6,
    status: str = "finished",
    error: str | None = None,
    summary: bool = True,
    val: bool = False,
    val_accs: list[float] | None = None,
    **recipe_overrides,
) -> Path:
    """Write a run directory: recipe.yaml, metrics.jsonl and (unless ``summary=False``) summary.json.

    Test accuracy rises towards ``peak``; each epoch takes 10 s of training. With ``val``, the
    validation accuracy is ``val_accs`` (default: 0.01 below the test accuracy), and the summary
    selects the best epoch on it, as the engine does.
    """
    run = root / name
    run.mkdir(parents=True)
    rec = recipe(**recipe_overrides)
    rec["name"] = name
    rec["train"]["epochs"] = epochs
    (run / "recipe.yaml").write_text(yaml.safe_dump(rec, sort_keys=False))
    lines, accs = [], []
    for epoch in range(1, epochs + 1):
        for i in range(1, steps_per_epoch + 1):
            step = (epoch - 1) * steps_per_epoch + i
            lines.append({"kind": "step", "epoch": epoch, "step": step, "time_s": step * 0.5,
                          "loss": 2.3 * math.exp(-step / 40) + 0.05 * (i % 3), "lr": 1e-3,
                          "images_per_s": 640.0})
        acc = peak * (1 - 0.5 ** epoch)
        accs.append(acc)
        val_acc = (val_accs[epoch - 1] if val_accs else acc - 0.01) if val else None
        lines.append({"kind": "epoch", "epoch": epoch, "step": epoch * steps_per_epoch,
                      "time_s": 10.0 * epoch, "train_loss": 2.0 / epoch, "train_acc1": acc + 0.05,
                      "test_acc1": acc, "test_acc5": min(1.0, acc + 0.3), "test_loss": 2.1 / epoch,
                      "val_acc1": val_acc, "lr": 1e-3})
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if summary:
        selected = {"selection": "final"}
        if val:
            vals = [line["val_acc1"] for line in lines if line["kind"] == "epoch"]
            best = max(range(epochs), key=vals.__getitem__)
            selected = {"selection": "val", "best_epoch": best + 1, "best_val_acc1": vals[best],
                        "best_test_acc1": accs[best], "final_val_acc1": vals[-1]}
        peak_epoch = max(range(epochs), key=accs.__getitem__)
        (run / "summary.json").write_text(json.dumps({
            "name": name, "status": status, "error": error, "recipe_path": f"recipes/{name}.yaml",
            "epochs": epochs, **selected, "peak_test_acc1": accs[peak_epoch], "peak_test_epoch": peak_epoch + 1,
            "final_acc1": accs[-1], "final_acc5": min(1.0, accs[-1] + 0.3), "final_loss": 0.7,
            "train_images": 50000, "params_trainable": 1930, "params_total": 5526346,
            "wall_time_s": 12.0 * epochs + 3.0, "train_time_s": 10.0 * epochs, "images_per_s": 4321.5,
            "peak_memory_mb": 1234.5, "device": "cpu", "device_name": "CPU",
            "versions": {"torch": "2.5"}, "classes": CLASSES,
            "confusion_matrix": [[90 if i == j else 1 for j in range(10)] for i in range(10)],
            "per_class_acc": [0.9] * 10, "mode": "scratch", "arch": "vit_lab", "source": None,
        }))
    return run


def assert_png(path: Path, min_bytes: int = 10_000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > min_bytes, f"{path} is only {len(data)} bytes"


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def table_rows(markdown: str) -> list[list[str]]:
    """The cells of the first Markdown table, header first, separator dropped."""
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and "---" not in line]
    return [[c.strip() for c in row.strip("|").split(" | ")] for row in rows]


# ---------------------------------------------------------------------------------------------


def test_import_does_not_load_matplotlib():
    # A fresh interpreter: importing the module must stay light for `finetune --help`.
    import subprocess

    code = "import finetune.experiments.report, finetune.viz.plots, sys; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("val", [False, True])
def test_plot_curves_from_path_and_rows(tmp_path, val):
    run = make_run(tmp_path, "r", val=val)
    assert_png(plot_curves(run / "metrics.jsonl", tmp_path / "a.png", title="r"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert_png(plot_curves(rows, tmp_path / "sub" / "b.png"))


def test_plot_curves_survives_truncated_file_and_running_epoch(tmp_path):
    run = make_run(tmp_path, "r", epochs=2)
    with (run / "metrics.jsonl").open("a") as f:
        # epoch 3 still running: step lines without an epoch line, then a half-written line
        f.write(json.dumps({"kind": "step", "epoch": 3, "step": 45, "time_s": 22.0, "loss": 0.5,
                            "lr": 1e-3, "images_per_s": 600.0}) + "\n")
        f.write('{"kind": "step", "epo')
    assert_png(plot_curves(run / "metrics.jsonl", tmp_path / "c.png"))


def test_plot_curves_with_only_epoch_lines(tmp_path):
    rows = [{"kind": "epoch", "epoch": 1, "step": 10, "time_s": 1.0, "train_loss": 1.0,
             "train_acc1": None, "test_acc1": 0.5, "test_acc5": 0.9, "test_loss": 1.2, "val_acc1": None,
             "lr": 0.1}]
    assert_png(plot_curves(rows, tmp_path / "one.png"), min_bytes=5_000)


@pytest.mark.parametrize("n, normalize", [(10, True), (10, False), (100, True)])
def test_plot_confusion(tmp_path, n, normalize):
    matrix = [[50 if i == j else (i + j) % 3 for j in range(n)] for i in range(n)]
    matrix[1] = [0] * n  # a class with no test images must not divide by zero
    classes = CLASSES if n == 10 else [f"class_{i}" for i in range(n)]
    assert_png(plot_confusion(matrix, classes, tmp_path / f"cm{n}.png", normalize=normalize, title="r"))


def test_plot_confusion_rejects_mismatched_classes(tmp_path):
    with pytest.raises(ValueError, match="3 class names"):
        plot_confusion([[1, 0], [0, 1]], ["a", "b", "c"], tmp_path / "x.png")


def test_read_run_finished(tmp_path):
    r = read_run(make_run(tmp_path, "good", epochs=4, peak=0.8))
    assert (r.name, r.status, r.error) == ("good", "finished", None)
    assert r.selection == "final" and r.final_acc1 == pytest.approx(0.8 * (1 - 0.5**4))
    assert r.best_val_acc1 is None and r.best_epoch is None  # no validation split: nothing selected
    assert r.score("final") == r.final_acc1 and r.epochs == 4 and r.epochs_done == 4
    assert len(r.epoch_rows) == 4 and all(row["kind"] == "epoch" for row in r.epoch_rows)
    assert r.recipe["optim.lr"] == 1e-3 and r.recipe["data.mean"] == [0.5, 0.5, 0.5]
    assert r.params_total == 5526346 and r.peak_memory_mb == 1234.5
    assert r.ok


def test_read_run_without_summary_is_missing_with_accuracy_from_metrics(tmp_path):
    r = read_run(make_run(tmp_path, "crashed", epochs=2, summary=False))
    assert r.status == "missing" and "summary.json" in r.error
    assert r.name == "crashed"  # from the recipe
    assert r.final_acc1 == pytest.approx(0.6 * 0.75) and r.epochs_done == 2
    assert not r.ok


def test_read_run_selects_on_validation_from_the_summary_or_the_metrics(tmp_path):
    # Validation peaks at epoch 2, the test set at epoch 4: the run's figure is epoch 2's.
    run = make_run(tmp_path, "v", epochs=4, val=True, val_accs=[0.3, 0.6, 0.5, 0.55])
    for r in (read_run(run), read_run(make_run(tmp_path, "v2", epochs=4, val=True,
                                                val_accs=[0.3, 0.6, 0.5, 0.55], summary=False))):
        assert r.selection == "val" and r.best_epoch == 2 and r.best_val_acc1 == 0.6
        assert r.best_test_acc1 == pytest.approx(0.6 * 0.75)  # test at epoch 2, not the test peak
        assert r.peak_test_acc1 == pytest.approx(0.6 * (1 - 0.5**4)) == r.final_acc1
        assert r.score("val") == 0.6


def test_read_run_unreadable_summary_and_absent_folder(tmp_path):
    run = make_run(tmp_path, "broken")
    (run / "summary.json").write_text("{not json")
    r = read_run(run)
    assert r.status == "failed" and r.error.startswith("unreadable summary.json")
    gone = read_run(tmp_path / "nowhere")
    assert gone.status == "missing" and "no such run folder" in gone.error and gone.recipe == {}


def test_varied_keys_finds_exactly_the_differing_keys(tmp_path):
    runs = [
        make_run(tmp_path, "a", optim__lr=1e-3, data__batch_size=32),
        make_run(tmp_path, "b", optim__lr=1e-4, data__batch_size=32, output__overwrite=True),
        make_run(tmp_path, "c", optim__lr=1e-3, data__batch_size=32, data__mean=[0.4, 0.5, 0.5],
                 description="other"),
        make_run(tmp_path, "d", summary=False),  # name differs too, and is ignored
    ]
    records = [read_run(r) for r in runs] + [read_run(tmp_path / "absent")]
    # data.mean is a list: compared by value; the absent run has no recipe and changes nothing
    assert varied_keys(records) == ["optim.lr", "data.mean"]


def test_varied_keys_key_present_in_only_some_recipes(tmp_path):
    a, b = make_run(tmp_path, "a"), make_run(tmp_path, "b")
    rec = yaml.safe_load((b / "recipe.yaml").read_text())
    rec["train"]["ema"] = True
    (b / "recipe.yaml").write_text(yaml.safe_dump(rec))
    assert varied_keys([read_run(a), read_run(b)]) == ["train.ema"]


def test_a_key_newer_than_a_run_differs_only_when_set_to_something_else_than_its_default(tmp_path):
    # A run recorded before train.time_budget existed ran without one: null is no difference.
    old, off, on = make_run(tmp_path, "old"), make_run(tmp_path, "off"), make_run(tmp_path, "on")
    for run, value in ((off, None), (on, 30.0)):
        rec = yaml.safe_load((run / "recipe.yaml").read_text())
        rec["train"]["time_budget"] = value
        (run / "recipe.yaml").write_text(yaml.safe_dump(rec))
    assert "time_budget" not in (old / "recipe.yaml").read_text()
    assert varied_keys([read_run(old), read_run(off)]) == []
    assert varied_keys([read_run(old), read_run(off), read_run(on)]) == ["train.time_budget"]


def test_format_table_values(tmp_path):
    records = [
        read_run(make_run(tmp_path, "lr1e-3", peak=0.9, optim__lr=1e-3)),
        read_run(make_run(tmp_path, "lr1e-5", peak=0.5, optim__lr=1e-5, status="failed",
                          error="RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB | x " * 3)),
    ]
    rows = table_rows(format_table(records, ["optim.lr"]))
    header, good, bad = rows
    assert header[:3] == ["Run", "Status", "optim.lr"]
    cell = dict(zip(header, good))
    assert cell["optim.lr"] == "0.001" and dict(zip(header, bad))["optim.lr"] == "1e-05"
    # 0.9 * (1 - 1/8), 2 decimals, best in bold; no validation split, and the heading says what ranks
    assert cell["Final test top-1 (%, ranked on test)"] == "**78.75**"
    assert cell["Val top-1 (%)"] == cell["Test top-1 at best val (%)"] == "-"  # no validation split
    assert cell["Epochs"] == "3" and cell["Time"] == "39.0s" and cell["Images/s"] == "4,322"
    assert cell["Trainable params"] == "1.93k" and cell["Total params"] == "5.53M"
    assert cell["Peak mem (MB)"] == "1,234"
    status = dict(zip(header, bad))["Status"]
    assert status.startswith("failed: RuntimeError: CUDA out of memory")
    assert status.endswith("...") and len(status) <= len("failed: ") + 60
    assert len(bad) == len(header)  # the "|" in the error is escaped, not a new column


def test_write_report_tables_and_plots(tmp_path):
    runs = [
        make_run(tmp_path / "runs", "lr1e-3", peak=0.7, optim__lr=1e-3),
        make_run(tmp_path / "runs", "lr1e-4", peak=0.8, optim__lr=1e-4, epochs=5),
        make_run(tmp_path / "runs", "lr1e-2", peak=0.1, optim__lr=1e-2, status="failed",
                 error="Traceback (most recent call last):\n  File x\nFloatingPointError: loss is nan"),
        make_run(tmp_path / "runs", "killed", summary=False, optim__lr=3e-3),
    ]
    paths = write_report(runs, tmp_path / "report", title="LR sweep")
    assert set(paths) == {"markdown", "csv", "acc_vs_epoch", "acc_vs_time"}
    for kind in ("acc_vs_epoch", "acc_vs_time"):
        assert_png(paths[kind])

    rows = read_csv(paths["csv"])
    assert [r["name"] for r in rows] == ["lr1e-3", "lr1e-4", "lr1e-2", "killed"]
    # varied: train.epochs (3 vs 5) and optim.lr, in recipe order
    assert list(rows[0])[:4] == ["name", "status", "train.epochs", "optim.lr"]
    assert [r["optim.lr"] for r in rows] == ["0.001", "0.0001", "0.01", "0.003"]
    assert [r["status"] for r in rows] == ["finished", "finished", "failed", "missing"]
    assert float(rows[1]["final_top1_pct"]) == pytest.approx(100 * 0.8 * (1 - 0.5**5), abs=1e-4)
    assert rows[1]["selection"] == "final" and rows[1]["best_epoch"] == "" and rows[0]["params_total"] == "5526346"
    assert float(rows[1]["peak_test_top1_pct_selected_on_test"]) == pytest.approx(100 * 0.8 * (1 - 0.5**5), abs=1e-4)
    assert "loss is nan" in rows[2]["error"] and rows[3]["peak_memory_mb"] == ""

    md = paths["markdown"].read_text()
    assert md.startswith("# LR sweep\n")
    table = table_rows(md)
    assert len(table) == 1 + 4 and all(len(row) == len(table[0]) for row in table)
    by_name = {row[0]: dict(zip(table[0], row)) for row in table[1:]}
    # a traceback is shortened to its last line
    assert by_name["lr1e-2"]["Status"] == "failed: FloatingPointError: loss is nan"
    assert by_name["killed"]["Status"].startswith("missing: no summary.json")
    assert by_name["lr1e-4"]["Final test top-1 (%, ranked on test)"] == "**77.50**"
    assert "ranked by test top-1 after the last epoch" in md and "one seed" in md
    assert "## Results, ranked on test" in md and "Ranked on test (no run has a validation split)" in md
    assert [r["ranked_on"] for r in rows] == ["test"] * 4 and [r["rank"] for r in rows] == ["2", "1", "", ""]
    assert "acc_vs_epoch.png" in md and "acc_vs_time.png" in md and "sweep.png" not in md
    assert "## Errors" in md and "Settings shared by all runs" in md


def test_runs_with_validation_are_ranked_by_it_not_by_test(tmp_path):
    # "a" has the better test accuracy, "b" the better validation accuracy: b ranks first, and the
    # test accuracy reported for it is the one at its best validation epoch.
    runs = [
        make_run(tmp_path, "a", peak=0.9, val=True, val_accs=[0.5, 0.55, 0.6], optim__lr=1e-3),
        make_run(tmp_path, "b", peak=0.6, val=True, val_accs=[0.7, 0.65, 0.62], optim__lr=1e-4),
    ]
    paths = write_report(runs, tmp_path / "out", sweep_keys=["optim.lr"])
    md = paths["markdown"].read_text()
    table = table_rows(md)
    by_name = {row[0]: dict(zip(table[0], row)) for row in table[1:]}
    assert by_name["b"]["Val top-1 (%)"] == "**70.00**" and by_name["a"]["Val top-1 (%)"] == "60.00"
    assert by_name["b"]["Test top-1 at best val (%)"] == "30.00"  # epoch 1: 0.6 * 0.5
    assert "Ranked on validation: best **b**, 70.00% val top-1 at epoch 1; test top-1 at that epoch 30.00%" in md
    assert "ranked by their best validation top-1" in md and "ranked on test" not in md
    assert_png(paths["sweep"])
    # One run without a validation split: nothing is ranked on validation any more.
    runs.append(make_run(tmp_path, "c", peak=0.5, optim__lr=1e-2))
    md = write_report(runs, tmp_path / "mixed")["markdown"].read_text()
    assert "Ranked on test (no validation split in c): best **a**" in md
    assert "ranked by test top-1 after the last epoch" in md


def test_a_killed_run_reads_as_interrupted(tmp_path):
    run = make_run(tmp_path, "killed", status="running")
    (run / ".lock").write_text("4242\n")  # its process is gone: nobody holds the lock
    r = read_run(run)
    assert r.status == "interrupted" and "finetune resume" in r.error


def test_write_report_all_failed_writes_tables_only(tmp_path):
    runs = [make_run(tmp_path, "x", status="failed", error="boom"), make_run(tmp_path, "y", summary=False)]
    paths = write_report(runs, tmp_path / "out", sweep_keys=["optim.lr"])
    assert set(paths) == {"markdown", "csv"}
    assert len(read_csv(paths["csv"])) == 2


def test_sweep_one_key(tmp_path):
    runs = [make_run(tmp_path, f"lr{lr:g}-s{seed}", peak=0.5 + 0.1 * i, optim__lr=lr, seed=seed)
            for i, lr in enumerate([1e-4, 3e-4, 1e-3, 3e-3]) for seed in (0, 1)]
    runs.append(make_run(tmp_path, "bad", optim__lr=1e-2, status="failed", error="nan"))
    paths = write_report(runs, tmp_path / "out", sweep_keys=["optim.lr"])
    assert_png(paths["sweep"])
    rows = read_csv(paths["csv"])
    # the sweep key leads, then the other varied key
    assert list(rows[0])[2:4] == ["optim.lr", "seed"]
    assert "sweep.png" in paths["markdown"].read_text()


def test_sweep_two_keys_and_more(tmp_path):
    runs = [make_run(tmp_path, f"lr{lr:g}-bs{bs}-e{ep}", peak=0.5 + lr * 50 + bs / 1000,
                     optim__lr=lr, data__batch_size=bs, epochs=ep)
            for lr in (1e-4, 1e-3) for bs in (32, 128, 512) for ep in (1, 2)]
    runs = runs[:-1]  # one combination missing: a blank heatmap cell
    two = write_report(runs, tmp_path / "two", sweep_keys=["optim.lr", "data.batch_size"])
    assert_png(two["sweep"])
    three = write_report(runs, tmp_path / "three",
                         sweep_keys=["optim.lr", "data.batch_size", "train.epochs"])
    assert_png(three["sweep"])


def test_sweep_key_not_in_recipes_is_a_message(tmp_path):
    runs = [make_run(tmp_path, "a"), make_run(tmp_path, "b", optim__lr=1e-2)]
    with pytest.raises(FinetuneError, match=r"optim\.learning_rate.*optim\.lr"):
        write_report(runs, tmp_path / "out", sweep_keys=["optim.learning_rate"])
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_write_report_needs_runs(tmp_path):
    with pytest.raises(FinetuneError, match="No run directories"):
        write_report([], tmp_path / "out")


def test_modes_get_a_tradeoff_plot_and_their_training_state(tmp_path):
    runs = []
    for name, mode, trainable, optimizer_mb, peak in (("head", "head", 1930, 0.015, 0.5), ("lora", "lora", 40000, 0.3, 0.7),
                                                       ("full", "full", 5_526_346, 42.2, 0.8)):
        for seed in (0, 1):
            run = make_run(tmp_path / f"s{seed}", name, peak=peak + 0.02 * seed, train__mode=mode, seed=seed)
            summary = json.loads((run / "summary.json").read_text())
            summary.update(params_trainable=trainable, optimizer_state_mb=optimizer_mb)
            (run / "summary.json").write_text(json.dumps(summary))
            runs.append(run)
    paths = write_report(runs, tmp_path / "out")
    assert_png(paths["tradeoff"])
    assert "tradeoff.png" in paths["markdown"].read_text()
    rows = {(r["name"], r["seed"]): r for r in read_csv(paths["csv"])}
    assert float(rows[("full", "0")]["training_state_mb"]) == pytest.approx(42.2 + 4 * 5_526_346 / 2**20)
    # One mode only: no trade-off to show.
    assert "tradeoff" not in write_report(runs[:2], tmp_path / "one")


def test_the_terminal_table_is_compact_and_wide_prints_every_column(tmp_path):
    from typer.testing import CliRunner

    from finetune.cli import app

    runs = [make_run(tmp_path / "runs", name, peak=peak, optim__lr=lr, data__root=f"/data/{name}",
                     data__batch_size=bs, optim__weight_decay=wd, train__label_smoothing=ls, seed=seed)
            for name, peak, lr, bs, wd, ls, seed in (("a", 0.7, 1e-3, 32, 0.05, 0.0, 0), ("b", 0.8, 3e-4, 64, 0.1, 0.1, 1))]
    compact = CliRunner().invoke(app, ["report", *map(str, runs), "--out", str(tmp_path / "r")])
    assert compact.exit_code == 0, compact.output
    header = next(line for line in compact.output.splitlines() if line.startswith("| Run"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    # Where the data lives differs, but is no setting anyone compares: left to the CSV.
    assert "data.root" not in columns and "Images/s" not in columns and "Peak mem (MB)" not in columns
    assert columns[0] == "Run" and len(columns) == 1 + 4 + 1 + 2  # 4 settings, the test top-1, time, trainable
    assert "more setting(s) differ" in compact.output and "data.root" in compact.output and "--wide" in compact.output
    wide = CliRunner().invoke(app, ["report", *map(str, runs), "--out", str(tmp_path / "w"), "--wide"])
    wide_header = next(line for line in wide.output.splitlines() if line.startswith("| Run"))
    assert "data.root" in wide_header and "Images/s" in wide_header
    # report.md keeps every column either way.
    assert "Images/s" in (tmp_path / "r" / "report.md").read_text()


def test_curves_draw_the_training_loss_without_step_lines_and_whole_epoch_ticks(tmp_path, monkeypatch):
    import finetune.viz.plots as plots

    drawn = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, out: drawn.append(fig) or Path(out))
    # Fewer steps per epoch than train.log_every: no step line at all, the loss only in epoch lines.
    rows = [{"kind": "epoch", "epoch": e, "step": 3 * e, "time_s": float(e), "train_loss": 2.0 / e, "train_acc1": 0.3,
             "test_acc1": 0.4, "test_acc5": 0.9, "test_loss": 1.5, "val_acc1": None, "lr": 0.1} for e in (1, 2, 3, 4)]
    plots.plot_curves(rows, tmp_path / "c.png")
    loss_ax = drawn[0].axes[0]
    assert "train (epoch mean)" in loss_ax.get_legend_handles_labels()[1]
    ticks = [t for t in loss_ax.get_xticks() if 0 <= t <= 4]
    assert ticks and all(float(t).is_integer() for t in ticks)
