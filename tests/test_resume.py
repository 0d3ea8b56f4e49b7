"""Runs that survive crashes: checkpoints, ``finetune resume``, signals, locks, overwrite and divergence.

The central property: a run killed at any point and resumed with ``finetune resume`` ends with
bit-identical weights and equal metrics to a run that was never interrupted (CPU, fp32). Kills are
real SIGKILLs of a child process; the child runs on one thread, like this test process
(conftest), so both compute with the same kernels.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

import finetune.training.loop as loop
from conftest import REPO_ROOT, send_at_step
from finetune.cli import app
from finetune.errors import CheckpointError, DivergedError, RunDirError, RunInterrupted
from finetune.recipe import load_recipe
from finetune.runs.records import read_run
from finetune.runs.folder import CHECKPOINT, lock_held, run_status
from finetune.runs.rundir import RunDir
from finetune.snapshot import load_state, pack, save_state, unpack
from finetune.runs.run import resume, run, run_dir_for

QUICK = REPO_ROOT / "recipes" / "quick_cpu.yaml"
runner = CliRunner()
# Every option whose state a checkpoint must carry for the resumed run to match: the random streams
# of mixup, drop path and random-resized-crop, the EMA, gradient accumulation, clipping and
# layer-wise lr; a validation split for the best epoch. 224 training images, 4 steps of 2 x 28 per epoch.
FULL_STATE = (
    "train.epochs=3", "data.val_split=32", "data.batch_size=28", "train.grad_accum=2", "train.log_every=1",
    "train.mixup_alpha=0.4", "train.cutmix_alpha=1.0", "train.ema=true", "train.ema_decay=0.9",
    "model.drop_path_rate=0.2", "data.augment.random_resized_crop=true", "optim.layer_decay=0.7",
    "train.clip_grad=1.0", "output.plots=false",
)
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}


def quick(tmp_path, *overrides: str):
    return load_recipe(QUICK, [f"output.dir={tmp_path / 'runs'}", *overrides])


def quick_args(tmp_path, *overrides: str) -> list[str]:
    return [str(QUICK), f"output.dir={tmp_path / 'runs'}", *overrides]


def strict_json_lines(path: Path) -> list[dict]:
    """Every line parsed by a parser that refuses NaN and Infinity, as strict JSON readers do."""
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def metrics_without_timing(run_dir: Path) -> list[dict]:
    rows = strict_json_lines(run_dir / "metrics.jsonl")
    return [{k: v for k, v in row.items() if k not in ("time_s", "images_per_s")} for row in rows]


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical final, best and live weights; equal metrics lines and results."""
    for name in ("model.safetensors", "best/model.safetensors"):
        if (b / name).exists():
            wa, wb = load_file(a / name), load_file(b / name)
            assert wa.keys() == wb.keys()
            for key in wa:
                assert torch.equal(wa[key], wb[key]), f"{name}: {key}"
    live_a, live_b = load_state(a / CHECKPOINT), load_state(b / CHECKPOINT)
    for key in live_b["model"]:
        assert torch.equal(live_a["model"][key], live_b["model"][key]), key
    assert metrics_without_timing(a) == metrics_without_timing(b)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for key in ("status", "final_acc1", "final_acc5", "final_loss", "best_epoch", "best_val_acc1",
                "best_test_acc1", "confusion_matrix", "steps", "selection"):
        assert sa.get(key) == sb.get(key), key


# A child that trains and SIGKILLs itself right after its N-th checkpoint reached the disk (or,
# with "during", after the checkpoint's temporary file is written but before it replaces the last).
KILLER = textwrap.dedent('''
    import os, signal, sys
    import finetune.runs.rundir as rundir, finetune.snapshot as snapshot
    from finetune.recipe import load_recipe
    from finetune.runs.run import run

    when, n = sys.argv[1], int(sys.argv[2])
    seen = []
    real_save, real_replace = rundir.RunDir.save_checkpoint, snapshot.os.replace

    def save(self, state):
        seen.append(state["progress"]["step"])
        real_save(self, state)
        if when == "after" and len(seen) == n:
            os.kill(os.getpid(), signal.SIGKILL)

    def replace(src, dst):
        if when == "during" and len(seen) == n and str(dst).endswith("last.safetensors"):
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)

    rundir.RunDir.save_checkpoint = save
    snapshot.os.replace = replace
    run(load_recipe(sys.argv[3], sys.argv[4:]), quiet=True)
''')


def run_and_kill(tmp_path, when: str, n: int, *args: str) -> subprocess.CompletedProcess:
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    result = subprocess.run([sys.executable, str(script), when, str(n), *args], env=ONE_THREAD,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr
    return result


# ---------------------------------------------------------------------------------------------
# Kill -9 and resume


def test_kill_9_mid_epoch_then_resume_gives_the_uninterrupted_run(tmp_path):
    # Checkpoints every 3 steps; the 3rd is at step 6, in the middle of epoch 2 (steps 5-8).
    args = ("output.checkpoint_every_steps=3", *FULL_STATE)
    run_and_kill(tmp_path, "after", 3, *quick_args(tmp_path, "name=killed", *args))
    killed = tmp_path / "runs" / "killed"
    assert json.loads((killed / "summary.json").read_text())["status"] == "running"  # as kill -9 leaves it
    assert run_status(killed) == "interrupted"  # ... but no process holds its lock
    checkpoint = load_state(killed / CHECKPOINT)["progress"]
    assert (checkpoint["epoch"], checkpoint["batch"], checkpoint["step"]) == (2, 4, 6)  # mid-epoch

    result = runner.invoke(app, ["resume", str(killed), "-q"])
    assert result.exit_code == 0, result.output
    assert "done killed" in result.stdout
    run(quick(tmp_path, "name=straight", *args), quiet=True)
    assert_same_run(killed, tmp_path / "runs" / "straight")

    summary = json.loads((killed / "summary.json").read_text())
    (resumed,) = summary["resumed"]
    assert (resumed["epoch"], resumed["step"], resumed["previous_status"]) == (2, 6, "interrupted")
    assert summary["wall_time_s"] >= summary["train_time_s"] > 0
    steps = [row["step"] for row in strict_json_lines(killed / "metrics.jsonl") if row["kind"] == "step"]
    assert steps == list(range(1, 13))  # no step line lost or written twice


def test_kill_9_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    # Killed after the 2nd checkpoint's temporary file is complete, before it replaces the 1st.
    run_and_kill(tmp_path, "during", 2, *quick_args(tmp_path, "name=killed", "output.checkpoint_every_steps=3",
                                                     "train.epochs=2", "output.plots=false"))
    killed = tmp_path / "runs" / "killed"
    assert list((killed / "checkpoints").glob(".*.tmp"))  # the half-done write is visible ...
    assert load_state(killed / CHECKPOINT)["progress"]["step"] == 3  # ... and the last checkpoint intact
    resume(killed, quiet=True)
    assert not list((killed / "checkpoints").glob(".*.tmp"))
    run(quick(tmp_path, "name=straight", "output.checkpoint_every_steps=3", "train.epochs=2", "output.plots=false"),
        quiet=True)
    assert_same_run(killed, tmp_path / "runs" / "straight")


def test_kill_9_from_outside_at_any_moment_then_resume(tmp_path):
    # The user's view: `finetune run`, `kill -9 PID` whenever, `finetune resume`.
    args = quick_args(tmp_path, "name=killed", "train.epochs=12", "output.checkpoint_every_steps=2",
                      "output.plots=false", "data.val_split=32")
    child = subprocess.Popen([sys.executable, "-m", "finetune", "run", *args, "-q"], env=ONE_THREAD,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed = tmp_path / "runs" / "killed"
    deadline = time.monotonic() + 120
    while not (killed / CHECKPOINT).exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()
    assert run_status(killed) == "interrupted"

    result = runner.invoke(app, ["resume", str(killed), "-q"])
    assert result.exit_code == 0, result.output
    run(load_recipe(QUICK, args[1:] + ["name=straight"]), quiet=True)
    assert_same_run(killed, tmp_path / "runs" / "straight")


# ---------------------------------------------------------------------------------------------
# Signals


def test_sigterm_checkpoints_at_the_next_step_and_resume_finishes_the_same(tmp_path, monkeypatch):
    send_at_step(monkeypatch, 6)
    recipe = quick(tmp_path, "name=stopped", *FULL_STATE)
    # The handlers the process had (SIGINT is ignored, not Python's default, under a shell's background job).
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(RunInterrupted, match="finetune resume") as info:
        run(recipe, quiet=True)
    stopped = run_dir_for(recipe)
    assert str(stopped) in str(info.value)
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "SIGTERM" in summary["error"]
    assert load_state(stopped / CHECKPOINT)["progress"]["step"] == 6  # saved at the step it stopped
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # put back as they were
    assert not lock_held(stopped)

    monkeypatch.undo()
    resume(stopped, quiet=True)
    run(quick(tmp_path, "name=straight", *FULL_STATE), quiet=True)
    assert_same_run(stopped, tmp_path / "runs" / "straight")


def test_a_second_signal_stops_at_once_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    send_at_step(monkeypatch, 6, times=2)
    recipe = quick(tmp_path, "output.checkpoint_every_steps=4", "train.epochs=2", "output.plots=false")
    with pytest.raises(KeyboardInterrupt) as info:
        run(recipe, quiet=True)
    assert not isinstance(info.value, RunInterrupted)
    folder = run_dir_for(recipe)
    assert run_status(folder) == "interrupted"
    assert load_state(folder / CHECKPOINT)["progress"]["step"] == 4  # no checkpoint at step 6


def test_ctrl_c_on_the_command_line_says_how_to_resume(tmp_path, monkeypatch):
    send_at_step(monkeypatch, 3, sig=signal.SIGINT)
    result = runner.invoke(app, ["run", *quick_args(tmp_path, "output.plots=false"), "-q"])
    assert result.exit_code == 130
    assert "SIGINT" in result.output and "finetune resume" in result.output and "Traceback" not in result.output


def test_signals_during_the_final_save_leave_a_consistent_folder(tmp_path, monkeypatch):
    import finetune.viz.plots as plots

    real_plot, calls = plots.plot_curves, []

    def plot_then_signal(*args, **kwargs):
        calls.append(1)
        os.kill(os.getpid(), signal.SIGTERM)  # the first asks to stop: the nearly done run finishes
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # a second, on the next run: stop now
        return real_plot(*args, **kwargs)

    monkeypatch.setattr(plots, "plot_curves", plot_then_signal)
    recipe = quick(tmp_path, "name=first")
    summary = run(recipe, quiet=True)
    assert summary["status"] == "finished" and (run_dir_for(recipe) / "curves.png").exists()

    second = quick(tmp_path, "name=second")
    with pytest.raises(KeyboardInterrupt):
        run(second, quiet=True)
    folder = run_dir_for(second)
    assert run_status(folder) == "interrupted"
    monkeypatch.undo()
    summary = resume(folder, quiet=True)  # nothing left to train: it saves and plots, and finishes
    assert summary["status"] == "finished" and (folder / "curves.png").exists()
    assert_same_run(folder, run_dir_for(recipe))


# ---------------------------------------------------------------------------------------------
# Locks and overwrite


def test_a_second_process_on_a_run_folder_is_refused_even_with_overwrite(tmp_path):
    recipe = quick(tmp_path, "output.overwrite=true")
    folder = run_dir_for(recipe)
    holder = RunDir.create(folder, recipe, {"status": "running"}, overwrite=False)  # a run in progress
    try:
        for attempt in (lambda: run(recipe, quiet=True), lambda: resume(folder)):
            with pytest.raises(RunDirError, match="in use"):
                attempt()
        result = runner.invoke(app, ["run", *quick_args(tmp_path, "output.overwrite=true")])
        assert result.exit_code == 1 and "in use" in result.output and "Traceback" not in result.output
        assert read_run(folder).status == "running"
    finally:
        holder.close()
    assert run_status(folder) == "interrupted"  # its process let go without finishing


def test_concurrent_runs_with_one_name_never_mix(tmp_path):
    # Three processes start at once on one run folder, with overwrite on; each has its own seed.
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "finetune", "run", *quick_args(tmp_path, f"seed={seed}", "output.overwrite=true",
                                                                   "output.plots=false"), "-q"],
            env=ONE_THREAD, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for seed in (1, 2, 3)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    codes = [p.returncode for p in procs]
    assert 0 in codes, outputs
    for code, (out, err) in zip(codes, outputs):
        assert code in (0, 1), err
        if code == 1:  # refused before training: the folder was in use
            assert "in use" in err and "Traceback" not in err, err
    folder = tmp_path / "runs" / "quick_cpu"
    seed = load_recipe(folder / "recipe.yaml").seed
    state = load_state(folder / CHECKPOINT)
    assert state["recipe"]["seed"] == seed  # recipe, checkpoint and model come from one run
    model = load_file(folder / "model.safetensors")
    assert all(torch.equal(model[k], state["model"][k]) for k in model)
    assert json.loads((folder / "summary.json").read_text())["status"] == "finished"
    assert not [p.name for p in folder.parent.iterdir() if p.name.startswith(".")]  # nothing left aside


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(tmp_path):
    folder = tmp_path / "runs" / "quick_cpu"
    folder.mkdir(parents=True)
    (folder / "thesis.tex").write_text("two years of work")
    for overwrite in ("false", "true"):
        result = runner.invoke(app, ["run", *quick_args(tmp_path, f"output.overwrite={overwrite}")])
        assert result.exit_code == 1 and "not a finetune run folder" in result.output, result.output
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.tex"]
    assert sorted(p.name for p in folder.parent.iterdir()) == ["quick_cpu"]


def test_overwrite_keeps_the_earlier_run_until_the_new_one_finishes(tmp_path, monkeypatch):
    first = quick(tmp_path, "output.plots=false")
    run(first, quiet=True)
    folder = run_dir_for(first)
    earlier = load_file(folder / "model.safetensors")

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loop, "evaluate", broken)  # the new run fails at its first evaluation
    replacing = quick(tmp_path, "output.plots=false", "output.overwrite=true", "seed=5")
    with pytest.raises(OSError):
        run(replacing, quiet=True)
    (aside,) = [p for p in folder.parent.iterdir() if p.name.startswith(".quick_cpu.replaced-")]
    assert torch.equal(load_file(aside / "model.safetensors")["head.weight"], earlier["head.weight"])
    assert json.loads((aside / "summary.json").read_text())["status"] == "finished"
    failed = json.loads((folder / "summary.json").read_text())
    assert failed["status"] == "failed" and str(aside) in failed["error"] and "replaced_runs" not in failed

    monkeypatch.undo()
    run(replacing, quiet=True)  # a new attempt replaces the failed one and finishes ...
    assert load_recipe(folder / "recipe.yaml").seed == 5
    assert [p.name for p in folder.parent.iterdir()] == ["quick_cpu"]  # ... and only then deletes both


def test_an_interrupted_run_is_not_rerun_over_but_resumed(tmp_path):
    folder = tmp_path / "runs" / "quick_cpu"
    RunDir.create(folder, quick(tmp_path), {"status": "running"}, overwrite=False).close()  # a dead run
    result = runner.invoke(app, ["run", *quick_args(tmp_path, "output.overwrite=false")])
    assert result.exit_code == 1
    assert "did not finish (status interrupted)" in result.output and f"finetune resume {folder}" in result.output
    result = runner.invoke(app, ["eval", str(folder)])
    assert result.exit_code == 1 and "did not finish" in result.output and "finetune resume" in result.output


# ---------------------------------------------------------------------------------------------
# Failures while saving, and bad checkpoints


def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint_and_says_so(tmp_path, monkeypatch):
    import safetensors.torch

    real, calls = safetensors.torch.save_file, []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            with open(filename, "wb") as f:
                f.write(b"\0" * 100)  # part of it made it to disk
            raise OSError(28, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    args = quick_args(tmp_path, "output.checkpoint_every_steps=3", "output.plots=false", "output.save_model=false")
    result = runner.invoke(app, ["run", *args, "-q"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    message = " ".join(result.output.split())
    assert "No space left on device" in message and "is intact" in message and "finetune resume" in message
    folder = tmp_path / "runs" / "quick_cpu"
    assert load_state(folder / CHECKPOINT)["progress"]["step"] == 3
    assert not list((folder / "checkpoints").glob(".*"))  # the partial file is gone
    assert json.loads((folder / "summary.json").read_text())["status"] == "failed"
    monkeypatch.undo()
    assert resume(folder, quiet=True)["status"] == "finished"


@pytest.mark.parametrize("damage", ["truncate", "recipe"])
def test_a_damaged_or_mismatched_checkpoint_is_a_clear_error(tmp_path, damage):
    folder = tmp_path / "runs" / "quick_cpu"
    RunDir.create(folder, quick(tmp_path), {"status": "running"}, overwrite=False).close()
    recipe = quick(tmp_path)
    from finetune.training.setup import build, prepare

    state = build(prepare(recipe))
    tree = state.state_dict()
    tree.update(metrics_offset=0, wall_time_s=0.0)
    (folder / "checkpoints").mkdir()
    save_state(folder / CHECKPOINT, tree)
    if damage == "truncate":
        data = (folder / CHECKPOINT).read_bytes()
        (folder / CHECKPOINT).write_bytes(data[: len(data) // 2])
        expected = "not a readable finetune checkpoint"
    else:
        (folder / "recipe.yaml").write_text((folder / "recipe.yaml").read_text().replace("lr: 0.001", "lr: 0.002"))
        expected = "written by another recipe"
    result = runner.invoke(app, ["resume", str(folder)])
    assert result.exit_code == 1 and expected in result.output and "Traceback" not in result.output
    with pytest.raises(CheckpointError):
        resume(folder)
    assert not lock_held(folder)


def test_a_checkpoint_from_before_a_recipe_key_existed_resumes(tmp_path):
    """A checkpoint keeps the recipe as it was written; a key added to recipes since (with a default
    that trains as before, as ``model.args`` was) must not make the run another recipe's, while a
    key today's schema refuses still does."""
    folder = tmp_path / "runs" / "quick_cpu"
    recipe = quick(tmp_path, "train.epochs=1", "output.plots=false")
    RunDir.create(folder, recipe, {"status": "running"}, overwrite=False).close()
    from finetune.training.setup import build, prepare

    tree = build(prepare(recipe)).state_dict()
    tree.update(metrics_offset=0, wall_time_s=0.0)
    assert tree["recipe"]["model"].pop("args") == {}  # as a checkpoint from before model.args stored it
    (folder / "checkpoints").mkdir()
    save_state(folder / CHECKPOINT, tree)
    assert resume(folder, quiet=True)["status"] == "finished"

    tree["recipe"]["model"]["width"] = 3  # a key no recipe has: not this run's recipe
    save_state(folder / CHECKPOINT, tree)
    (folder / "summary.json").write_text('{"status": "running"}')
    with pytest.raises(CheckpointError, match="written by another recipe"):
        resume(folder)


def test_resume_refuses_what_cannot_be_resumed(tmp_path):
    finished = quick(tmp_path, "name=finished", "output.plots=false")
    run(finished, quiet=True)
    early = tmp_path / "runs" / "early"
    RunDir.create(early, quick(tmp_path, "name=early"), {"status": "running"}, overwrite=False).close()
    cases = [
        (run_dir_for(finished), "already finished"),
        (early, "before its first checkpoint"),
        (tmp_path, "not a finetune run folder"),
        (tmp_path / "nowhere", "is not a folder"),
    ]
    for folder, expected in cases:
        result = runner.invoke(app, ["resume", str(folder)])
        assert result.exit_code == 1 and expected in result.output, result.output
        assert "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------
# Divergence


def test_a_diverging_run_stops_as_diverged_with_strict_json(tmp_path):
    args = quick_args(tmp_path, "optim.lr=1e6", "optim.name=sgd", "train.log_every=5", "train.epochs=3")
    result = runner.invoke(app, ["run", *args, "-q"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    message = " ".join(result.output.split())
    assert "Training diverged" in message and "learning rate 1e+06" in message and "optim.lr=" in message
    assert "Traceback" not in message and message.count("error:") == 1
    folder = tmp_path / "runs" / "quick_cpu"
    summary = json.loads((folder / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert summary["status"] == "diverged" and "Training diverged" in summary["error"]
    assert summary["steps"] <= 5  # stopped within one log interval of the first bad step
    strict_json_lines(folder / "metrics.jsonl")  # strict JSON too
    assert not (folder / "model.safetensors").exists()  # no NaN model saved
    assert read_run(folder).status == "diverged"
    result = runner.invoke(app, ["resume", str(folder)])
    assert result.exit_code == 1 and "diverged" in result.output


def test_divergence_is_caught_at_a_checkpoint_between_log_lines(tmp_path):
    recipe = quick(tmp_path, "optim.lr=1e6", "optim.name=sgd", "train.log_every=1000", "output.checkpoint_every_steps=2")
    with pytest.raises(DivergedError, match="since the last log line"):
        run(recipe, quiet=True)
    saved = load_state(run_dir_for(recipe) / CHECKPOINT)  # a NaN state is never checkpointed
    assert all(torch.isfinite(v).all() for v in saved["model"].values())
    assert saved["progress"]["step"] % 2 == 0 and saved["progress"]["step"] < json.loads(
        (run_dir_for(recipe) / "summary.json").read_text())["steps"]


def test_metrics_cut_back_to_a_checkpoint_continue_from_there(tmp_path):
    folder = tmp_path / "run"
    rundir = RunDir.create(folder, quick(tmp_path), {"status": "running"}, overwrite=False)
    rundir.log({"step": 1})
    offset = rundir.metrics_offset()
    rundir.log({"step": 2, "loss": float("nan")})  # written after the checkpoint: dropped on resume
    rundir.truncate_metrics(offset)
    assert rundir.metrics_offset() == offset  # a checkpoint taken now records the right place
    rundir.log({"step": 2, "loss": 0.5})
    rundir.close()
    assert strict_json_lines(folder / "metrics.jsonl") == [{"step": 1}, {"step": 2, "loss": 0.5}]
    # Shorter than the checkpoint says (lines lost in a power cut): kept as it is, with a warning.
    rundir = RunDir(folder, None)
    assert "shorter" in rundir.truncate_metrics(10_000)
    rundir.close()
    assert strict_json_lines(folder / "metrics.jsonl") == [{"step": 1}, {"step": 2, "loss": 0.5}]


# ---------------------------------------------------------------------------------------------
# The state file


def test_state_file_round_trips_nested_state_without_pickle(tmp_path):
    tree = {
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}},
                      "param_groups": [{"betas": (0.9, 0.999), "params": [0], "lr": 1e-3}]},
        "odd keys": {"__tensor__": "not a marker", 2.5: "float key", None: True},
        "numbers": [float("nan"), float("inf"), -float("inf"), 0.1, 2**62, None, False],
        "rng": torch.get_rng_state(),
        "empty": torch.zeros(0, 4, dtype=torch.bfloat16),
    }
    path = tmp_path / "state.safetensors"
    save_state(path, tree)
    back = load_state(path)
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)  # tuples stay tuples
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], tree["optimizer"]["state"][0]["exp_avg"])
    assert back["odd keys"] == tree["odd keys"]
    nums = back["numbers"]
    assert nums[0] != nums[0] and nums[1:] == tree["numbers"][1:]
    assert torch.equal(back["rng"], tree["rng"]) and back["empty"].dtype == torch.bfloat16
    with safe_open(str(path), framework="pt") as f:  # a plain safetensors file: no pickle to trust
        assert "optimizer/state/0/exp_avg" in f.keys()
    tensors, skeleton = pack(tree)
    assert unpack(json.loads(json.dumps(skeleton)), tensors)["odd keys"] == tree["odd keys"]
    with pytest.raises(TypeError, match="ndarray"):
        import numpy as np

        pack({"x": np.zeros(2)})


def test_a_run_stopped_mid_epoch_reports_the_time_it_trained(tmp_path, monkeypatch):
    send_at_step(monkeypatch, 3)
    recipe = quick(tmp_path, "output.plots=false", "train.log_every=1")
    with pytest.raises(RunInterrupted):
        run(recipe, quiet=True)
    folder = run_dir_for(recipe)
    summary = json.loads((folder / "summary.json").read_text())
    steps = [row for row in strict_json_lines(folder / "metrics.jsonl") if row["kind"] == "step"]
    assert summary["epochs_done"] == 0 and summary["steps"] == 3
    assert "confusion_matrix" not in summary  # C x C numbers: written once, when the run finishes
    # the stretch of epoch 1 that ran counts: training time at least that of the last log line,
    # and a throughput of images over that time (not over the zero seconds of finished epochs)
    assert summary["train_time_s"] >= steps[-1]["time_s"] > 0
    seen = load_state(folder / CHECKPOINT)["progress"]["images_seen"]
    assert summary["images_per_s"] < seen / steps[0]["time_s"]


def test_log_intervals_across_epochs_count_their_own_training_time(tmp_path):
    # 8 steps per epoch, a line every 3: the line at step 9 covers steps 7-8 of epoch 1 and step 9
    # of epoch 2, and its images/s must count the time of all three (evaluation excluded).
    recipe = quick(tmp_path, "output.plots=false", "train.log_every=3", "train.epochs=2")
    run(recipe, quiet=True)
    steps = [row for row in strict_json_lines(run_dir_for(recipe) / "metrics.jsonl") if row["kind"] == "step"]
    assert [row["step"] for row in steps] == [3, 6, 9, 12, 15]
    times = [0.0] + [row["time_s"] for row in steps]
    images = [row["images_per_s"] * (times[i + 1] - times[i]) for i, row in enumerate(steps)]
    assert images == pytest.approx([96] * 5, rel=0.05)


def test_a_stop_while_saving_the_best_model_keeps_the_earlier_one_whole(tmp_path, monkeypatch):
    import finetune.models.saving as models
    from finetune import load_model

    recipe = quick(tmp_path, "output.plots=false", "data.val_split=32")
    run(recipe, quiet=True)
    folder = run_dir_for(recipe)
    before = load_file(folder / "best" / "model.safetensors")
    changed = load_model(folder / "best")
    with torch.no_grad():
        for q in changed.parameters():
            q.add_(1.0)

    def second_ctrl_c(path):  # the weights are written, config.json (with their hash) is not yet
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "file_sha256", second_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        RunDir(folder, None).save_model(changed, ["c"] * 10, "best")
    monkeypatch.undo()
    reloaded = load_model(folder / "best")  # checks the weights against config.json's SHA-256
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in before.items())
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".best")) == []
