"""Model cards and ``finetune push``, offline.

Two quick runs (``recipes/quick_cpu.yaml``): one without a validation split (its final model is
what it publishes) and one with (its ``best/`` model, selected on validation). The cards are parsed
with ``huggingface_hub.ModelCard`` and their metadata checked locally (``card.validate()`` posts to
the hub); timm loads the folders they describe. ``push`` runs up to the network boundary: the hub
client's ``create_repo``, ``create_branch`` and ``upload_folder`` are replaced by a fake that
records what it receives and files the upload the way the hub cache holds a download, so that
``timm.create_model("hf-hub:...")`` loads what was pushed. The endpoint probe talks to a local
socket; no test reaches the network.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import ModelCard, ModelCardData, RepoUrl, constants
from huggingface_hub.repocard_data import model_index_to_eval_results
from huggingface_hub.utils import filter_repo_objects
from typer.testing import CliRunner

from conftest import REPO_ROOT, send_at_step
from finetune import load_model
from finetune.cli import app
from finetune.errors import RunInterrupted
from finetune.recipe import load_recipe
from finetune.runs.run import resume, run

QUICK = REPO_ROOT / "recipes" / "quick_cpu.yaml"
RUNNER = CliRunner()
SENT = ["README.md", "config.json", "model.safetensors"]
REVISION = "0123456789abcdef0123456789abcdef01234567"


def invoke(*args):
    return RUNNER.invoke(app, [str(a) for a in args])


def quick(out: Path, name: str, *overrides: str):
    return load_recipe(QUICK, [f"output.dir={out}", f"name={name}", "output.plots=false", *overrides])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """``final``: no validation split, 1 epoch; ``val``: 2 epochs, 64 images held out."""
    out = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        run(quick(out, "final"), quiet=True)
        run(quick(out, "val", "train.epochs=2", "data.val_split=64"), quiet=True)
    return out


def summary_of(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def headline(text: str) -> re.Match:
    found = re.search(r"\*\*Test top-1 accuracy: ([0-9.]+)%\*\* \(([^;]+);", text)
    assert found, text[:2000]
    return found


def listing(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


# ---------------------------------------------------------------------------------------------
# The card


@pytest.mark.parametrize("name, sub, key, how", [
    ("final", "", "final_acc1", "final epoch, no selection"),
    ("val", "best", "best_test_acc1", "selected on validation"),
])
def test_card_parses_validates_and_states_the_selected_figure(runs, name, sub, key, how):
    run_dir = runs / name
    folder = run_dir / sub
    summary = summary_of(run_dir)
    card = ModelCard.load(folder / "README.md")
    data = card.data
    assert isinstance(data, ModelCardData)
    assert data.library_name == "timm" and data.pipeline_tag == "image-classification"
    assert data.tags == ["image-classification", "timm", "finetune", "vit_tiny_test"]
    assert data.metrics == ["accuracy"]
    # The metadata validates as the hub client reads it: a round trip and the model-index parser.
    again = ModelCardData(**data.to_dict())
    assert again.to_dict() == data.to_dict()
    model_name, results = model_index_to_eval_results(data.to_dict()["model-index"])
    assert model_name == name and len(results) == 1
    (result,) = results
    assert (result.task_type, result.metric_type, result.dataset_split) == ("image-classification", "accuracy", "test")
    assert result.metric_value == pytest.approx(summary[key]) and how in result.metric_name

    figure, said = headline(card.text).groups()
    assert float(figure) == pytest.approx(100 * summary[key], abs=0.005) and said == how
    assert card.text.count("**Test top-1") == 1  # one headline; the test-selected peak is never shown
    assert "peak" not in card.text.lower()
    recipe = (run_dir / "recipe.yaml").read_text()
    assert f"```yaml\n{recipe.rstrip()}\n```" in card.text
    assert "CPU figures" in card.text and "trained from scratch" in card.text
    assert 'timm.create_model("hf-hub:REPO_ID", pretrained=True)' in card.text


def test_a_run_with_validation_has_two_honest_cards(runs):
    summary = summary_of(runs / "val")
    assert summary["selection"] == "val" and summary["best_epoch"] in (1, 2)
    final = ModelCard.load(runs / "val" / "README.md")
    figure, said = headline(final.text).groups()
    assert float(figure) == pytest.approx(100 * summary["final_acc1"], abs=0.005)
    assert said == "final epoch, no selection" and "is in `best/`" in final.text
    best = ModelCard.load(runs / "val" / "best" / "README.md")
    assert f"model of epoch {summary['best_epoch']}, selected on validation" in best.text
    assert f"{100 * summary['best_val_acc1']:.2f}%" in best.text  # the validation figure it was chosen on
    assert not (runs / "final" / "best").exists()


@pytest.mark.parametrize("name, sub", [("final", ""), ("val", "best")])
def test_timm_loads_the_folder_the_card_describes(runs, name, sub):
    folder = runs / name / sub
    by_timm = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    ours = load_model(folder).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(by_timm(x), ours(x))
    assert by_timm.pretrained_cfg["label_names"] == summary_of(runs / name)["classes"]
    assert timm.data.resolve_data_config(model=by_timm)["mean"] == [0.5, 0.5, 0.5]  # the recipe's data.mean


def test_resume_writes_the_card_when_the_run_finishes(tmp_path, monkeypatch):
    recipe = quick(tmp_path, "stopped")
    send_at_step(monkeypatch, 3)
    with pytest.raises(RunInterrupted):
        run(recipe, quiet=True)
    folder = tmp_path / "stopped"
    assert not (folder / "README.md").exists()  # an unfinished run has no card
    monkeypatch.undo()
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    summary = resume(folder, quiet=True)
    card = ModelCard.load(folder / "README.md")
    assert float(headline(card.text)[1]) == pytest.approx(100 * summary["final_acc1"], abs=0.005)
    assert "Resumed 1 time(s)" in card.text
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------
# push, up to the network boundary


class FakeHub:
    """Stands in for the hub: records the calls and files each upload as a hub cache snapshot."""

    def __init__(self, cache: Path):
        self.cache = cache
        self.calls: list[tuple[str, tuple, dict]] = []
        self.sent: list[str] = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", (repo_id,), kwargs))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", (repo_id,), kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", (), kwargs))
        folder = Path(kwargs["folder_path"])
        files = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
        self.sent = sorted(filter_repo_objects(files, allow_patterns=kwargs["allow_patterns"]))
        repo = self.cache / f"models--{kwargs['repo_id'].replace('/', '--')}"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(REVISION)
        (repo / "snapshots" / REVISION).mkdir(parents=True, exist_ok=True)
        for name in self.sent:
            shutil.copyfile(folder / name, repo / "snapshots" / REVISION / name)
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/{REVISION}"})()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fake hub behind a local endpoint that answers the probe, and a token in HF_TOKEN."""
    import huggingface_hub

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
                "HF_HUB_OFFLINE", "HF_OIDC_RESOURCE", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    fake = FakeHub(tmp_path / "hub-cache")
    for name in ("create_repo", "create_branch", "upload_folder"):
        monkeypatch.setattr(huggingface_hub, name, getattr(fake, name))
    yield fake
    server.close()


@pytest.fixture
def copy_of(runs, tmp_path):
    """A private copy of a run folder, for tests that change it."""
    def make(name: str) -> Path:
        return Path(shutil.copytree(runs / name, tmp_path / "copies" / name, symlinks=True))
    return make


def test_push_sends_the_selected_model_and_timm_loads_it_from_the_hub(runs, hub, monkeypatch):
    before = listing(runs / "val")
    result = invoke("push", runs / "val", "me/quick-val", "--private", "--revision", "v1")
    assert result.exit_code == 0, result.output
    assert "the model selected on validation" in result.stdout and f"commit/{REVISION}" in result.stdout
    names = [c[0] for c in hub.calls]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    assert hub.calls[0][1:] == (("me/quick-val",), {"token": "hf_test_token", "private": True, "exist_ok": True})
    assert hub.calls[1][1:] == (("me/quick-val",), {"branch": "v1", "token": "hf_test_token", "exist_ok": True})
    upload = hub.calls[2][2]
    # The files went up from a staging folder (the card with the real repository id), not the run's.
    assert Path(upload["folder_path"]) != runs / "val" / "best" and not Path(upload["folder_path"]).exists()
    assert upload["repo_id"] == "me/quick-val" and upload["revision"] == "v1" and upload["token"] == "hf_test_token"
    assert sorted(upload["allow_patterns"]) == SENT and hub.sent == SENT
    assert listing(runs / "val") == before  # the run folder is left as it was

    # What went up is what timm reads from the hub (here from the cache the fake filled, offline).
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub.cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    by_timm = timm.create_model("hf-hub:me/quick-val", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(by_timm(x), load_model(runs / "val" / "best").eval()(x))
        assert torch.equal(by_timm(x), load_model("hf-hub:me/quick-val").eval()(x))  # as the card says


def test_push_of_a_run_without_validation_sends_its_final_model_only(runs, hub):
    result = invoke("push", runs / "final", "me/quick")
    assert result.exit_code == 0, result.output
    assert [c[0] for c in hub.calls] == ["create_repo", "upload_folder"]  # no --revision: no branch
    upload = hub.calls[1][2]
    assert upload["revision"] is None
    assert hub.calls[0][2]["private"] is False
    assert hub.sent == SENT  # not summary.json, metrics.jsonl, recipe.yaml, checkpoints/ or .lock
    assert {"summary.json", "metrics.jsonl", ".lock"} <= {p.name for p in (runs / "final").iterdir()}


def pushed_card(hub: FakeHub, repo_id: str):
    return ModelCard.load(hub.cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / REVISION / "README.md")


def test_push_writes_the_card_of_a_run_from_before_cards(copy_of, hub):
    folder = copy_of("final")
    (folder / "README.md").unlink()
    result = invoke("push", folder, "me/older")
    assert result.exit_code == 0, result.output
    card = pushed_card(hub, "me/older")
    assert 'timm.create_model("hf-hub:me/older", pretrained=True)' in card.text and hub.sent == SENT
    assert not (folder / "README.md").exists()  # the run folder is not written to


def test_the_pushed_card_names_the_repository_and_keeps_the_rest(copy_of, hub):
    folder = copy_of("final")
    card = folder / "README.md"
    card.write_text(card.read_text() + "\nA note the user added.\n")
    before = card.read_text()
    assert "hf-hub:REPO_ID" in before and "`REPO_ID` is where" in before
    result = invoke("push", folder, "me/named")
    assert result.exit_code == 0, result.output
    text = pushed_card(hub, "me/named").text
    assert "REPO_ID" not in text and 'timm.create_model("hf-hub:me/named", pretrained=True)' in text
    assert "A note the user added." in text and card.read_text() == before


def assert_refused(result, hub: FakeHub, *phrases: str) -> None:
    """Exit 1, one paragraph naming ``phrases``, no traceback, and nothing sent to the hub."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    text = result.stderr.strip()
    assert text.startswith("error: ") and "\n\n" not in text and "Traceback" not in result.output, text
    for phrase in phrases:
        assert phrase in text, f"{phrase!r} not in {text!r}"
    assert hub.calls == []


def test_offline_is_refused_before_anything_is_sent(runs, hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = listing(runs / "final")
    assert_refused(invoke("push", runs / "final", "me/quick"), hub, "HF_HUB_OFFLINE", "Unset HF_HUB_OFFLINE")
    assert listing(runs / "final") == before


def test_an_unreachable_hub_is_refused_before_anything_is_sent(runs, hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    assert_refused(invoke("push", runs / "final", "me/quick"), hub, "Cannot reach the Hugging Face hub at "
                   "http://127.0.0.1:9", "nothing was sent")


def test_no_token_is_refused_before_anything_is_sent(runs, hub, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert_refused(invoke("push", runs / "final", "me/quick"), hub, "No Hugging Face token", "hf auth login",
                   "HF_TOKEN")


@pytest.mark.parametrize("status, phrases", [
    ("interrupted", ("did not finish (status interrupted)", "finetune resume")),
    ("failed", ("did not finish (status failed)", "finetune resume")),
])
def test_an_unfinished_run_is_refused(copy_of, hub, status, phrases):
    folder = copy_of("final")
    summary = summary_of(folder)
    (folder / "summary.json").write_text(json.dumps(dict(summary, status=status)))
    before = listing(folder)
    assert_refused(invoke("push", folder, "me/quick"), hub, *phrases)
    assert listing(folder) == before


def test_bad_folders_and_ids_are_refused(runs, copy_of, hub, tmp_path):
    assert_refused(invoke("push", tmp_path, "me/quick"), hub, "is not a finetune run folder")
    assert_refused(invoke("push", runs / "final", "not a repo id"), hub, "is not a hub repository id", "user/name")
    folder = copy_of("final")
    os.remove(folder / "model.safetensors")
    assert_refused(invoke("push", folder, "me/quick"), hub, "no model to push", "model.safetensors missing")
    folder = copy_of("val")
    weights = folder / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    assert_refused(invoke("push", folder, "me/quick"), hub, "SHA-256 differs")
    (folder / "best" / "README.md").unlink()
    (folder / "best" / "README.md").symlink_to(folder / "summary.json")
    assert_refused(invoke("push", folder, "me/quick"), hub, "is a link")


@pytest.mark.parametrize("error, phrases", [
    (403, ("refused the push to me/quick", "403 Forbidden", "write access")),
    (401, ("refused the push to me/quick", "hf auth login")),
    (ConnectionResetError(104, "Connection reset by peer"), ("failed on the way", "Connection reset", "one commit")),
])
def test_the_hubs_refusals_and_a_broken_connection_are_messages(runs, hub, monkeypatch, error, phrases):
    from types import SimpleNamespace

    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, int):
        response = SimpleNamespace(status_code=error, headers={}, request=None)
        error = HfHubHTTPError(f"{error} {'Forbidden' if error == 403 else 'Unauthorized'}: no", response=response)

    def refuse(**kwargs):
        hub.calls.append(("upload_folder", (), kwargs))
        raise error

    monkeypatch.setattr(huggingface_hub, "upload_folder", refuse)
    result = invoke("push", runs / "final", "me/quick")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    text = result.stderr.strip()
    assert text.startswith("error: ") and "Traceback" not in result.output
    for phrase in phrases:
        assert phrase in text, f"{phrase!r} not in {text!r}"


def test_card_metadata_of_a_fine_tuned_hub_model():
    """Licence and base model from timm's tables for a timm source (no download); none guessed for a file."""
    from finetune.runs.card import model_card

    summary = {"name": "deit_cifar", "arch": "deit_tiny_patch16_224", "source": "deit_tiny_patch16_224.fb_in1k",
               "mode": "full", "selection": "val", "epochs_done": 3, "best_epoch": 2, "best_val_acc1": 0.9,
               "best_test_acc1": 0.88, "final_acc1": 0.87, "device": "cuda:0", "device_name": "NVIDIA H200",
               "classes": [str(i) for i in range(10)], "train_time_s": 600.0}
    recipe = "name: deit_cifar\ndata:\n  name: cifar10\n"
    card = model_card(summary, recipe, best=True, repo_id="me/deit-cifar")
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0" and data["base_model"] == "timm/deit_tiny_patch16_224.fb_in1k"
    assert data["datasets"] == ["uoft-cs/cifar10"] and "import finetune" not in card.text  # a timm architecture
    assert "on a GPU (NVIDIA H200)" in card.text and "10.0 min of training" in card.text
    assert float(headline(card.text)[1]) == pytest.approx(88.0)
    assert 'timm.create_model("hf-hub:me/deit-cifar", pretrained=True)' in card.text
    mine = model_card(dict(summary, source="/nowhere/weights.safetensors"), recipe).data.to_dict()
    assert "license" not in mine and "base_model" not in mine


def test_a_run_whose_recipe_is_a_link_out_is_never_pushed(copy_of, hub, tmp_path):
    secret = tmp_path / "secret.env"
    secret.write_text("HF_TOKEN=hf_do_not_publish\n")
    folder = copy_of("final")
    (folder / "README.md").unlink()  # the card would be written from recipe.yaml
    (folder / "recipe.yaml").unlink()
    (folder / "recipe.yaml").symlink_to(secret)
    result = invoke("push", folder, "me/leak")
    assert_refused(result, hub, "recipe.yaml is a link that leads out of the run folder", "Nothing was sent")
    assert "hf_do_not_publish" not in result.output
