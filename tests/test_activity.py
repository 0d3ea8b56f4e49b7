"""Tests for the progress shown by the long steps outside training (``training.activity``): a bar or
a spinner on a terminal, one plain line elsewhere, a clean terminal however the step ends; the
callbacks that feed it (evaluation per batch, decoding per chunk); and the commands' output with it.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from finetune.cli import app
from finetune.training import activity as activity_mod
from finetune.training.activity import Activity

HIDE_CURSOR, SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"


def tty() -> Console:
    """A console that takes itself for a terminal, writing into a string."""
    return Console(file=io.StringIO(), force_terminal=True, width=120)


def written(console: Console) -> str:
    return console.file.getvalue()


def plain(text: str) -> str:
    """``text`` without its escape sequences."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


# ---------------------------------------------------------------------------------------------
# The helper on a terminal and off it


def test_on_a_terminal_it_draws_a_bar_then_takes_it_down():
    console, before = tty(), sys.stderr
    with Activity("counting things ...", "counting", total=5, console=console) as shown:
        assert shown.live
        for done in range(1, 6):
            shown.update(None, done, 5)
    out = written(console)
    assert out.startswith("counting things ...\n")  # the announcement comes first, as printed text
    assert "━" in out and "5/5" in plain(out)  # a bar that reached its total
    assert out.index(HIDE_CURSOR) < out.rindex("5/5") < out.rindex(SHOW_CURSOR)  # the cursor is back after it
    assert out.endswith("\x1b[1A\x1b[2K")  # transient: the bar's line is erased, the announcement stays
    assert sys.stderr is before  # stderr is no longer redirected above the bar
    assert signal.getsignal(signal.SIGTERM) is not activity_mod._interrupt


def test_a_spinner_says_what_it_does_while_the_total_is_unknown():
    console = tty()
    with Activity(None, "loading the model", console=console) as shown:
        shown.update("tracing the model")
    out = plain(written(console))
    assert "tracing the model" in out and "━" not in out and "/" not in out  # no bar and no count
    assert not out.startswith("\n")  # no line of its own before the spinner


def test_off_a_terminal_it_prints_the_one_line_and_nothing_per_item():
    console = Console(file=io.StringIO(), width=120)
    assert not console.is_terminal
    with Activity("evaluating a run ...", "reading", total=100, console=console) as shown:
        assert not shown.live
        for done in range(1, 101):
            shown.update("scoring", done, 100)
        shown.update("drawing")
    assert written(console) == "evaluating a run ...\n"
    silent = Console(file=io.StringIO(), width=120)
    with Activity(None, "reading", total=3, console=silent) as shown:
        shown.update(None, 3, 3)
    assert written(silent) == ""


def test_quiet_shows_nothing_even_on_a_terminal():
    console = tty()
    with Activity("doing it ...", "working", total=3, quiet=True, console=console) as shown:
        shown.update(None, 2, 3)
    assert written(console) == ""


def test_on_update_waits_for_the_first_update_to_draw():
    idle, busy = tty(), tty()
    with Activity(console=idle, on_update=True):
        pass  # e.g. every image came from the decode cache
    assert written(idle) == ""
    with Activity(console=busy, on_update=True) as shown:
        shown.update("decoding 4 images", 4, 4)
    assert "decoding 4 images" in plain(written(busy)) and "4/4" in plain(written(busy))


def test_an_exception_inside_stops_it_and_is_raised_again():
    console, before = tty(), sys.stderr
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RuntimeError, match="boom"), Activity("working ...", "working", total=3, console=console) as shown:
        shown.update(None, 1, 3)
        raise RuntimeError("boom")
    out = written(console)
    assert out.rindex(SHOW_CURSOR) > out.rindex("1/3")
    assert sys.stderr is before and signal.getsignal(signal.SIGTERM) == handler
    size = len(out)
    shown.update(None, 2, 3)  # a late callback after the end draws nothing
    assert len(written(console)) == size


def test_sigterm_while_drawing_stops_the_step_like_ctrl_c():
    console = tty()
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(KeyboardInterrupt, match="stopped by SIGTERM"), Activity("working ...", "working",
                                                                                   console=console):
            # Never send it to a process that would die of it: the handler must be ours first.
            assert signal.getsignal(signal.SIGTERM) is activity_mod._interrupt
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # put back
        out = written(console)
        assert out.rindex(SHOW_CURSOR) > out.rindex(HIDE_CURSOR)  # the terminal got its cursor back
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_sigterm_handler_already_set_is_left_alone():
    def own(signum, frame):  # e.g. a run's start-up, which stops with its own message
        raise AssertionError("not sent")

    previous = signal.signal(signal.SIGTERM, own)
    try:
        with Activity("working ...", "working", console=tty()):
            assert signal.getsignal(signal.SIGTERM) is own
        assert signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------------------------
# The callbacks that feed it


def test_evaluate_calls_its_batch_callback_once_per_batch_with_the_totals():
    from finetune.data.loader import BatchLoader
    from finetune.data.splits import ImageTensors
    from finetune.training.evaluate import evaluate

    gen = torch.Generator().manual_seed(0)
    split = ImageTensors(torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8, generator=gen),
                         torch.randint(0, 4, (10,), generator=gen))
    loader = BatchLoader(split, batch_size=4, train=False, device=torch.device("cpu"), out_size=(8, 8),
                         mean=(0.5,) * 3, std=(0.5,) * 3)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    calls = []
    result = evaluate(model, loader, 4, on_batch=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]  # 4 + 4 + 2 images
    assert result.to_dict() == evaluate(model, loader, 4).to_dict()  # the callback changes nothing measured


def write_pngs(folder, count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_decoding_reports_each_chunk_and_moves_the_bar(tmp_path, monkeypatch):
    import finetune.data.decode as decode_mod
    from finetune.data.splits import SkippedFiles

    monkeypatch.setattr(decode_mod, "_DECODE_CHUNK", 2)
    files = write_pngs(tmp_path / "images", 5)
    heard = []
    with decode_mod.decode_progress(lambda done, total: heard.append((done, total))):
        decoded = decode_mod.decode_files(files, [0] * 5, None, SkippedFiles())
    assert heard == [(0, 5), (2, 5), (4, 5), (5, 5)] and len(decoded.images) == 5
    decode_mod.decode_files(files, [0] * 5, None, SkippedFiles())
    assert len(heard) == 4  # outside the block nobody hears

    console = tty()
    with Activity(console=console, on_update=True) as shown, shown.decoding():
        decode_mod.decode_files(files, [0] * 5, None, SkippedFiles())
    assert "decoding 5 images" in plain(written(console)) and "5/5" in plain(written(console))


# ---------------------------------------------------------------------------------------------
# The commands: results on stdout as before, one line on stderr off a terminal


def test_eval_predict_and_report_keep_stdout_and_say_one_line_on_stderr(tmp_path, monkeypatch):
    runner = CliRunner()
    trained = runner.invoke(app, ["run", "quick_cpu", "output.plots=false", f"output.dir={tmp_path / 'runs'}",
                                  "data.synthetic_train=64", "data.synthetic_test=40", "data.batch_size=16", "-q"])
    assert trained.exit_code == 0, trained.output
    run_dir = tmp_path / "runs" / "quick_cpu"
    summary = json.loads((run_dir / "summary.json").read_text())

    args = ["eval", str(run_dir), "--device", "cpu", "--batch-size", "16"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stderr == f"evaluating {run_dir} on synthetic (reading the images, then scoring them) ...\n"
    top1 = float(re.search(r"top-1 ([\d.]+)%", result.stdout).group(1))
    assert top1 == round(100 * summary["final_acc1"], 2) and "(40 images)" in result.stdout
    assert len(result.stdout.splitlines()) == 1 + 1 + 10  # the result, the table's heading, ten classes

    # On a terminal: the same stdout, and a bar over the 3 batches on stderr (taken down at the end).
    import finetune.cli.evaluate as evaluate_cli

    console = tty()
    monkeypatch.setattr(evaluate_cli, "err", console)
    on_terminal = runner.invoke(app, args)
    assert on_terminal.exit_code == 0, on_terminal.output
    assert on_terminal.stdout == result.stdout and on_terminal.stderr == ""
    drawn = plain(written(console))
    assert drawn.startswith("evaluating ") and "scoring 40 images in batches of 16" in drawn and "3/3" in drawn
    assert written(console).rindex(SHOW_CURSOR) > written(console).rindex("3/3")
    monkeypatch.undo()

    photos = write_pngs(tmp_path / "photos", 17)
    many = runner.invoke(app, ["predict", str(run_dir), *photos, "--device", "cpu"])
    assert many.exit_code == 0, many.output
    assert many.stderr == "reading and classifying 17 images ...\n"
    assert len(many.stdout.splitlines()) == 17 * 4
    few = runner.invoke(app, ["predict", str(run_dir), *photos[:16], "--device", "cpu"])
    assert few.exit_code == 0 and few.stderr == ""

    report = runner.invoke(app, ["report", str(run_dir), "--out", str(tmp_path / "report")])
    assert report.exit_code == 0, report.output
    assert report.stderr == f"reading 1 run(s) and drawing the report into {tmp_path / 'report'} ...\n"
    assert report.stdout.rstrip().endswith(f"report: {tmp_path / 'report' / 'report.md'}")
