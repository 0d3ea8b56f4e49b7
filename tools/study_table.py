"""The README's study table and the results page's cost table, from a study's committed ``study.csv``.

    python tools/study_table.py docs/results/transfer_study/study.csv
    python tools/study_table.py docs/results/transfer_study/study.csv --costs

Prints one Markdown table: a row per variant, a column per training-set size, each cell the mean ±
standard deviation over the finished seeds of test top-1 at the epoch chosen on validation (a cell
resting on fewer seeds than asked says how many). With ``--costs`` each cell is instead the
training time of the fastest of the finished runs (evaluation not counted; the fastest, because
another process sharing the machine can only slow a run down, so it is the nearest to the machine
alone), beside each variant's trainable parameters and the memory their gradients and optimizer
state take. ``tests/test_docs.py`` checks that the README's and the results page's tables are
exactly this output, so their figures always come from the results file.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path


def _read(csv_path: Path) -> tuple[list[str], list[str], dict[tuple[str, str], dict[str, str]]]:
    """The study's sizes and variants in its order, and its rows by (variant, size)."""
    rows = list(csv.DictReader(csv_path.open()))
    sizes = list(dict.fromkeys(r["data.train_subset"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    cell = {(r["variant"], r["data.train_subset"]): r for r in rows}
    return sizes, variants, cell


def study_table(csv_path: Path) -> str:
    sizes, variants, cell = _read(csv_path)
    head = "| variant | trainable params | " + " | ".join(f"{int(s):,} images" for s in sizes) + " |"
    out = [head, "| --- | ---: | " + " | ".join("---:" for _ in sizes) + " |"]
    for v in variants:
        params = next((cell[(v, s)]["params_trainable"] for s in sizes if cell[(v, s)]["params_trainable"]), "")
        cells = []
        for s in sizes:
            r = cell[(v, s)]
            done, asked = int(r["seeds_finished"]), int(r["seeds"])
            if not done:
                cells.append("not yet run")
                continue
            text = f"{float(r['score_mean_pct']):.1f}"
            if r["score_std_pct"]:
                text += f" ± {float(r['score_std_pct']):.1f}"
            if done < asked:
                text += f" ({done} of {asked} seeds)"
            cells.append(text)
        out.append(f"| {v} | {int(params):,} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def cost_table(csv_path: Path) -> str:
    sizes, variants, cell = _read(csv_path)
    head = ("| variant | trainable params | grad + optimizer state | "
            + " | ".join(f"{int(s):,} images" for s in sizes) + " |")
    out = [head, "| --- | ---: | ---: | " + " | ".join("---:" for _ in sizes) + " |"]
    for v in variants:
        done = [cell[(v, s)] for s in sizes if cell[(v, s)]["params_trainable"]]
        params, state = (int(done[0]["params_trainable"]), float(done[0]["training_state_mb"])) if done else (0, 0.0)
        cells = []
        for s in sizes:
            times = [float(t) for t in cell[(v, s)].get("train_times_s", "").split() if t != "-"]
            cells.append(f"{min(times):.0f} s" if times else "-")
        out.append(f"| {v} | {params:,} | {state:.2f} MB | " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    args = sys.argv[1:]
    costs = "--costs" in args
    paths = [a for a in args if a != "--costs"]
    if len(paths) != 1:
        sys.exit("usage: python tools/study_table.py STUDY_CSV [--costs]")
    print((cost_table if costs else study_table)(Path(paths[0])))
