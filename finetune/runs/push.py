"""``finetune push``: a finished run's model uploaded to a Hugging Face hub model repository.

What goes up is the model folder alone: ``config.json`` (timm's layout), ``model.safetensors`` and
the model card ``README.md`` (:mod:`finetune.runs.card`); never checkpoints, metrics, pictures or
the lock. A run that selected its best epoch on validation pushes that model (``best/``); a run
without a validation split pushes its final model. ``timm.create_model("hf-hub:REPO_ID",
pretrained=True)`` then loads it.

Everything is checked before anything is sent: the repository id, that the folder is a finished
run with a model, that the hub is not switched off (``HF_HUB_OFFLINE``), that there is a token,
and that the endpoint answers. The upload itself is ``huggingface_hub``'s: ``create_repo``
(``exist_ok``), ``create_branch`` for ``--revision``, and one ``upload_folder`` commit restricted to
the model's files (``allow_patterns``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import PushError, RunDirError
from ..hub import endpoint_reachable, hub_endpoint, hub_offline_forced
from .card import CARD_NAME, card_for, with_repo_id
from .folder import BEST_DIR, READ_PATHS, check_links, is_run_folder, read_summary, run_status

WEIGHT_FILES = ("config.json", "model.safetensors")
MODEL_FILES = (*WEIGHT_FILES, CARD_NAME)
"""The files of a model folder that are uploaded; nothing else in the folder is."""


@dataclass
class Pushed:
    """What :func:`push_run` sent.

    Attributes:
        folder: the model folder uploaded (the run folder, or its ``best/``).
        which: ``best`` (selected on validation) or ``final``.
        repo_id: the repository, as the hub names it (``user/name``).
        url: the commit, or the repository when the hub gave no commit address.
        files: the files uploaded, by name.
    """

    folder: Path
    which: str
    repo_id: str
    url: str
    files: tuple[str, ...]


def push_run(run_dir: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None) -> Pushed:
    """Upload a finished run's model (its ``best/`` model when it selected one on validation).

    Args:
        run_dir: the run folder (or its ``best/`` folder).
        repo_id: ``user/name`` or ``org/name`` on the hub; created when it does not exist.
        private: create the repository private (an existing one keeps its visibility).
        revision: a branch to commit to, created from ``main`` when it does not exist.

    Raises:
        PushError: a bad repository id, a folder that is not a finished run with a model, the hub
            switched off or out of reach, no token, or the hub refused (a token without write
            access, a name taken by someone else).
    """
    check_repo_id(repo_id)
    folder, which = model_folder(Path(run_dir))
    token = hub_token()
    check_reachable()
    import huggingface_hub as hub

    with tempfile.TemporaryDirectory(prefix="finetune-push-") as tmp:
        # What goes up is staged beside, not written into, the run folder: the card names the real
        # repository (the one written when the run finished says REPO_ID), the weights are links.
        staged = _stage(folder, Path(tmp), repo_id)
        with hub_errors(repo_id):
            repo = hub.create_repo(repo_id, token=token, private=private, exist_ok=True)
            repo_id = getattr(repo, "repo_id", None) or repo_id
            if revision:
                hub.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
            commit = hub.upload_folder(
                repo_id=repo_id, folder_path=str(staged), allow_patterns=list(MODEL_FILES), token=token,
                revision=revision, commit_message=f"Upload {_run_name(folder)} ({which} model) with finetune",
            )
    url = getattr(commit, "commit_url", None) or str(repo)
    return Pushed(folder=folder, which=which, repo_id=repo_id, url=url, files=MODEL_FILES)


def _stage(folder: Path, staging: Path, repo_id: str) -> Path:
    """``staging`` holding the model folder's files to upload: the weights and config hard-linked
    (copied across file systems) and the card with ``repo_id`` in its loading examples."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            try:
                os.link(folder / name, staging / name)
            except OSError:
                shutil.copyfile(folder / name, staging / name)
    card = folder / CARD_NAME
    try:
        text = card.read_text(encoding="utf-8") if card.is_file() else None
    except (OSError, UnicodeDecodeError):
        text = None  # not a card finetune wrote: write one
    if text is None:
        text = str(card_for(folder, repo_id))  # a run from before finetune wrote model cards
    (staging / CARD_NAME).write_text(with_repo_id(text, repo_id), encoding="utf-8")
    return staging


def check_repo_id(repo_id: str) -> None:
    """Refuse, before anything else, a repository id the hub would refuse."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise PushError(f"{repo_id!r} is not a hub repository id: {exc}",
                        "Pass one as user/name or org/name (letters, digits, '-', '_', '.'; at most 96 characters).") from None


def model_folder(path: Path) -> tuple[Path, str]:
    """The model folder of a finished run to push, and which model it holds: ``best/`` when the run
    selected its best epoch on validation, else the run folder itself (``final``).

    Raises:
        PushError: not a run folder, a run that did not finish, or no model files in it.
    """
    run_dir = path.parent if path.name == BEST_DIR and is_run_folder(path.parent) else path
    if not is_run_folder(run_dir):
        raise PushError(f"{path} is not a finetune run folder (no recipe.yaml and summary.json of a run).",
                        "Pass the folder a `finetune run` wrote (output.dir/name, e.g. runs/deit_tiny_cifar).")
    try:  # what is published is the run's own files: a recipe.yaml linked to ~/.env would go up in the card
        check_links(run_dir, (*READ_PATHS, CARD_NAME, f"{BEST_DIR}/{CARD_NAME}"))
    except RunDirError as err:
        raise PushError(err.problem + " Nothing was sent.", err.fix) from None
    status = run_status(run_dir)
    if status != "finished":
        fix = ("Wait for it to finish." if status == "running" else f"Continue it with `finetune resume {run_dir}` "
               "and push it when it has finished." if status in ("interrupted", "failed") else
               "Train it again (finetune run ...), and push the run when it has finished.")
        raise PushError(f"The run {run_dir} did not finish (status {status or 'unknown'}), so it has no final "
                        "results to publish.", fix)
    summary = read_summary(run_dir) or {}
    best = summary.get("selection") == "val" and (run_dir / BEST_DIR / "config.json").is_file()
    folder, which = (run_dir / BEST_DIR, "best") if best else (run_dir, "final")
    check_model_files(folder, run_dir)
    return folder, which


def check_model_files(folder: Path, run_dir: Path) -> None:
    """The weights and config are plain files (so is the card, when there is one), and the weights
    are the ones ``config.json`` records (its SHA-256)."""
    import json

    from ..models.reading import file_sha256

    missing = [name for name in WEIGHT_FILES if not _plain_file(folder / name)]
    if missing:
        raise PushError(
            f"The run {run_dir} has no model to push: {', '.join(missing)} missing (or not a plain file) in {folder}.",
            "Train it with output.save_model=true (the default), then push it.",
        )
    card = folder / CARD_NAME
    if (card.exists() or card.is_symlink()) and not _plain_file(card):
        raise PushError(f"{card} is a link or not a plain file; finetune pushes no file by way of a link.",
                        "Replace it with a plain file (or remove it: push then writes the card), and push again.")
    try:
        recorded = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("weights_sha256")
    except (OSError, ValueError, AttributeError):
        raise PushError(f"{folder / 'config.json'} cannot be read as a model config.",
                        "Train the run again; this folder's model is damaged.") from None
    if recorded and recorded != file_sha256(folder / "model.safetensors"):
        raise PushError(f"{folder / 'model.safetensors'} is not the file its config.json records (SHA-256 differs): "
                        "it was changed or damaged after the run saved it.",
                        "Train the run again, or restore the file; finetune does not publish weights it cannot vouch for.")


def hub_token() -> str:
    """The hub token (``HF_TOKEN``, or the one ``hf auth login`` stored), after checking that the
    hub is not switched off."""
    if hub_offline_forced():
        raise PushError("The Hugging Face hub is switched off on this machine (HF_HUB_OFFLINE=1), so nothing can "
                        "be pushed.", "Unset HF_HUB_OFFLINE (or set it to 0) on a machine with internet, then push again.")
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise PushError("No Hugging Face token: pushing needs one with write access, and neither HF_TOKEN nor a "
                        "stored login gives one.", "Run `hf auth login` (or set HF_TOKEN to a token with write access, "
                        "from https://huggingface.co/settings/tokens), then push again.")
    return token


def check_reachable() -> None:
    """Probe the hub's endpoint in seconds instead of letting an upload wait for minutes."""
    endpoint = hub_endpoint()
    if not endpoint_reachable(endpoint):
        raise PushError(f"Cannot reach the Hugging Face hub at {endpoint} (no network, or a proxy or firewall "
                        "in the way); nothing was sent.", "Push from a machine with internet, or set HTTPS_PROXY "
                        "(or HF_ENDPOINT) to a way out.")


@contextlib.contextmanager
def hub_errors(repo_id: str) -> Iterator[None]:
    """The hub's refusals and network failures during the upload as a :class:`PushError`."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        yield
    except HfHubHTTPError as exc:
        code = getattr(getattr(exc, "response", None), "status_code", None)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        fix = {
            401: "The token was refused: log in again with `hf auth login` (or set HF_TOKEN to a valid token).",
            403: f"The token may not write to {repo_id}: use a token with write access to that user or "
                 "organisation, or push to a repository of your own.",
        }.get(code, "Check the repository id and your access to it, then push again.")
        raise PushError(f"The Hugging Face hub refused the push to {repo_id}: {reason}.", fix) from None
    except _network_errors() as exc:
        raise PushError(f"The push to {repo_id} failed on the way: {exc}.",
                        "Check the network and push again; a push that failed leaves the repository as it was "
                        "(the files go up in one commit).") from None


def _network_errors() -> tuple[type[BaseException], ...]:
    """The errors a failed connection raises: the OS's, and those of the HTTP client the hub
    client has loaded (its name changed across versions; none is imported here)."""
    found: list[type[BaseException]] = [OSError]
    for name, attr in (("httpx2", "RequestError"), ("httpx", "RequestError"), ("requests", "RequestException")):
        base = getattr(sys.modules.get(name), attr, None)
        if isinstance(base, type) and issubclass(base, BaseException):
            found.append(base)
    return tuple(found)


def _plain_file(path: Path) -> bool:
    """A file, not a link: nothing outside the run folder goes up by way of a link in it."""
    return path.is_file() and not path.is_symlink()


def _run_name(folder: Path) -> str:
    run_dir = folder.parent if folder.name == BEST_DIR else folder
    return str((read_summary(run_dir) or {}).get("name") or run_dir.name)
