"""The README's study table, from a study's committed ``study.csv``.

    python tools/study_table.py docs/results/transfer_study/study.csv

Prints one Markdown table: a row per variant, a column per training-set size, each cell the mean ±
standard deviation over the finished seeds of test top-1 at the epoch chosen on validation (a cell
resting on fewer seeds than asked says how many). ``tests/test_docs.py`` checks that the README's
table is exactly this output, so the README's figures always come from the results file.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path


def study_table(csv_path: Path) -> str:
    rows = list(csv.DictReader(csv_path.open()))
    sizes = list(dict.fromkeys(r["data.train_subset"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    cell = {(r["variant"], r["data.train_subset"]): r for r in rows}
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


if __name__ == "__main__":
    print(study_table(Path(sys.argv[1])))
