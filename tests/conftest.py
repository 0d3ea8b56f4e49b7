"""Shared fixtures: checkpoints in the exact on-disk layouts users meet, built from small models.

No fixture touches the network. The hub fixture writes a Hugging Face cache folder the way the
hub client does (``models--timm--NAME/{refs/main, blobs/<sha256>, snapshots/<rev>/<file> -> blob}``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import finetune.models.presets  # noqa: F401  (registers the from-scratch presets with timm)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
HUB_REPO = "timm/deit_tiny_patch16_224.fb_in1k"
HUB_REVISION = "3c5c1a1a9d9e4f2b8c0d7e6f5a4b3c2d1e0f9a8b"

# config.json as timm publishes it for timm/deit_tiny_patch16_224.fb_in1k
DEIT_TINY_CONFIG = {
    "architecture": "deit_tiny_patch16_224",
    "num_classes": 1000,
    "num_features": 192,
    "global_pool": "token",
    "pretrained_cfg": {
        "tag": "fb_in1k",
        "custom_load": False,
        "input_size": [3, 224, 224],
        "fixed_input_size": True,
        "interpolation": "bicubic",
        "crop_pct": 0.875,
        "crop_mode": "center",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "num_classes": 1000,
        "pool_size": None,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    },
}


@pytest.fixture(autouse=True)
def decode_cache_in_tmp(tmp_path_factory, monkeypatch):
    """Tests never write into the user's ~/.cache: each gets its own decode cache folder."""
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path_factory.mktemp("finetune-cache")))


@pytest.fixture(scope="session", autouse=True)
def one_cpu_thread():
    """Run the suite on one CPU thread: its models are tiny and gain nothing from more, and they
    lose several-fold when the cores are shared and threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def send_at_step(monkeypatch, step: int, *, sig: int = signal.SIGTERM, times: int = 1, run: str | None = None) -> None:
    """Send ``sig`` to this process right after optimizer step ``step`` (of the run named ``run``,
    when given), as `kill PID` or Ctrl-C would."""
    import finetune.training.loop as loop

    real = loop._optimizer_step

    def step_then_signal(state):
        real(state)
        if state.progress.step == step and run in (None, state.recipe.name):
            for _ in range(times):
                os.kill(os.getpid(), sig)

    monkeypatch.setattr(loop, "_optimizer_step", step_then_signal)


def random_state_dict(arch: str, seed: int = 0, **kwargs) -> dict[str, torch.Tensor]:
    """A full-size state dict of ``arch`` with random (not default-init) values."""
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)  # distinct from any init, so "equals the checkpoint" means loaded
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def deit_tiny_sd() -> dict[str, torch.Tensor]:
    return random_state_dict("deit_tiny_patch16_224", seed=1)


@pytest.fixture(scope="session")
def deit_tiny_distilled_sd() -> dict[str, torch.Tensor]:
    return random_state_dict("deit_tiny_distilled_patch16_224", seed=2)


def _write_blob(repo_dir: Path, snapshot: Path, name: str, data: bytes) -> None:
    digest = hashlib.sha256(data).hexdigest()
    blob = repo_dir / "blobs" / digest
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = snapshot / name
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(blob, link.parent), link)


def write_hub_cache(cache: Path, repo_id: str, config: dict, state_dict: dict[str, torch.Tensor]) -> Path:
    """Write a hub cache entry for ``repo_id``; return the snapshot folder."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / HUB_REVISION
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(HUB_REVISION)
    _write_blob(repo_dir, snapshot, "config.json", json.dumps(config, indent=2).encode())
    tmp = cache / "tmp.safetensors"
    save_file(state_dict, str(tmp), metadata={"format": "pt"})
    _write_blob(repo_dir, snapshot, "model.safetensors", tmp.read_bytes())
    tmp.unlink()
    return snapshot


@pytest.fixture
def hub_cache(tmp_path_factory, deit_tiny_sd, monkeypatch) -> Path:
    """An offline hub cache holding timm/deit_tiny_patch16_224.fb_in1k; HF_HUB_CACHE points at it."""
    from huggingface_hub import constants

    cache = tmp_path_factory.mktemp("hf_cache")
    write_hub_cache(cache, HUB_REPO, DEIT_TINY_CONFIG, deit_tiny_sd)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if anything tries to reach the hub; point the hub at a closed local port."""
    import finetune.models.sources as ckpt

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")

    def _refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(ckpt, "_download_hub", _refuse)


@pytest.fixture
def deit_release_pth(tmp_path, deit_tiny_sd) -> Path:
    """The original DeiT release format: {"model": state_dict}, named as released."""
    path = tmp_path / "deit_tiny_patch16_224-a1311bcf.pth"
    torch.save({"model": deit_tiny_sd}, path)
    return path


@pytest.fixture
def distilled_pth(tmp_path, deit_tiny_distilled_sd) -> Path:
    path = tmp_path / "deit_tiny_distilled_patch16_224-b40b3cf7.pth"
    torch.save({"model": deit_tiny_distilled_sd}, path)
    return path


@pytest.fixture
def timm_train_checkpoint(tmp_path, deit_tiny_sd) -> Path:
    """What timm's train.py saves: arch, args (argparse.Namespace), state_dict, state_dict_ema."""
    ema = {k: v + 1.0 if v.is_floating_point() else v for k, v in deit_tiny_sd.items()}
    path = tmp_path / "checkpoint-7.pth.tar"
    torch.save(
        {
            "epoch": 7,
            "arch": "deit_tiny_patch16_224",
            "state_dict": deit_tiny_sd,
            "state_dict_ema": ema,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.001}]},
            "version": 2,
            "args": argparse.Namespace(model="deit_tiny_patch16_224", lr=0.001),
            "metric": 71.2,
        },
        path,
    )
    return path


@pytest.fixture
def safetensors_file(tmp_path, deit_tiny_sd) -> Path:
    path = tmp_path / "weights.safetensors"
    save_file(deit_tiny_sd, str(path), metadata={"format": "pt"})
    return path
