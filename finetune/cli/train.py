"""``finetune run``, ``resume``, ``validate`` and ``ls``: training from a recipe (in one process or
through torchrun), continuing a run, checking recipes and listing the shipped ones."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from .common import NprocOpt, OverridesArg, err, friendly_errors, is_main_process, out


def _launch(command: list[str], nproc: int, run_dir: Path) -> None:
    """Start ``finetune COMMAND`` in ``nproc`` processes (torchrun) and exit with its code; a
    failure gets one paragraph (which process died, and how to resume), not torchrun's report."""
    from ..training.distributed import run_processes

    launched = run_processes(command, nproc)
    problem = launched.error(nproc, run_dir)
    if problem is not None:
        err.print(f"[bold red]error:[/] {escape(str(problem))}", highlight=False)
    raise typer.Exit(launched.code)


@contextlib.contextmanager
def _peer_failures_as_messages(run_dir: Path):
    """Under torchrun, a collective that fails because another process died (gloo's or NCCL's
    RuntimeError) becomes one paragraph: what happened and how to resume."""
    try:
        yield
    except Exception as exc:
        from ..training.distributed import is_peer_failure, peer_failure_error

        if is_peer_failure(exc):
            raise peer_failure_error(exc, run_dir) from None
        raise


@friendly_errors
def run(
    recipe: Annotated[str, typer.Argument(help="Recipe file, or the name of a shipped recipe.")],
    overrides: OverridesArg = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or epoch lines.")] = False,
    nproc: NprocOpt = 1,
) -> None:
    """Train and evaluate as a recipe says, and write a self-describing run directory.

    Example: finetune run recipes/deit_tiny_cifar.yaml optim.lr=3e-4 train.epochs=3

    On 4 GPUs: finetune run recipes/deit_tiny_cifar.yaml --nproc 4
    """
    from ..recipe import find_recipe, load_recipe
    from ..runs.folder import check_run_dir, run_dir_for

    path = find_recipe(recipe)
    parsed = load_recipe(path, overrides or [])
    if nproc > 1:  # the common mistakes, before launching
        from ..training.distributed import check_batch_split

        check_batch_split(parsed.data.batch_size, nproc, pairs=parsed.train.mixing)
        check_run_dir(run_dir_for(parsed), parsed.output.overwrite)
        _launch(["run", str(path), *(overrides or []), *(["-q"] if quiet else [])], nproc, run_dir_for(parsed))
    from ..runs.run import run as run_recipe

    with _peer_failures_as_messages(run_dir_for(parsed)):
        summary = run_recipe(parsed, recipe_path=str(path), quiet=quiet)
    _done(summary, run_dir_for(parsed))


@friendly_errors
def resume(
    run_dir: Annotated[Path, typer.Argument(help="The folder of an interrupted, killed or failed run.")],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or epoch lines.")] = False,
    nproc: NprocOpt = 1,
) -> None:
    """Continue a run from its last checkpoint, with the recipe stored in its folder.

    The resumed run ends where an uninterrupted one would have. It may use another number of
    processes (--nproc) than it started with.

    Example: finetune resume runs/deit_tiny_cifar
    """
    if nproc > 1:
        from ..training.distributed import check_batch_split
        from ..recipe import load_recipe
        from ..runs.rundir import RunDir

        RunDir.reopen(run_dir).close()  # the common mistakes (finished, in use...), before launching
        stored = load_recipe(run_dir / "recipe.yaml")
        check_batch_split(stored.data.batch_size, nproc, pairs=stored.train.mixing)
        _launch(["resume", str(run_dir), *(["-q"] if quiet else [])], nproc, run_dir)
    from ..runs.run import resume as resume_run

    with _peer_failures_as_messages(run_dir):
        summary = resume_run(run_dir, quiet=quiet)
    _done(summary, run_dir)


def _done(summary: dict, folder: Path) -> None:
    """The closing line of a run, printed by the main process only."""
    from ..runs.run import describe

    if is_main_process():
        out.print(f"[bold green]done[/] {escape(describe(summary, folder))}", highlight=False)


@friendly_errors
def validate(
    recipe: Annotated[str, typer.Argument(help="Recipe file, or the name of a shipped recipe.")],
    overrides: OverridesArg = None,
    show: Annotated[bool, typer.Option("--show", help="Print the resolved recipe.")] = False,
) -> None:
    """Check a recipe (and overrides) without running it.

    Example: finetune validate recipes/vit_lab_cifar.yaml optim.lr=5e-4
    """
    from ..recipe import dump_recipe_yaml, find_recipe, is_experiment, load_recipe, read_yaml_file

    path = find_recipe(recipe)
    if is_experiment(read_yaml_file(path)):
        from ..experiments.spec import load_experiment

        experiment = load_experiment(path, overrides or [])
        for variant, variant_recipe in experiment.variants:
            if show:
                out.print(f"# --- variant {variant}", highlight=False, markup=False)
                out.print(dump_recipe_yaml(variant_recipe), highlight=False, markup=False)
        names = ", ".join(v for v, _ in experiment.variants)
        out.print(f"[green]ok[/] {escape(str(path))}: experiment with variants {escape(names)}", highlight=False)
        return
    parsed = load_recipe(path, overrides or [])
    if show:
        out.print(dump_recipe_yaml(parsed), highlight=False, markup=False)
    out.print(f"[green]ok[/] {escape(str(path))}", highlight=False)


@friendly_errors
def list_recipes_cmd() -> None:
    """List the shipped recipes with a one-line description each.

    Example: finetune ls
    """
    from ..recipe import SHIPPED_RECIPES, list_recipes

    table = Table("recipe", "description", box=None, show_header=True, header_style="bold")
    for name, description in list_recipes(SHIPPED_RECIPES):
        table.add_row(name, description)
    out.print(table)
