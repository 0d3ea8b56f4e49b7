"""What finetune may trust in a run folder, and what a crash or a full disk leaves there.

Nothing read from disk names a path to delete; only folders carrying finetune's marker are ever
replaced; every failure of a run that replaces another says where the earlier one is; files reach
the disk before anything relies on them; a damaged checkpoint is refused by name; every failed
write is one message that says the last checkpoint is intact. Runs are the tiny synthetic
``quick_cpu`` recipe; one interrupted and one finished run are trained once per module and copied.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

import finetune
import finetune.training.loop as loop
from conftest import REPO_ROOT, send_at_step
from finetune.cli import app
from finetune.errors import RunDirError, RunInterrupted
from finetune.recipe import load_recipe
from finetune.runs.folder import (
    CHECKPOINT, MARKER, is_legacy_run_folder, is_owned_run_folder, is_run_folder, parked_runs, run_status,
)
from finetune.runs.rundir import RunDir
from finetune.snapshot import load_state
from finetune.runs.run import resume, run

QUICK = REPO_ROOT / "recipes" / "quick_cpu.yaml"
runner = CliRunner()
FAST = ("output.plots=false", "train.log_every=1")
# 224 training images after a 32-image validation split: 7 steps per epoch; stopped at step 10, in
# epoch 2, after a checkpoint at the end of epoch 1 (step 7) and with best/ saved there.
INTERRUPTED = (*FAST, "train.epochs=2", "data.val_split=32")
ENOSPC_SAFETENSORS = "Error while serializing: I/O error: No space left on device (os error 28)"


def quick(out: Path, *overrides: str):
    return load_recipe(QUICK, [f"output.dir={out}", *overrides])


def quick_args(out: Path, *overrides: str) -> list[str]:
    return [str(QUICK), f"output.dir={out}", *overrides]


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder`` with its bytes (``None`` for folders), links not followed."""
    return {
        str(p.relative_to(folder)): (None if p.is_dir() and not p.is_symlink() else os.readlink(p).encode()
                                     if p.is_symlink() else p.read_bytes())
        for p in sorted(folder.rglob("*"))
    }


def one_paragraph_error(result, *expected: str) -> str:
    message = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and message.count("error:") == 1, result.output
    for text in expected:
        assert text in message, message
    return message


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two runs trained once: ``interrupted`` (SIGTERM at step 10) and ``finished``."""
    out = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        send_at_step(mp, 10)
        with pytest.raises(RunInterrupted):
            run(quick(out, "name=interrupted", *INTERRUPTED), quiet=True)
    run(quick(out, "name=finished", *FAST), quiet=True)
    return out


def copy_run(trained: Path, which: str, to: Path) -> Path:
    """A copy of a trained run at ``to`` (its recipe still names the original output.dir, which
    resume does not use)."""
    shutil.copytree(trained / which, to, symlinks=True)
    return to


# ---------------------------------------------------------------------------------------------
# 1. Nothing read from disk names a path to delete


def test_a_crafted_summary_or_link_in_the_run_folder_never_deletes_outside_it(trained, tmp_path):
    victim = tmp_path / "thesis"
    (victim / "chapters").mkdir(parents=True)
    (victim / "thesis.tex").write_text("two years of work")
    (victim / "chapters" / "one.tex").write_text("chapter one")
    elsewhere = copy_run(trained, "finished", tmp_path / "elsewhere" / "keep")  # a real run, elsewhere
    victims = {victim: tree(victim), elsewhere: tree(elsewhere)}
    runs = tmp_path / "runs"
    folder = copy_run(trained, "interrupted", runs / "quick_cpu")

    def craft() -> None:
        summary = read_json(folder / "summary.json")
        summary["replaced_runs"] = [str(victim), str(elsewhere)]  # only folders inside tmp_path, never a real one
        (folder / "summary.json").write_text(json.dumps(summary))
        # links with the names of finetune's own leftovers, inside the folder and beside it
        for name in (".best.old.0123abcd", ".best.89abcdef", ".adapter.0badf00d", ".summary.json.1-deadbeef.tmp"):
            if not (folder / name).is_symlink():
                (folder / name).symlink_to(victim)
        (folder / "checkpoints" / ".last.safetensors.1-abcdef01.tmp").unlink(missing_ok=True)
        (folder / "checkpoints" / ".last.safetensors.1-abcdef01.tmp").symlink_to(victim / "thesis.tex")
        parked_link = runs / ".quick_cpu.replaced-20240101-000000-abcdef"
        if not parked_link.is_symlink():
            parked_link.symlink_to(victim)

    craft()
    (runs / ".quick_cpu.replaced-20240101-000000-fedcba").mkdir()  # parked by name, without the marker
    (runs / ".quick_cpu.replaced-20240101-000000-fedcba" / "notes.txt").write_text("mine")

    result = runner.invoke(app, ["resume", str(folder), "-q"])
    assert result.exit_code == 0, result.output
    assert read_json(folder / "summary.json")["status"] == "finished"
    for path, before in victims.items():
        assert tree(path) == before, path
    assert "deleted" not in result.output and parked_runs(folder) == []
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".best") or p.name.endswith(".tmp")]

    craft()  # again, on the finished run; then replace it
    result = runner.invoke(app, ["run", *quick_args(runs, "output.overwrite=true", *FAST), "-q"])
    assert result.exit_code == 0, result.output
    for path, before in victims.items():
        assert tree(path) == before, path
    assert (runs / ".quick_cpu.replaced-20240101-000000-abcdef").is_symlink()  # not ours: left alone
    assert (runs / ".quick_cpu.replaced-20240101-000000-fedcba" / "notes.txt").read_text() == "mine"
    assert "replaced_runs" not in read_json(folder / "summary.json")


@pytest.mark.parametrize("name", [".lock", "metrics.jsonl"])
def test_a_link_in_place_of_a_run_file_is_refused_never_followed(trained, tmp_path, name):
    victim = tmp_path / "thesis.tex"
    victim.write_text("two years of work\n" * 1000)  # longer than metrics.jsonl's checkpoint offset
    folder = copy_run(trained, "interrupted", tmp_path / "runs" / "quick_cpu")
    (folder / name).unlink()
    (folder / name).symlink_to(victim)  # resume would truncate it, or cut it back to the offset
    result = runner.invoke(app, ["resume", str(folder)])
    one_paragraph_error(result, f"{folder / name} is", "a link")
    assert victim.read_text() == "two years of work\n" * 1000


# ---------------------------------------------------------------------------------------------
# 2. A run folder is recognised by finetune's own marker


def test_a_new_run_folder_carries_finetunes_marker(tmp_path):
    folder = tmp_path / "runs" / "quick_cpu"
    RunDir.create(folder, quick(tmp_path / "runs"), {"name": "quick_cpu", "status": "running"}, overwrite=False).close()
    marker = read_json(folder / MARKER)
    assert marker["format"] == "finetune-run/1" and marker["finetune_version"] == finetune.__version__
    assert is_owned_run_folder(folder) and is_run_folder(folder)
    assert not [p for p in folder.parent.iterdir() if p.name != "quick_cpu"]  # no staging left


@pytest.mark.parametrize("content", ["empty_summary", "other_tools_recipe"])
def test_overwrite_refuses_a_folder_without_the_marker_and_touches_nothing(tmp_path, content):
    folder = tmp_path / "runs" / "quick_cpu"
    (folder / "src").mkdir(parents=True)
    (folder / "notes").mkdir()
    (folder / "thesis.tex").write_text("two years of work")
    (folder / "src" / "main.py").write_text("print('hello')\n")
    (folder / "notes" / "todo.md").write_text("- finish\n")
    if content == "empty_summary":
        (folder / "summary.json").write_text("{}")
    else:
        (folder / "recipe.yaml").write_text("model: resnet50\nepochs: 90\n")  # another tool's
        (folder / "summary.json").write_text('{"accuracy": 0.76}')
    before = tree(tmp_path)
    assert not is_run_folder(folder) and not is_owned_run_folder(folder)
    for overwrite in ("true", "false"):
        result = runner.invoke(app, ["run", *quick_args(tmp_path / "runs", f"output.overwrite={overwrite}")])
        one_paragraph_error(result, "not a finetune run folder", MARKER)
    with pytest.raises(RunDirError, match="not a finetune run folder"):
        RunDir.create(folder, quick(tmp_path / "runs"), {}, overwrite=True)
    assert tree(tmp_path) == before


def test_a_run_from_before_the_marker_is_resumed_and_evaluated_but_never_replaced(trained, tmp_path):
    runs = tmp_path / "runs"
    folder = copy_run(trained, "interrupted", runs / "quick_cpu")
    (folder / MARKER).unlink()  # as finetune wrote folders before the marker
    assert is_legacy_run_folder(folder) and is_run_folder(folder) and not is_owned_run_folder(folder)
    assert run_status(folder) == "interrupted"
    before = tree(runs)
    result = runner.invoke(app, ["run", *quick_args(runs, "output.overwrite=true", *FAST)])
    one_paragraph_error(result, "earlier version of finetune", f"mv {folder}", "will not move or delete")
    assert tree(runs) == before

    assert resume(folder, quiet=True)["status"] == "finished"
    assert not (folder / MARKER).exists()  # still not finetune's to replace
    result = runner.invoke(app, ["eval", str(folder)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["run", *quick_args(runs, "output.overwrite=true", *FAST)])
    one_paragraph_error(result, "earlier version of finetune")
    assert sorted(p.name for p in runs.iterdir()) == ["quick_cpu"]


# ---------------------------------------------------------------------------------------------
# 3. A crashed overwrite says where the earlier run is; a later success says what it deleted


def _crash(kind: str, monkeypatch) -> type[BaseException]:
    """Make the next run crash as ``kind``; return what it raises."""
    if kind == "bug":
        def broken(*args, **kwargs):
            raise RuntimeError("boom in evaluation")

        monkeypatch.setattr(loop, "evaluate", broken)
        return RuntimeError
    if kind == "user_error":  # a full disk at the first checkpoint
        def full(*args, **kwargs):
            raise SafetensorError(ENOSPC_SAFETENSORS)

        monkeypatch.setattr("safetensors.torch.save_file", full)
        return RunDirError
    send_at_step(monkeypatch, 3, sig=signal.SIGINT, times=2 if kind == "second_ctrl_c" else 1)
    return RunInterrupted if kind == "ctrl_c" else KeyboardInterrupt


@pytest.mark.parametrize("kind", ["bug", "user_error", "ctrl_c", "second_ctrl_c"])
def test_every_failure_of_an_overwrite_says_where_the_earlier_run_is(trained, tmp_path, monkeypatch, kind):
    runs = tmp_path / "runs"
    folder = copy_run(trained, "finished", runs / "quick_cpu")
    expected = _crash(kind, monkeypatch)
    with pytest.raises(expected) as info:
        run(quick(runs, "output.overwrite=true", "seed=5", "output.checkpoint_every_steps=2", *FAST), quiet=True)
    (aside,) = parked_runs(folder)
    said = str(info.value) + "".join(getattr(info.value, "__notes__", []))
    assert f"kept at {aside}" in said, said
    assert f"kept at {aside}" in read_json(folder / "summary.json")["error"]
    assert read_json(aside / "summary.json")["status"] == "finished"  # the earlier run, whole


def test_a_later_success_deletes_the_parked_runs_and_says_which(trained, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    folder = copy_run(trained, "finished", runs / "quick_cpu")
    _crash("ctrl_c", monkeypatch)
    with pytest.raises(RunInterrupted):
        run(quick(runs, "output.overwrite=true", "seed=5", *FAST), quiet=True)
    (first,) = parked_runs(folder)
    monkeypatch.undo()
    _crash("bug", monkeypatch)  # a second attempt fails too: both earlier runs are parked
    with pytest.raises(RuntimeError) as info:
        run(quick(runs, "output.overwrite=true", "seed=6", *FAST), quiet=True)
    parked = parked_runs(folder)
    assert len(parked) == 2 and first in parked
    assert all(str(p) in "".join(info.value.__notes__) for p in parked)
    monkeypatch.undo()

    result = runner.invoke(app, ["run", *quick_args(runs, "output.overwrite=true", "seed=7", *FAST), "-q"])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "deleted the earlier runs that output.overwrite replaced" in output
    assert all(str(p) in output for p in parked)
    assert sorted(p.name for p in runs.iterdir()) == ["quick_cpu"]


def test_resuming_an_overwrite_that_was_interrupted_deletes_the_earlier_run_when_it_finishes(trained, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    folder = copy_run(trained, "finished", runs / "quick_cpu")
    _crash("ctrl_c", monkeypatch)
    with pytest.raises(RunInterrupted):
        run(quick(runs, "output.overwrite=true", "seed=5", *FAST), quiet=True)
    (aside,) = parked_runs(folder)
    monkeypatch.undo()
    result = runner.invoke(app, ["resume", str(folder), "-q"])
    assert result.exit_code == 0, result.output
    assert f"deleted the earlier run that output.overwrite replaced: {aside}" in " ".join(result.output.split())
    assert not aside.exists()


# ---------------------------------------------------------------------------------------------
# 4. Crash safety: fsync before relying on a file; a short metrics.jsonl; leftovers


def test_files_reach_the_disk_before_anything_relies_on_them(tmp_path, monkeypatch):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name the files fsynced")
    events: list[tuple[str, str]] = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", str(dst)))
        return real_rename(src, dst)

    def replace(src, dst):
        events.append(("rename", str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    runs = tmp_path / "runs"
    run(quick(runs, "output.checkpoint_every_steps=3", *FAST), quiet=True)
    monkeypatch.undo()

    folder = str(runs / "quick_cpu")
    published = events.index(("rename", folder))
    synced = [path for kind, path in events[:published] if kind == "fsync"]
    staging = next(p for p in synced if "/.quick_cpu.starting-" in p).split("/.quick_cpu.starting-")[0]
    staged = {Path(p).name for p in synced if p.startswith(staging + "/.quick_cpu.starting-")}
    assert {MARKER, "recipe.yaml", "summary.json", "metrics.jsonl"} <= staged
    assert any(re.fullmatch(r".*/\.quick_cpu\.starting-[^/]+", p) for p in synced)  # the folder itself
    checkpoint = events.index(("rename", f"{folder}/{CHECKPOINT}"))
    assert ("fsync", f"{folder}/metrics.jsonl") in events[published:checkpoint]


def test_resume_keeps_a_metrics_file_shorter_than_its_checkpoint_says(trained, tmp_path):
    folder = copy_run(trained, "interrupted", tmp_path / "runs" / "quick_cpu")
    offset = load_state(folder / CHECKPOINT)["metrics_offset"]
    data = (folder / "metrics.jsonl").read_bytes()[:offset]
    cut = data.rstrip(b"\n").rfind(b"\n") + 1  # the last line before the checkpoint is lost ...
    (folder / "metrics.jsonl").write_bytes(data[: cut + 7])  # ... and half of it reached the disk
    result = runner.invoke(app, ["resume", str(folder), "-q"])
    assert result.exit_code == 0, result.output
    assert "is shorter" in result.output and "the run continues" in " ".join(result.output.split())
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in lines if row["kind"] == "step"]
    assert steps == sorted(steps) and steps[-1] == 14  # complete lines only, then the rest of the run
    assert read_json(folder / "summary.json")["status"] == "finished"


def test_resume_cleans_every_leftover_of_an_unfinished_write(trained, tmp_path):
    folder = copy_run(trained, "interrupted", tmp_path / "runs" / "quick_cpu")
    best = tree(folder / "best")
    os.rename(folder / "best", folder / ".best.old.cafef00d")  # killed between _swap_in's two renames
    shutil.copytree(folder / ".best.old.cafef00d", folder / ".best.cafef00d")
    (folder / ".adapter.0badf00d").mkdir()
    (folder / ".adapter.0badf00d" / "adapter_model.safetensors").write_bytes(b"half")
    for name in (".summary.json.123-deadbeef.tmp", ".recipe.yaml.9-0badf00d.tmp"):
        (folder / name).write_text("half")
    (folder / "checkpoints" / ".last.safetensors.77-abcdef01.tmp").write_bytes(b"half")
    RunDir.reopen(folder).close()
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == [".finetune-run", ".lock"]
    assert list((folder / "checkpoints").iterdir()) == [folder / CHECKPOINT]
    assert tree(folder / "best") == best  # the earlier best/ went back in place
    assert resume(folder, quiet=True)["status"] == "finished"


# ---------------------------------------------------------------------------------------------
# 5. Checkpoint integrity


def test_a_flipped_bit_in_the_checkpoint_is_refused_by_name_and_old_checkpoints_still_resume(trained, tmp_path):
    folder = copy_run(trained, "interrupted", tmp_path / "runs" / "quick_cpu")
    path = folder / CHECKPOINT
    good = path.read_bytes()
    damaged = bytearray(good)
    damaged[-3] ^= 0x10  # one bit of the last tensor's data
    path.write_bytes(bytes(damaged))
    result = runner.invoke(app, ["resume", str(folder)])
    one_paragraph_error(result, f"{path} is damaged", "SHA-256")
    assert run_status(folder) == "interrupted"  # nothing written

    # A checkpoint written before the checksum existed: read unchecked, as before.
    path.write_bytes(good)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del metadata["finetune_sha256"]
    save_file(tensors, str(path), metadata=metadata)
    assert resume(folder, quiet=True)["status"] == "finished"


# ---------------------------------------------------------------------------------------------
# 6. Every write failure is the run's message


def _fail_writes(writer: str, monkeypatch) -> None:
    """Make ``writer`` fail as it does on a full disk."""
    import matplotlib.figure
    import PIL.Image
    import safetensors.torch

    real = safetensors.torch.save_file
    calls = []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if (writer == "checkpoint" and len(calls) == 2) or (writer == "model" and "model.safetensors" in filename):
            raise SafetensorError(ENOSPC_SAFETENSORS)
        return real(tensors, filename, metadata=metadata)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if writer in ("checkpoint", "model"):
        monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    elif writer == "pil":
        monkeypatch.setattr(PIL.Image.Image, "save", full)
    else:
        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)


@pytest.mark.parametrize("writer", ["checkpoint", "model", "pil", "matplotlib"])
def test_a_full_disk_in_any_writer_is_the_runs_message(tmp_path, monkeypatch, writer):
    runs = tmp_path / "runs"
    _fail_writes(writer, monkeypatch)
    plots = "output.plots=true" if writer in ("pil", "matplotlib") else "output.plots=false"
    result = runner.invoke(app, ["run", *quick_args(runs, "output.checkpoint_every_steps=3", plots), "-q"])
    message = one_paragraph_error(result, "Could not", "No space left on device", "is intact", "finetune resume")
    assert ("checkpoint" in message) if writer == "checkpoint" else ("model" in message or "pictures" in message)
    folder = runs / "quick_cpu"
    assert read_json(folder / "summary.json")["status"] == "failed"
    assert not [p for p in folder.rglob(".*.tmp")]  # no partial file left
    monkeypatch.undo()
    assert resume(folder, quiet=True)["status"] == "finished"


# ---------------------------------------------------------------------------------------------
# 7, 8. Resume with summary.json or checkpoints/ gone


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_resume_without_a_readable_summary_rebuilds_it(trained, tmp_path, damage):
    folder = copy_run(trained, "interrupted", tmp_path / "runs" / "quick_cpu")
    if damage == "missing":
        (folder / "summary.json").unlink()
    else:
        (folder / "summary.json").write_text('{"name": "quick_cpu", "stat')
    result = runner.invoke(app, ["resume", str(folder)])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert "summary.json was missing or unreadable; it was rebuilt" in " ".join(result.output.split())
    summary = read_json(folder / "summary.json")
    assert summary["name"] == "interrupted" and summary["status"] == "finished"
    assert summary["steps"] == 14 and summary["train_images"] == 224


@pytest.mark.parametrize("deleted", ["checkpoints", "last.safetensors"])
def test_resume_after_checkpoints_were_deleted_says_so(trained, tmp_path, deleted):
    folder = copy_run(trained, "interrupted", tmp_path / "runs" / "quick_cpu")
    if deleted == "checkpoints":
        shutil.rmtree(folder / "checkpoints")
        missing = f"{folder / 'checkpoints'}/ is missing"
    else:
        (folder / CHECKPOINT).unlink()
        missing = f"{folder / CHECKPOINT} is missing"
    result = runner.invoke(app, ["resume", str(folder)])
    message = one_paragraph_error(result, "had checkpoints", missing, "deleted or moved", "output.overwrite=true")
    assert "before its first checkpoint" not in message


# ---------------------------------------------------------------------------------------------
# 9. Shipped recipes


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_no_shipped_recipe_overwrites_an_earlier_run(path):
    text = path.read_text()
    settings = re.sub(r"#.*", "", text)  # comments may say how to replace a run; values may not
    assert not re.search(r"overwrite\s*[:=]\s*true", settings, re.IGNORECASE), path.name
    doc = yaml.safe_load(text)
    if "variants" not in doc:  # a recipe, not an experiment file
        assert load_recipe(path).output.overwrite is False
