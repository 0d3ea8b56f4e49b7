"""Several processes (torchrun, gloo, on the CPU): the same recipe trains the same way whatever the
number of processes, evaluation sums exactly, rank 0 alone writes, a dead rank ends the run, and
a run resumes with the same or another number of processes.

Each test starts real processes through ``torch.distributed.run``; they run one thread each
(torchrun's default), like this test process (conftest).
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
from safetensors.torch import load_file

from conftest import REPO_ROOT
from finetune.recipe import load_recipe
from finetune.runs.folder import CHECKPOINT, run_status
from finetune.snapshot import load_state
from finetune.runs.run import resume, run

QUICK = REPO_ROOT / "recipes" / "quick_cpu.yaml"
ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
# 256 synthetic images less 32 held out for validation, global batch 32 (16 + 16 between two
# processes): 7 micro-batches per epoch, 2 per optimizer step (the DDP all-reduce waits for the
# second, no_sync), so 4 steps per epoch. Pad-and-crop and flips on, an EMA, checkpoints every 3 steps.
ARGS = ("train.epochs=2", "data.val_split=32", "train.log_every=1", "output.plots=false", "train.grad_accum=2",
        "train.ema=true", "train.ema_decay=0.9", "output.checkpoint_every_steps=3",
        "data.augment.hflip=true", "data.augment.crop_padding=4")


def torchrun(*args: str, nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc-per-node=N ARGS`` (a script or -m)."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--local-addr=127.0.0.1",
         f"--nproc-per-node={nproc}", *args],
        env=ENV, capture_output=True, text=True, timeout=timeout,
    )


def finetune_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finetune", *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def metrics(folder: Path) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("time_s", "images_per_s")} for r in rows]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The recipe trained in this process: the reference for every multi-process run."""
    out = tmp_path_factory.mktemp("one")
    run(load_recipe(QUICK, [f"output.dir={out}", "name=one", *ARGS]), quiet=True)
    return out / "one"


def close_metrics(a: list[dict], b: list[dict], tol: float = 1e-5) -> None:
    assert [(r["kind"], r["epoch"], r["step"]) for r in a] == [(r["kind"], r["epoch"], r["step"]) for r in b]
    for ra, rb in zip(a, b):
        for key, value in ra.items():
            if isinstance(value, float):
                assert value == pytest.approx(rb[key], abs=tol), (ra["step"], key)
            elif key != "per_class_acc":
                assert value == rb[key], (ra["step"], key)


# ---------------------------------------------------------------------------------------------


def test_two_processes_train_like_one(tmp_path, one_process):
    result = finetune_cli("run", str(QUICK), f"output.dir={tmp_path}", "name=two", *ARGS, "--nproc", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    two = tmp_path / "two"
    # Same global batches, same augmentation per image, gradients averaged by DDP: the same
    # weights up to the order of float sums.
    assert max_difference(weights(two), weights(one_process)) < 1e-5
    close_metrics(metrics(two), metrics(one_process))
    summary = json.loads((two / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 8
    assert summary["train_images"] == 224 and summary["val_images"] == 32
    # Rank 0 alone wrote and printed: one "done" line, the usual files and nothing else.
    assert result.stdout.count("done two:") == 1
    assert sorted(p.name for p in two.iterdir()) == [
        ".finetune-run", ".lock", "README.md", "best", "checkpoints", "config.json", "metrics.jsonl",
        "model.safetensors", "recipe.yaml", "summary.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two"]


def test_a_global_batch_that_does_not_divide_is_a_clear_error(tmp_path):
    result = finetune_cli("run", str(QUICK), f"output.dir={tmp_path}", "data.batch_size=33", "--nproc", "2")
    assert result.returncode == 1
    assert "data.batch_size is 33, which does not divide among 2 processes" in " ".join(result.stderr.split())
    assert not (tmp_path / "quick_cpu").exists() or run_status(tmp_path / "quick_cpu") != "running"


EVAL_SCRIPT = textwrap.dedent('''
    import json, sys, torch
    from finetune.data.loader import BatchLoader
    from finetune.data.splits import ImageTensors, shard
    from finetune.training.distributed import from_environment, shutdown
    from finetune.training.evaluate import evaluate
    from finetune.models.build import create_model

    processes = from_environment(60, "cpu")
    torch.manual_seed(0)
    model = create_model("vit_tiny_test", num_classes=10)
    gen = torch.Generator().manual_seed(1)
    split = ImageTensors(torch.randint(0, 256, (37, 3, 32, 32), dtype=torch.uint8, generator=gen),
                         torch.randint(0, 10, (37,), generator=gen))
    part = shard(split, processes.rank, processes.world_size)
    loader = BatchLoader(part, batch_size=8, train=False, device=torch.device("cpu"), out_size=(32, 32),
                         mean=(0.5,) * 3, std=(0.5,) * 3)
    result = evaluate(model, loader, 10, processes=processes)
    if processes.is_main:
        json.dump(result.to_dict() | {"part": len(part)}, open(sys.argv[1], "w"))
    processes.barrier()
    shutdown(processes)
''')


def test_sharded_evaluation_equals_one_process_on_an_odd_sized_set(tmp_path):
    script, out = tmp_path / "evaluate_sharded.py", tmp_path / "result.json"
    script.write_text(EVAL_SCRIPT)
    result = torchrun(str(script), str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = json.loads(out.read_text())
    assert sharded["part"] == 18  # rank 0 scored 18 images, rank 1 the other 19: none twice

    from finetune.data.loader import BatchLoader
    from finetune.data.splits import ImageTensors
    from finetune.training.evaluate import evaluate
    from finetune.models.build import create_model

    torch.manual_seed(0)
    model = create_model("vit_tiny_test", num_classes=10)
    gen = torch.Generator().manual_seed(1)
    split = ImageTensors(torch.randint(0, 256, (37, 3, 32, 32), dtype=torch.uint8, generator=gen),
                         torch.randint(0, 10, (37,), generator=gen))
    loader = BatchLoader(split, batch_size=8, train=False, device=torch.device("cpu"), out_size=(32, 32),
                         mean=(0.5,) * 3, std=(0.5,) * 3)
    single = evaluate(model, loader, 10).to_dict()
    assert sharded["images"] == single["images"] == 37
    assert sharded["confusion"] == single["confusion"]
    assert (sharded["acc1"], sharded["acc5"], sharded["per_class_acc"]) == (single["acc1"], single["acc5"], single["per_class_acc"])
    # Not bit-equal by construction: the ranks see batches of 8, 8, 2 and 8, 8, 3 where one process
    # sees 8, 8, 8, 8, 5, and a matmul over another batch shape may round differently (an AMD EPYC
    # gave a relative difference of 5.6e-9). fp32 carries about 7 digits: allow 1e-6.
    assert sharded["loss"] == pytest.approx(single["loss"], rel=1e-6)


# A training script for torchrun whose rank `who` SIGKILLs itself right after its `n`-th checkpoint
# (rank 0 has written it by then; another rank has only taken part).
KILLER = textwrap.dedent('''
    import os, signal, sys
    import finetune.runs.recorder as recorder
    from finetune.recipe import load_recipe
    from finetune.runs.run import run

    who, n = int(sys.argv[1]), int(sys.argv[2])
    seen = []
    real = recorder.RunRecorder.checkpoint

    def checkpoint(self, state):
        real(self, state)
        seen.append(state.progress.step)
        if state.processes.rank == who and len(seen) == n:
            os.kill(os.getpid(), signal.SIGKILL)

    recorder.RunRecorder.checkpoint = checkpoint
    run(load_recipe(sys.argv[3], sys.argv[4:]), quiet=True)
''')


# The same killer for `finetune run --nproc N`, whose processes run `python -m finetune`: Python
# imports sitecustomize at start-up, in the processes torchrun starts (RANK is set) only.
KILLER_SITE = textwrap.dedent('''
    import os
    if os.environ.get("RANK") is not None and os.environ.get("KILL_RANK_AT"):
        import signal
        import finetune.runs.recorder as recorder

        who, n = (int(v) for v in os.environ["KILL_RANK_AT"].split(","))
        seen = []
        real = recorder.RunRecorder.checkpoint

        def checkpoint(self, state):
            real(self, state)
            seen.append(state.progress.step)
            if state.processes.rank == who and len(seen) == n:
                os.kill(os.getpid(), signal.SIGKILL)

        recorder.RunRecorder.checkpoint = checkpoint
''')


def test_a_dead_rank_ends_the_run_with_an_error_not_a_hang(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(KILLER_SITE)
    env = {**ENV, "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{REPO_ROOT}", "KILL_RANK_AT": "1,1"}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "finetune", "run", str(QUICK), f"output.dir={tmp_path}", *ARGS, "train.dist_timeout=30",
         "--nproc", "2"], env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    assert time.monotonic() - started < 120  # bounded: well within dist_timeout plus start-up
    folder = tmp_path / "quick_cpu"
    assert run_status(folder) in ("failed", "interrupted")  # never "running" with nobody behind it
    assert load_state(folder / CHECKPOINT)["progress"]["step"] == 3  # the checkpoint before the death
    # No gloo traceback from the process that survived, no ChildFailedError report from torchrun:
    # a paragraph from each, saying what happened and how to resume.
    output = result.stdout + result.stderr
    assert "Traceback" not in output and "ChildFailedError" not in output, output[-4000:]
    text = " ".join(result.stderr.split())
    assert "error: Process 1 of the 2-process run was killed by SIGKILL" in text, text[-3000:]
    assert f"finetune resume {folder} --nproc 2" in text


def test_a_killed_two_process_run_resumes_with_two_or_one_process(tmp_path):
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    # Rank 0 dies right after writing its 3rd checkpoint: step 6, half-way through epoch 2.
    result = torchrun(str(script), "0", "3", str(QUICK), f"output.dir={tmp_path}", "name=killed", *ARGS)
    assert result.returncode != 0
    killed = tmp_path / "killed"
    progress = load_state(killed / CHECKPOINT)["progress"]
    assert (progress["epoch"], progress["batch"], progress["step"]) == (2, 4, 6)
    twin = tmp_path / "killed_twin"
    import shutil

    shutil.copytree(killed, twin)
    (twin / ".lock").unlink()

    straight = finetune_cli("run", str(QUICK), f"output.dir={tmp_path}", "name=straight", *ARGS, "--nproc", "2")
    assert straight.returncode == 0, straight.stderr[-3000:]
    again = finetune_cli("resume", str(killed), "--nproc", "2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert max_difference(weights(killed), weights(tmp_path / "straight")) < 1e-6
    close_metrics(metrics(killed), metrics(tmp_path / "straight"), tol=1e-6)

    # The same checkpoint continued by one process: the same global batches, so the same run.
    summary = resume(twin, quiet=True)
    assert summary["status"] == "finished" and summary["resumed"][-1]["processes"] == 1
    assert max_difference(weights(twin), weights(tmp_path / "straight")) < 1e-5
    close_metrics(metrics(twin), metrics(tmp_path / "straight"))


def test_sigterm_to_torchrun_stops_every_process_with_a_checkpoint(tmp_path):
    args = [sys.executable, "-m", "finetune", "run", str(QUICK), f"output.dir={tmp_path}", "train.epochs=200",
            "output.plots=false", "train.log_every=2", "--nproc", "2"]
    child = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    folder = tmp_path / "quick_cpu"
    deadline = time.monotonic() + 120
    while not (folder / CHECKPOINT).exists() and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGINT)  # Ctrl-C in the terminal: every process of the group
    out, err = child.communicate(timeout=120)
    assert child.returncode == 130, err[-3000:]
    assert "finetune resume" in err
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    step = load_state(folder / CHECKPOINT)["progress"]["step"]
    assert step % 2 == 0 and step > 0  # saved where the processes agreed: at a log line


def test_compare_runs_each_variant_in_several_processes(tmp_path, one_process):
    import yaml

    experiment = tmp_path / "exp.yaml"
    experiment.write_text(yaml.safe_dump({
        "name": "exp", "base": str(QUICK), "overrides": [f"output.dir={tmp_path}", *ARGS],
        "variants": {"one": {}, "bigger_lr": {"optim.lr": 3e-3}},
    }))
    result = finetune_cli("compare", str(experiment), "--nproc", "2", "-q")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| one | " in result.stdout and "| bigger_lr | " in result.stdout and "| Status |" not in result.stdout
    # The variant equal to the reference recipe trained like it, in two processes.
    assert max_difference(weights(tmp_path / "exp" / "one"), weights(one_process)) < 1e-5


def test_lora_and_bitfit_train_the_same_in_two_processes(tmp_path):
    from finetune import create_model, save_model

    torch.manual_seed(0)
    toy = save_model(create_model("vit_tiny_test", num_classes=10), tmp_path / "toy")
    for mode in ("lora", "bitfit"):
        args = [str(QUICK), f"output.dir={tmp_path}", f"train.mode={mode}", f"model.source={toy}", "model.arch=null",
                "train.epochs=1", "output.plots=false", "optim.lr=3e-3", "train.grad_accum=2"]
        run(load_recipe(QUICK, args[1:] + [f"name={mode}_one"]), quiet=True)
        result = finetune_cli("run", *args, f"name={mode}_two", "--nproc", "2")
        assert result.returncode == 0, result.stderr[-3000:]
        assert max_difference(weights(tmp_path / f"{mode}_two"), weights(tmp_path / f"{mode}_one")) < 1e-5, mode
