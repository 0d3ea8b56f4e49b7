"""Accuracy against training time, read from finished (or running) run folders.

    python benchmarks/time_to_accuracy.py runs/lab_full runs/vit_lab_fast --target 0.67 \
        --out benchmarks/results/cpu-lab-full-length

For each run folder it reads ``metrics.jsonl`` (one line per evaluated epoch: training seconds so
far, not counting evaluation, and the test and validation top-1) and ``summary.json`` (device,
threads, precision, wall time), and writes a JSON file, a Markdown table and a figure: the
accuracy after each epoch against training minutes, the first epoch at or above ``--target`` and
its training time, and the accuracy reached by given minutes (the last epoch that ended by then).

Times are the runs' own clocks on whatever machine ran them: compare runs only when they ran on
the same machine under the same load, and say so.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.runs.records import read_run  # noqa: E402
from finetune.snapshot import write_text_atomically  # noqa: E402

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def first_at(rows: list[dict[str, Any]], key: str, target: float) -> dict[str, Any] | None:
    """The first epoch whose ``key`` accuracy is at least ``target``, or None."""
    return next((r for r in rows if r.get(key) is not None and r[key] >= target), None)


def at_minutes(rows: list[dict[str, Any]], key: str, minutes: float) -> float | None:
    """``key`` accuracy of the last epoch that ended within ``minutes`` of training, or None."""
    done = [r for r in rows if r["time_s"] <= minutes * 60 and r.get(key) is not None]
    return done[-1][key] if done else None


def describe(folder: Path, target: float, minutes: list[float]) -> dict[str, Any]:
    record = read_run(folder)
    rows, summary = record.epoch_rows, record.summary
    out: dict[str, Any] = {
        "run": str(folder), "status": summary.get("status"), "recipe": summary.get("recipe_path"),
        "device_name": summary.get("device_name"), "cpu_threads": summary.get("cpu_threads"),
        "precision": summary.get("precision"), "optimizer_kernel": summary.get("optimizer_kernel"),
        "train_images": summary.get("train_images"), "val_images": summary.get("val_images"),
        "epochs_done": len(rows), "epochs": summary.get("epochs"),
        "train_time_s": rows[-1]["time_s"] if rows else None, "wall_time_s": summary.get("wall_time_s"),
        "final_test_acc1": summary.get("final_acc1") if summary.get("status") == "finished" else None,
        "curve": [{"epoch": r["epoch"], "train_time_s": r["time_s"], "test_acc1": r.get("test_acc1"),
                   "val_acc1": r.get("val_acc1"), "train_loss": r.get("train_loss")} for r in rows],
    }
    for key in ("test_acc1", "val_acc1"):
        hit = first_at(rows, key, target)
        out[f"first_{key}_at_target"] = None if hit is None else {"epoch": hit["epoch"], "train_time_s": hit["time_s"]}
        out[f"{key}_by_minutes"] = {f"{m:g}": at_minutes(rows, key, m) for m in minutes}
    return out


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def markdown(runs: list[dict[str, Any]], target: float, minutes: list[float], command: str,
             notes: list[str] | None = None) -> str:
    lines = ["# Accuracy against training time", "",
             f"Command: `{command}`  ", "Times are training seconds (evaluation not counted), each run's own clock.",
             "", f"| run | epochs | train images | threads | precision | optimizer | training time | wall time "
             f"| first epoch at {pct(target)} test (time) | final test top-1 |",
             "|---|---:|---:|---:|---|---|---:|---:|---|---:|"]
    for r in runs:
        hit = r["first_test_acc1_at_target"]
        at = "not reached" if hit is None else f"epoch {hit['epoch']} ({hit['train_time_s'] / 60:.1f} min)"
        lines.append(f"| {r['run']} | {r['epochs_done']}/{r['epochs']} | {r['train_images']:,} | {r['cpu_threads']} "
                     f"| {r['precision']} | {r['optimizer_kernel'] or 'not recorded'} | {(r['train_time_s'] or 0) / 60:.1f} min "
                     f"| {(r['wall_time_s'] or 0) / 60:.1f} min | {at} | {pct(r['final_test_acc1'])} |")
    for key, label in (("test_acc1", "test"), ("val_acc1", "validation")):
        if not any(any(v is not None for v in r[f"{key}_by_minutes"].values()) for r in runs):
            continue
        lines += ["", f"{label.capitalize()} top-1 of the last epoch ended by a given training time:", "",
                  "| run | " + " | ".join(f"{m:g} min" for m in minutes) + " |",
                  "|---|" + "---:|" * len(minutes)]
        for r in runs:
            lines.append(f"| {r['run']} | " + " | ".join(pct(r[f"{key}_by_minutes"][f"{m:g}"]) for m in minutes) + " |")
    lines += ["", "Per epoch (training minutes: test top-1):", ""]
    for r in runs:
        points = ", ".join(f"{c['epoch']}: {c['train_time_s'] / 60:.1f} min {pct(c['test_acc1'])}" for c in r["curve"])
        lines.append(f"- {r['run']}: {points}")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def figure(runs: list[dict[str, Any]], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in runs:
        xs = [c["train_time_s"] / 60 for c in r["curve"]]
        ax.plot(xs, [100 * c["test_acc1"] for c in r["curve"]], marker="o", ms=3, label=f"{Path(r['run']).name} (test)")
        if any(c["val_acc1"] is not None for c in r["curve"]):
            ax.plot(xs, [100 * c["val_acc1"] if c["val_acc1"] is not None else float("nan") for c in r["curve"]],
                    ls="--", label=f"{Path(r['run']).name} (validation)")
    ax.axhline(100 * target, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("training minutes (CPU, 2 cores; evaluation not counted)")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@app.command()
def main(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (each with metrics.jsonl and summary.json).")],
    target: Annotated[float, typer.Option(help="Accuracy to time, as a fraction.")] = 0.67,
    minutes: Annotated[str, typer.Option(help="Training minutes to report the accuracy at.")] = "5,10,20,30",
    out: Annotated[Path | None, typer.Option(help="Write OUT.json, OUT.md and OUT.png.")] = None,
    note: Annotated[list[str] | None, typer.Option(help="A line for the Notes (how the runs were made).")] = None,
) -> None:
    """Time to an accuracy and accuracy by given times, from run folders."""
    marks = [float(m) for m in minutes.split(",") if m.strip()]
    described = []
    for folder in runs:
        if not (folder / "metrics.jsonl").is_file() or not (folder / "summary.json").is_file():
            typer.echo(f"error: {folder} is not a run folder (no metrics.jsonl or summary.json).", err=True)
            raise typer.Exit(2)
        described.append(describe(folder, target, marks))
    command = "python benchmarks/time_to_accuracy.py " + shlex.join(sys.argv[1:])
    text = markdown(described, target, marks, command, note)
    typer.echo(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(out.with_suffix(".json"), json.dumps(
            {"target": target, "minutes": marks, "command": command, "notes": note or [], "runs": described},
            indent=2) + "\n")
        write_text_atomically(out.with_suffix(".md"), text)
        figure(described, target, out.with_suffix(".png"))


if __name__ == "__main__":
    app()
