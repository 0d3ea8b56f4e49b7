"""Issue 26, files we read: no code runs from an exported file, no other file is read through a
link in a run folder, a damaged checkpoint header or summary is a message, and ``predict``,
``eval``, ``export`` and ``report`` refuse what cannot work before any work, in one paragraph.

One quick run is trained and exported (``.pt2`` and ONNX) once per module; crafted copies are made
from them inside each test's tmp_path.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import struct
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
from torchvision.io import write_png
from typer.testing import CliRunner

import torch
from conftest import REPO_ROOT
from test_trust_rundir import one_paragraph_error
from finetune.cli import app
from finetune.errors import CheckpointError, ExportError
from finetune.export import runtime
from finetune.export.exporter import export_run
from finetune.recipe import load_recipe
from finetune.runs.folder import CHECKPOINT, read_summary
from finetune.runs.records import read_run
from finetune.runs.run import run
from finetune.snapshot import load_state

QUICK = REPO_ROOT / "recipes" / "quick_cpu.yaml"
runner = CliRunner()
SECRET = "hunter2-not-for-logs"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """A finished quick run, its ``.pt2`` and ONNX exports, and a photo."""
    root = tmp_path_factory.mktemp("round4")
    run(load_recipe(QUICK, [f"output.dir={root / 'runs'}", "name=done", "output.plots=false"]), quiet=True)
    folder = root / "runs" / "done"
    export_run(folder, "pt2", out=root / "m.pt2")
    export_run(folder, "onnx", out=root / "m.onnx")
    write_png(torch.randint(0, 255, (3, 40, 48), dtype=torch.uint8), str(root / "photo.png"))
    return {"run": folder, "pt2": root / "m.pt2", "onnx": root / "m.onnx", "photo": root / "photo.png"}


def copy_run(built: dict, to: Path, *, unfinished: bool = False) -> Path:
    """A copy of the finished run; ``unfinished``: as if it had been interrupted after its last
    checkpoint (no final model, status ``interrupted``), so that ``resume`` takes it."""
    folder = Path(shutil.copytree(built["run"], to, symlinks=True))
    if unfinished:
        (folder / "config.json").unlink()
        (folder / "model.safetensors").unlink()
        summary = json.loads((folder / "summary.json").read_text())
        summary["status"] = "interrupted"
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


# ---------------------------------------------------------------------------------------------
# 1. No code from an exported file


def rewrite_pt2(src: Path, dst: Path, edit) -> Path:
    """A copy of a ``.pt2`` archive with ``edit(records)`` applied to its records (names without
    the archive's root folder, bytes)."""
    with zipfile.ZipFile(src) as archive:
        names = archive.namelist()
        root = names[0].split("/")[0]
        records = {name[len(root) + 1:]: archive.read(name) for name in names}
    edit(records)
    with zipfile.ZipFile(dst, "w") as archive:
        for name, data in records.items():
            archive.writestr(f"{root}/{name}", data)
    return dst


class Payload:
    """Unpickling it creates the file ``side`` (a harmless stand-in for any code)."""

    def __init__(self, side: Path):
        self.side = str(side)

    def __reduce__(self):
        return open, (self.side, "w")


def edit_json(records: dict, name: str, change) -> None:
    doc = json.loads(records[name])
    change(doc)
    records[name] = json.dumps(doc).encode()


def pickled_weight(records: dict, side: Path) -> None:
    def mark(doc):
        entry = next(iter(doc["config"].values()))
        entry["use_pickle"] = True
        records[f"data/weights/{entry['path_name']}"] = pickle.dumps(Payload(side))

    edit_json(records, "data/weights/model_weights_config.json", mark)


def pickled_constant(records: dict, side: Path) -> None:
    def add(doc):
        doc["config"]["planted"] = {"path_name": "tensor_0", "is_param": False, "use_pickle": True, "tensor_meta": None}

    edit_json(records, "data/constants/model_constants_config.json", add)
    records["data/constants/tensor_0"] = pickle.dumps(Payload(side))


def pickled_sample_inputs(records: dict, side: Path) -> None:
    records["data/sample_inputs/model.pt"] = pickle.dumps(Payload(side))


def guard_code(records: dict, side: Path) -> None:
    edit_json(records, "models/model.json", lambda doc: doc.update(guards_code=[f"open({str(side)!r}, 'w') is None"]))


def symbolic_shape(records: dict, side: Path) -> None:
    text = records["models/model.json"].decode()
    start = text.index('"expr_str": "') + len('"expr_str": "')
    end = text.index('"', start)
    records["models/model.json"] = (text[:start] + f"open('{side}', 'w')" + text[end:]).encode()


def graph_call(records: dict, side: Path) -> None:
    def retarget(doc):
        node = doc["graph_module"]["graph"]["nodes"][0]
        node["target"] = "torch.save"

    edit_json(records, "models/model.json", retarget)


@pytest.mark.parametrize("craft", [pickled_weight, pickled_constant, pickled_sample_inputs, guard_code, symbolic_shape,
                                   graph_call])
def test_a_crafted_pt2_runs_nothing_and_is_refused(built, tmp_path, craft):
    side = tmp_path / "side_effect"
    evil = rewrite_pt2(built["pt2"], tmp_path / "evil.pt2", lambda records: craft(records, side))
    result = runner.invoke(app, ["predict", str(evil), str(built["photo"])])
    assert not side.exists()  # first: loading it on the starting commit ran the payload
    one_paragraph_error(result, f"{evil} cannot be used as a finetune .pt2 export", "Nothing in it was run")
    with pytest.raises(ExportError):
        runtime.load_exported(evil)
    assert not side.exists()


def test_an_unaltered_export_still_loads_and_predicts(built):
    result = runner.invoke(app, ["predict", str(built["pt2"]), str(built["photo"])])
    assert result.exit_code == 0 and "1. class_" in result.output, result.output


def finetune_meta(**fields):
    return lambda records: edit_json(records, "extra/finetune.json", lambda doc: doc.update(fields))


@pytest.mark.parametrize("case, craft, expected", [
    ("empty", None, "it is not a zip archive"),
    ("not a zip", None, "it is not a zip archive"),
    ("truncated", None, "torch cannot read it as an archive"),
    # The export takes uint8 images at the stored size (issue 27): the sizes its metadata names are all 48.
    ("another input size", finetune_meta(input_size=[48, 48], stored_size=[48, 48], graph_size=[48, 48]),
     "takes inputs of shape (batch, 3, 32, 32)"),
    ("3 names for 10 logits", finetune_meta(class_names=["a", "b", "c"]), "names 3 classes"),
    ("20 names for 10 logits", finetune_meta(class_names=[str(i) for i in range(20)]), "names 20 classes"),
    ("a huge stored size", finetune_meta(stored_size=[4097, 4097]), "is not a size from 2 to 4096"),
    ("a 1x1 stored size", finetune_meta(stored_size=[1, 1]), "is not a size from 2 to 4096"),
])
def test_a_damaged_or_inconsistent_pt2_is_refused_before_any_work(built, tmp_path, case, craft, expected):
    path = tmp_path / "model.pt2"
    good = built["pt2"].read_bytes()
    if craft is not None:
        rewrite_pt2(built["pt2"], path, craft)
    else:
        path.write_bytes({"empty": b"", "not a zip": b"hello\n", "truncated": good[: len(good) // 2]}[case])
    result = runner.invoke(app, ["predict", str(path), str(built["photo"])])
    one_paragraph_error(result, str(path), expected)


def test_a_file_named_onnx_that_is_not_onnx_is_named_as_such_first(built, tmp_path, monkeypatch):
    bad = tmp_path / "notonnx.onnx"
    bad.write_text("not a model")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # not installed: the file is still the first problem
    result = runner.invoke(app, ["predict", str(bad), str(built["photo"])])
    message = one_paragraph_error(result, "cannot be read as an ONNX model", "does not start as one")
    assert "pip install" not in message


# ---------------------------------------------------------------------------------------------
# 2. No other file through a link in a run folder


def test_a_linked_recipe_never_reaches_the_output(built, tmp_path):
    secret = tmp_path / "elsewhere" / "notes.yaml"
    secret.parent.mkdir()
    secret.write_text(f"password: {SECRET}\n{SECRET}_key: 1\n")
    unfinished = copy_run(built, tmp_path / "runs" / "unfinished", unfinished=True)
    finished = copy_run(built, tmp_path / "runs" / "finished")
    for folder in (unfinished, finished):
        (folder / "recipe.yaml").unlink()
        (folder / "recipe.yaml").symlink_to(secret)
    outputs = [
        one_paragraph_error(runner.invoke(app, ["resume", str(unfinished)]), "recipe.yaml is a link that leads out"),
        one_paragraph_error(runner.invoke(app, ["eval", str(finished), "--device", "cpu"]), "leads out of the run folder"),
        one_paragraph_error(runner.invoke(app, ["export", str(finished), "--format", "pt2"]), "leads out of the run folder"),
    ]
    report = runner.invoke(app, ["report", str(finished), "--out", str(tmp_path / "report")])
    assert report.exit_code == 0, report.output
    outputs += [report.output, (tmp_path / "report" / "report.md").read_text(), (tmp_path / "report" / "report.csv").read_text()]
    assert not any(SECRET in text or "password" in text for text in outputs), outputs
    assert not (finished / "model.pt2").exists()


def test_a_linked_checkpoints_folder_is_never_resumed_from(built, tmp_path):
    other = copy_run(built, tmp_path / "runs" / "other", unfinished=True)
    folder = copy_run(built, tmp_path / "runs" / "mine", unfinished=True)
    shutil.rmtree(folder / "checkpoints")
    (folder / "checkpoints").symlink_to(other / "checkpoints")
    summary_before = (folder / "summary.json").read_text()
    result = runner.invoke(app, ["resume", str(folder)])
    one_paragraph_error(result, f"{folder / 'checkpoints'} is a link that leads out of the run folder")
    assert (folder / "summary.json").read_text() == summary_before and not (folder / "config.json").exists()


def test_links_that_stay_inside_the_run_folder_are_read(built, tmp_path):
    folder = copy_run(built, tmp_path / "runs" / "inside")
    (folder / "recipe.yaml").rename(folder / "recipe.copy.yaml")
    (folder / "recipe.yaml").symlink_to("recipe.copy.yaml")
    result = runner.invoke(app, ["eval", str(folder), "--device", "cpu"])
    assert result.exit_code == 0 and "top-1" in result.output, result.output


# ---------------------------------------------------------------------------------------------
# 3. A damaged checkpoint header, a deeply nested summary


def flip_in_header(path: Path, text: str, offset: int, bit: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    at = data[8 : 8 + length].index(text.encode()) + offset
    data[8 + at] ^= bit
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("text, offset", [('"finetune_sha256"', 15), ('"format":"pt"', 11)])
def test_a_flipped_bit_in_the_checkpoint_header_is_refused(built, tmp_path, text, offset):
    folder = copy_run(built, tmp_path / "runs" / "flipped", unfinished=True)
    flip_in_header(folder / CHECKPOINT, text, offset)
    with pytest.raises(CheckpointError, match="header"):
        load_state(folder / CHECKPOINT)
    one_paragraph_error(runner.invoke(app, ["resume", str(folder), "-q"]), "is damaged", "header")
    assert not (folder / "config.json").exists()


def test_a_summary_nested_100000_deep_is_read_as_unreadable(built, tmp_path):
    folder = copy_run(built, tmp_path / "runs" / "deep")
    (folder / "summary.json").write_text("[" * 100_000 + "]" * 100_000)
    with (folder / "metrics.jsonl").open("a") as f:
        f.write("{\"a\": " * 100_000 + "1" + "}" * 100_000 + "\n")
    assert read_summary(folder) is None
    record = read_run(folder)
    assert record.status == "failed" and "nested too deeply" in record.error
    result = runner.invoke(app, ["report", str(folder), "--out", str(tmp_path / "report")])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert "1 runs: 1 failed" in (tmp_path / "report" / "report.md").read_text()
    unfinished = copy_run(built, tmp_path / "runs" / "deep_unfinished", unfinished=True)
    (unfinished / "summary.json").write_text("{\"a\": " * 100_000 + "1" + "}" * 100_000)
    result = runner.invoke(app, ["resume", str(unfinished), "-q"])  # the summary is rebuilt from the checkpoint
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert json.loads((unfinished / "summary.json").read_text())["status"] == "finished"


# ---------------------------------------------------------------------------------------------
# 4. predict, eval, export and report refuse what cannot work, before any work


@pytest.mark.parametrize("size", [[1, 1], [4, 4], [5000, 5000], "32"])
def test_an_implausible_stored_size_is_refused_by_predict_and_export(built, tmp_path, size):
    folder = copy_run(built, tmp_path / "runs" / "sized")
    summary = json.loads((folder / "summary.json").read_text())
    summary["stored_size"] = size
    (folder / "summary.json").write_text(json.dumps(summary))
    expected = ("records stored_size", "sides from 8 to 4096")  # 8: the model's patch
    one_paragraph_error(runner.invoke(app, ["predict", str(folder), str(built["photo"]), "--device", "cpu"]), *expected)
    one_paragraph_error(runner.invoke(app, ["export", str(folder), "--format", "pt2"]), *expected)
    assert not (folder / "model.pt2").exists()


def test_a_fifo_photo_is_refused_without_waiting(built, tmp_path):
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)

    def unblock():  # lets a predict that opened the FIFO go on (then it fails later, differently)
        for _ in range(100):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                return
            except OSError:
                time.sleep(0.1)

    threading.Thread(target=unblock, daemon=True).start()
    result = runner.invoke(app, ["predict", str(built["run"]), str(fifo), "--device", "cpu"])
    one_paragraph_error(result, f"{fifo} is not a regular file")


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_a_device_that_does_not_exist_is_a_message(built, command):
    args = [command, str(built["run"]), *([str(built["photo"])] if command == "predict" else []), "--device", "bogus"]
    one_paragraph_error(runner.invoke(app, args), "--device 'bogus' is not a device", "cuda:N")


def test_eval_refuses_an_image_size_outside_the_plausible_range(built):
    for size in ("0", "4", "100000"):  # 4: below the model's 8-pixel patch
        result = runner.invoke(app, ["eval", str(built["run"]), "--image-size", size, "--device", "cpu"])
        one_paragraph_error(result, f"--image-size {size} is outside 8..4096")


def test_export_refuses_a_bad_out_or_opset_before_any_work(built, tmp_path):
    folder = built["run"]
    (tmp_path / "adir").mkdir()
    existing = tmp_path / "m.onnx"
    existing.write_text("keep me")
    cases = [
        (["--out", str(tmp_path / "adir")], "is a folder"),
        (["--out", str(existing)], "exists already", "--overwrite"),
        (["--format", "pt2", "--out", str(tmp_path / "m2.onnx")], "does not end in .pt2", "--format onnx"),
        (["--out", str(tmp_path / "m3.onnx"), "--opset", "999"], "--opset 999 is outside", "18 to"),
        (["--format", "pt2", "--out", str(tmp_path / "m4.pt2"), "--opset", "18"], "applies to ONNX files only"),
    ]
    for args, *expected in cases:
        one_paragraph_error(runner.invoke(app, ["export", str(folder), *args]), *expected)
    assert existing.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "m.onnx"] and not any((tmp_path / "adir").iterdir())


def test_export_replaces_a_file_only_with_overwrite(built, tmp_path):
    out = tmp_path / "m.pt2"
    out.write_text("an earlier export")
    result = runner.invoke(app, ["export", str(built["run"]), "--format", "pt2", "--out", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert runtime.load_exported(out)[1].input_size == (32, 32)


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "notarun").mkdir()
    (tmp_path / "notarun" / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["report", str(tmp_path / "notarun"), "--out", str(tmp_path / "report")])
    one_paragraph_error(result, "is neither a run folder", "nor an experiment folder")
    assert not (tmp_path / "report").exists()


def test_a_full_disk_under_report_out_is_a_message(built, tmp_path, monkeypatch):
    real = Path.write_text

    def full_disk(self, *args, **kwargs):
        if tmp_path in self.parents:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    result = runner.invoke(app, ["report", str(built["run"]), "--out", str(tmp_path / "report")])
    one_paragraph_error(result, f"Could not write the report to {tmp_path / 'report'}", "No space left on device")
    assert not (tmp_path / "report" / "report.md").exists()
