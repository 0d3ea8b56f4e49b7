"""``finetune push``: a finished run's model (``config.json``, ``model.safetensors`` and its model
card) uploaded to a Hugging Face hub repository; everything is checked before anything is sent."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from .common import friendly_errors, out


@friendly_errors
def push(
    run_dir: Annotated[Path, typer.Argument(help="A finished run folder.")],
    repo_id: Annotated[str, typer.Argument(help="The hub repository, user/name or org/name; created if missing.")],
    private: Annotated[bool, typer.Option("--private", help="Create the repository private.")] = False,
    revision: Annotated[
        str | None, typer.Option("--revision", help="Commit to this branch (created from main if missing).")
    ] = None,
) -> None:
    """Upload a finished run's model to the Hugging Face hub, with its model card.

    The model selected on validation (best/) goes up when the run had a validation split, else the final model.

    Checkpoints, metrics and pictures stay here. Needs a token: `hf auth login` or HF_TOKEN.

    Example: finetune push runs/deit_tiny_cifar me/deit-tiny-cifar10
    """
    from ..runs.push import push_run

    pushed = push_run(run_dir, repo_id, private=private, revision=revision)
    what = "the model selected on validation" if pushed.which == "best" else "the final model"
    out.print(
        f"pushed {what} ({escape(str(pushed.folder))}: {', '.join(pushed.files)}) to {pushed.repo_id}: "
        f"{escape(pushed.url)}",
        highlight=False,
    )
