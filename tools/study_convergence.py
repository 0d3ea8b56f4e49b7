"""Did a study's runs train long enough? The rise of validation top-1 over each run's last
evaluation interval, from the run folders.

    python tools/study_convergence.py runs/transfer_study --csv docs/results/transfer_study/convergence.csv

For every finished run of a study folder (the runs its ``experiment.yaml`` lists, in its order;
without one, the folders named ``<variant>_s<seed>_n<images>``) it takes the last two
evaluations that have a validation top-1 and the difference between them (in points): near zero
when the curve has flattened, large when the run stopped while still learning. Prints a Markdown
table with the mean over seeds for each training-set size (rows) and variant (columns), and with
``--csv`` writes every run's figures, so the table can be made again from the committed file
(``--from-csv FILE`` instead of a folder).
"""

from __future__ import annotations

import csv
import re
import statistics
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.recipe import parse_yaml  # noqa: E402
from finetune.runs.records import read_run  # noqa: E402
from finetune.snapshot import write_text_atomically  # noqa: E402

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
RUN_NAME = re.compile(r"(?P<variant>.+)_s(?P<seed>\d+)_n(?P<images>\d+)")
FIELDS = ("run", "variant", "seed", "images", "epochs", "last_epoch", "previous_epoch", "last_val_pct",
          "previous_val_pct", "rise_pts", "best_epoch")


def study_runs(study: Path) -> list[tuple[Path, str, Any, Any]]:
    """(folder, variant, seed, images) of each run of the study, in the study's order; seed and
    images are None where the study's grid has no such axis."""
    resolved = study / "experiment.yaml"
    if resolved.is_file():
        runs = (parse_yaml(resolved.read_text(), str(resolved)).get("study") or {}).get("runs") or {}
        return [(study / name, r["variant"], r["point"].get("seed"), r["point"].get("data.train_subset"))
                for name, r in runs.items()]
    named = [(f, RUN_NAME.fullmatch(f.name)) for f in sorted(study.iterdir()) if f.is_dir()]
    return [(f, m["variant"], int(m["seed"]), int(m["images"])) for f, m in named if m is not None]


def run_rise(folder: Path, variant: str, seed: Any, images: Any) -> dict | None:
    """One finished run's last-interval rise of validation top-1, or None (absent, unfinished, or
    fewer than two evaluations with validation)."""
    if not (folder / "summary.json").is_file():
        return None
    record = read_run(folder)
    rows = [r for r in record.epoch_rows if r.get("val_acc1") is not None]
    if record.status != "finished" or len(rows) < 2:
        return None
    last, previous = rows[-1], rows[-2]
    return {"run": folder.name, "variant": variant, "seed": seed, "images": images, "epochs": record.summary.get("epochs"),
            "last_epoch": last["epoch"], "previous_epoch": previous["epoch"],
            "last_val_pct": round(100 * last["val_acc1"], 2), "previous_val_pct": round(100 * previous["val_acc1"], 2),
            "rise_pts": round(100 * (last["val_acc1"] - previous["val_acc1"]), 4), "best_epoch": record.best_epoch}


def table(rows: list[dict]) -> str:
    """Mean rise over seeds, a row per variant and a column per size (in the order first seen)."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    sizes = list(dict.fromkeys(str(r["images"]) for r in rows))  # as the study orders them
    out = ["| images | " + " | ".join(variants) + " |", "| ---: |" + " ---: |" * len(variants)]
    for size in sizes:
        cells = []
        for v in variants:
            rises = [float(r["rise_pts"]) for r in rows if r["variant"] == v and str(r["images"]) == size]
            cells.append(f"{statistics.mean(rises):+.1f}" if rises else "-")
        label = f"{int(size):,}" if size.isdigit() else size
        out.append(f"| {label} | " + " | ".join(cells).replace("+0.0", "0.0").replace("-0.0", "0.0") + " |")
    return "\n".join(out) + "\n"


@app.command()
def main(
    study: Annotated[Path | None, typer.Argument(help="The study folder (its run folders inside).")] = None,
    csv_out: Annotated[Path | None, typer.Option("--csv", help="Write every run's figures to this CSV.")] = None,
    from_csv: Annotated[Path | None, typer.Option(help="Make the table from a CSV this tool wrote.")] = None,
) -> None:
    """The last-interval rise of validation top-1, mean over seeds, per variant and size."""
    if (study is None) == (from_csv is None):
        typer.echo("error: give a study folder or --from-csv FILE (one of them).", err=True)
        raise typer.Exit(2)
    if from_csv is not None:
        try:
            with from_csv.open(newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        except OSError as err:
            typer.echo(f"error: cannot read {from_csv}: {err.strerror}.", err=True)
            raise typer.Exit(2) from None
        if not rows or any(k not in rows[0] for k in ("variant", "images", "rise_pts")):
            typer.echo(f"error: {from_csv} is not a CSV this tool wrote (no variant, images and rise_pts columns).",
                       err=True)
            raise typer.Exit(2)
    else:
        if not study.is_dir():
            typer.echo(f"error: {study} is not a folder; give a study folder (runs/NAME).", err=True)
            raise typer.Exit(2)
        rows = [r for r in (run_rise(*run) for run in study_runs(study)) if r is not None]
        if not rows:
            typer.echo(f"error: {study} holds no finished study run with two validation evaluations.", err=True)
            raise typer.Exit(2)
    typer.echo(table(rows), nl=False)
    if csv_out is not None:
        lines = [",".join(FIELDS)] + [",".join(str(r[k]) for k in FIELDS) for r in rows]
        write_text_atomically(csv_out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    app()
