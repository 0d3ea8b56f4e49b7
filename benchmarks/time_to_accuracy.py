"""Accuracy against training time, read from finished (or running) run folders.

    python benchmarks/time_to_accuracy.py runs/lab_full runs/vit_lab_fast --target 0.67 \
        --out benchmarks/results/cpu-lab-full-length

For each run folder it reads ``metrics.jsonl`` (one line per evaluated epoch: training seconds so
far, not counting evaluation, and the test and validation top-1) and ``summary.json`` (device,
threads, precision, wall time), and writes a JSON file, a Markdown table and a figure: the
accuracy after each epoch against training minutes, the first epoch at or above ``--target`` and
its training time, and the accuracy reached by given minutes (the last epoch that ended by then).
The headline figure of each run is honest: the test top-1 at the epoch its validation top-1 chose
(when the run held a validation split out), beside the per-epoch curve. A run trained to a time
budget (``train.time_budget``) also shows its plan (the probe's step time, the planned steps),
the training time it used and whether that was within the budget, and the accuracy it had at a
quarter, a half, three quarters and all of the budget.

With ``--flops`` the FLOPs per training image of the model the run saved are counted
(``benchmarks/bench.py``'s counter, as if every weight trained: a figure for runs that train the
whole model) and the achieved GFLOP/s printed beside the run's throughput; with
``--peak-gflops`` (the machine's fp32 matmul peak, e.g. from ``benchmarks/cpu_lab.py``) or
``--measure-peak`` (a 4096 x 4096 matmul timed now) also the share of that peak.

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


def selected(record: Any) -> dict[str, Any] | None:
    """The epoch the run's validation top-1 chose, with its test top-1 and training time; None
    when the run held no validation split out (then no epoch was chosen, and none is reported)."""
    if record.selection != "val" or record.best_epoch is None:
        return None
    row = next((r for r in record.epoch_rows if r["epoch"] == record.best_epoch), None)
    return {"epoch": record.best_epoch, "val_acc1": record.best_val_acc1, "test_acc1": record.best_test_acc1,
            "train_time_s": None if row is None else row["time_s"]}


def count_flops(folder: Path) -> float | None:
    """FLOPs per training image of the model the run saved (its config.json: architecture,
    arguments, image and patch size), or None when the run saved no model or it cannot be read."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench import flops_per_image

    from finetune import load_model
    from finetune.errors import FinetuneError

    try:
        model = load_model(folder)
    except FinetuneError:
        return None
    size = model.patch_embed.img_size if hasattr(model, "patch_embed") else None
    if size is None:
        return None
    return flops_per_image(model, int(size if isinstance(size, int) else size[0]))


def describe(folder: Path, target: float, minutes: list[float], flops: bool = False,
             peak_gflops: float | None = None) -> dict[str, Any]:
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
        "selected": selected(record), "images_per_s": summary.get("images_per_s"),
        "time_budget": summary.get("time_budget"),
        "curve": [{"epoch": r["epoch"], "train_time_s": r["time_s"], "test_acc1": r.get("test_acc1"),
                   "val_acc1": r.get("val_acc1"), "train_loss": r.get("train_loss")} for r in rows],
    }
    for key in ("test_acc1", "val_acc1"):
        hit = first_at(rows, key, target)
        out[f"first_{key}_at_target"] = None if hit is None else {"epoch": hit["epoch"], "train_time_s": hit["time_s"]}
        out[f"{key}_by_minutes"] = {f"{m:g}": at_minutes(rows, key, m) for m in minutes}
    per_image = count_flops(folder) if flops else None
    achieved = per_image * out["images_per_s"] / 1e9 if per_image and out["images_per_s"] else None
    out["flops_per_image"] = per_image
    out["achieved_gflops"] = achieved
    out["share_of_peak"] = achieved / peak_gflops if achieved and peak_gflops else None
    return out


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def chosen(r: dict[str, Any]) -> str:
    """``80.12% (epoch 15, 28.5 min)``: the val-selected test top-1, or ``-`` without a validation split."""
    sel = r["selected"]
    if sel is None:
        return "- (no evaluation yet)" if r.get("val_images") else "- (no validation split)"
    when = "" if sel["train_time_s"] is None else f", {sel['train_time_s'] / 60:.1f} min"
    return f"{pct(sel['test_acc1'])} (epoch {sel['epoch']}{when}; val {pct(sel['val_acc1'])})"


def budget_lines(runs: list[dict[str, Any]]) -> list[str]:
    """The plan and the use of each budgeted run, and its accuracy by fractions of the budget."""
    budgeted = [r for r in runs if r.get("time_budget")]
    if not budgeted:
        return []
    shares = [f["fraction"] for f in budgeted[0]["time_budget"]["at_fractions"]]
    lines = ["", "Time budgets (`train.time_budget`: the plan from the start-up probe, the training time used, and "
             "the latest evaluation by each share of the budget, validation / test top-1):", "",
             "| run | budget | probe: step (p90) | planned steps (epochs) | used | within | "
             + " | ".join(f"by {share:.0%}" for share in shares) + " |",
             "|---|---:|---|---:|---:|---|" + "---|" * len(shares)]
    for r in budgeted:
        b = r["time_budget"]
        probe = b["probe"]
        noisy = ", noisy" if probe.get("noisy") else ""
        within = {True: "yes", False: "no", None: "not finished"}[b.get("within_budget")]
        cells = [f"{pct(f['val_acc1'])} / {pct(f['test_acc1'])}" if f.get("epoch") is not None else "-"
                 for f in b["at_fractions"]]
        lines.append(f"| {r['run']} | {b['minutes']:g} min | {probe['median_step_s']:.3g} s ({probe['p90_step_s']:.3g} s"
                     f"{noisy}) | {b['planned_steps']:,} ({b['planned_epochs']}) | {b['train_time_s'] / 60:.1f} min "
                     f"| {within} | " + " | ".join(cells) + " |")
    return lines


def throughput_lines(runs: list[dict[str, Any]]) -> list[str]:
    """Images per second, and GFLOP/s and the share of the peak where they were computed."""
    if not any(r.get("flops_per_image") for r in runs):
        return []
    lines = ["", "Throughput (training images per second over the whole run; FLOPs per training image counted on "
             "the model's explicit attention path, forward + backward of every weight: for a run that freezes "
             "layers this overstates its work):", "",
             "| run | images/s | MFLOP / image | GFLOP/s | share of peak |", "|---|---:|---:|---:|---:|"]
    for r in runs:
        mflop = "-" if not r.get("flops_per_image") else f"{r['flops_per_image'] / 1e6:.1f}"
        gflops = "-" if not r.get("achieved_gflops") else f"{r['achieved_gflops']:.1f}"
        share = "-" if r.get("share_of_peak") is None else f"{r['share_of_peak']:.1%}"
        ips = "-" if not r.get("images_per_s") else f"{r['images_per_s']:.0f}"
        lines.append(f"| {r['run']} | {ips} | {mflop} | {gflops} | {share} |")
    return lines


def markdown(runs: list[dict[str, Any]], target: float, minutes: list[float], command: str,
             notes: list[str] | None = None, peak: dict[str, Any] | None = None) -> str:
    lines = ["# Accuracy against training time", "",
             f"Command: `{command}`  ", "Times are training seconds (evaluation not counted), each run's own clock. "
             "The figure of a run is its test top-1 at the epoch its validation top-1 chose.", "",
             f"| run | epochs | train images | threads | precision | optimizer | training time | wall time "
             f"| test top-1, selected on validation | first epoch at {pct(target)} test (time) | final test top-1 |",
             "|---|---:|---:|---:|---|---|---:|---:|---|---|---:|"]
    for r in runs:
        hit = r["first_test_acc1_at_target"]
        at = "not reached" if hit is None else f"epoch {hit['epoch']} ({hit['train_time_s'] / 60:.1f} min)"
        lines.append(f"| {r['run']} | {r['epochs_done']}/{r['epochs']} | {r['train_images']:,} | {r['cpu_threads']} "
                     f"| {r['precision']} | {r['optimizer_kernel'] or 'not recorded'} | {(r['train_time_s'] or 0) / 60:.1f} min "
                     f"| {(r['wall_time_s'] or 0) / 60:.1f} min | {chosen(r)} | {at} | {pct(r['final_test_acc1'])} |")
    lines += budget_lines(runs)
    for key, label in (("test_acc1", "test"), ("val_acc1", "validation")):
        if not any(any(v is not None for v in r[f"{key}_by_minutes"].values()) for r in runs):
            continue
        lines += ["", f"{label.capitalize()} top-1 of the last epoch ended by a given training time:", "",
                  "| run | " + " | ".join(f"{m:g} min" for m in minutes) + " |",
                  "|---|" + "---:|" * len(minutes)]
        for r in runs:
            lines.append(f"| {r['run']} | " + " | ".join(pct(r[f"{key}_by_minutes"][f"{m:g}"]) for m in minutes) + " |")
    lines += throughput_lines(runs)
    if peak:
        what = f"fp32 matmul {peak['n']}x{peak['n']}, " if peak.get("n") else ""
        lines += ["", f"Peak: {what}{peak['best_gflops']:.0f} GFLOP/s ({peak['source']})."]
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
    flops: Annotated[bool, typer.Option(help="Count each model's FLOPs per training image; print GFLOP/s.")] = False,
    peak_gflops: Annotated[float | None, typer.Option(min=1e-3, max=1e9, help="The machine's fp32 matmul peak "
                                                     "(GFLOP/s), measured elsewhere: the share of it each run "
                                                     "reached (counts the FLOPs, as --flops).")] = None,
    measure_peak: Annotated[bool, typer.Option(help="Time a 4096x4096 fp32 matmul now for the peak (alone on the "
                                                "machine, or the figure is low).")] = False,
) -> None:
    """Time to an accuracy and accuracy by given times, from run folders."""
    marks = [float(m) for m in minutes.split(",") if m.strip()]
    for folder in runs:
        if not (folder / "metrics.jsonl").is_file() or not (folder / "summary.json").is_file():
            typer.echo(f"error: {folder} is not a run folder (no metrics.jsonl or summary.json).", err=True)
            raise typer.Exit(2)
    peak = None
    if measure_peak:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import torch
        from cpu_lab import matmul_peak

        peak = {**matmul_peak(4096, torch.float32), "source": "measured by this command, best of 5"}
    elif peak_gflops is not None:
        peak = {"best_gflops": peak_gflops, "source": "given with --peak-gflops"}
    described = [describe(folder, target, marks, flops or peak is not None, peak and peak["best_gflops"])
                 for folder in runs]
    command = "python benchmarks/time_to_accuracy.py " + shlex.join(sys.argv[1:])
    text = markdown(described, target, marks, command, note, peak)
    typer.echo(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(out.with_suffix(".json"), json.dumps(
            {"target": target, "minutes": marks, "command": command, "notes": note or [], "peak": peak,
             "runs": described}, indent=2) + "\n")
        write_text_atomically(out.with_suffix(".md"), text)
        figure(described, target, out.with_suffix(".png"))


if __name__ == "__main__":
    app()
