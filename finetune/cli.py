"""The ``finetune`` command line: a thin typer shell over the library.

Every command turns a :class:`~finetune.errors.FinetuneError` into one paragraph on stderr and
exit code 1, with no traceback. Heavy imports (torch, timm) happen inside the commands, so
``finetune ls`` and ``finetune validate`` answer quickly.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Any, Callable

import typer
from rich.console import Console
from rich.table import Table

from .errors import FinetuneError

app = typer.Typer(
    name="finetune",
    help="Fine-tune pretrained DeiT/ViT classifiers and compare them with ViTs trained from scratch.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(help="Recipe overrides as dotted.key=value, e.g. optim.lr=3e-4 data.batch_size=64.", show_default=False),
]


def friendly_errors(fn: Callable) -> Callable:
    """Print user errors as one paragraph and exit 1; let real bugs keep their traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FinetuneError as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


@app.command()
@friendly_errors
def run(
    recipe: Annotated[str, typer.Argument(help="Recipe file, or the name of a shipped recipe.")],
    overrides: OverridesArg = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or epoch lines.")] = False,
) -> None:
    """Train and evaluate as a recipe says, and write a self-describing run directory.

    Example: finetune run recipes/deit_tiny_cifar.yaml optim.lr=3e-4 train.epochs=3
    """
    from .recipe import find_recipe, load_recipe
    from .train import run as run_recipe
    from .train import run_dir_for

    path = find_recipe(recipe)
    parsed = load_recipe(path, overrides or [])
    summary = run_recipe(parsed, recipe_path=str(path), quiet=quiet)
    out.print(
        f"[bold green]done[/] {summary['name']}: test top-1 {100 * summary['final_acc1']:.2f}% "
        f"(best {100 * summary['best_acc1']:.2f}% at epoch {summary['best_epoch']}), "
        f"{summary['train_time_s']:.1f} s training, {summary['images_per_s']:,.0f} img/s -> {run_dir_for(parsed)}",
        highlight=False,
    )


@app.command()
@friendly_errors
def validate(
    recipe: Annotated[str, typer.Argument(help="Recipe file, or the name of a shipped recipe.")],
    overrides: OverridesArg = None,
    show: Annotated[bool, typer.Option("--show", help="Print the resolved recipe.")] = False,
) -> None:
    """Check a recipe (and overrides) without running it.

    Example: finetune validate recipes/vit_lab_cifar.yaml optim.lr=5e-4
    """
    from .recipe import dump_recipe_yaml, find_recipe, load_recipe

    path = find_recipe(recipe)
    parsed = load_recipe(path, overrides or [])
    if show:
        out.print(dump_recipe_yaml(parsed), highlight=False, markup=False)
    out.print(f"[green]ok[/] {path}", highlight=False)


@app.command("ls")
@friendly_errors
def list_recipes_cmd() -> None:
    """List the shipped recipes with a one-line description each.

    Example: finetune ls
    """
    from .recipe import SHIPPED_RECIPES, list_recipes

    table = Table("recipe", "description", box=None, show_header=True, header_style="bold")
    for name, description in list_recipes(SHIPPED_RECIPES):
        table.add_row(name, description)
    out.print(table)


def _eval_data_config(target: Path, data: str | None, root: str | None, image_size: int | None):
    from .recipe import DataConfig, load_recipe

    if data is None:
        recipe_file = target / "recipe.yaml" if target.is_dir() else target.parent / "recipe.yaml"
        if not recipe_file.is_file():
            raise FinetuneError(
                f"{target} has no recipe.yaml to say which data it was trained on.",
                "Pass --data cifar10 (or cifar100, or an image folder).",
            )
        cfg = load_recipe(recipe_file).data
        return cfg.model_copy(update={"root": root}) if root else cfg
    if Path(data).expanduser().is_dir():
        return DataConfig(name="imagefolder", root=str(Path(data).expanduser()), image_size=image_size)
    if data not in ("cifar10", "cifar100", "synthetic"):
        raise FinetuneError(
            f"--data {data!r} is neither a folder nor a dataset name.",
            "Pass cifar10, cifar100, or a folder of <class>/<image> folders (or one holding test/).",
        )
    return DataConfig(name=data, root=root or "data", image_size=image_size)


@app.command("eval")
@friendly_errors
def eval_cmd(
    model: Annotated[Path, typer.Argument(help="A run directory, or a saved model folder or .safetensors file.")],
    data: Annotated[
        str | None,
        typer.Option(help="cifar10, cifar100, or an image folder; default: the data the run was trained on."),
    ] = None,
    root: Annotated[str | None, typer.Option(help="Where CIFAR lives (or is downloaded to).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 256,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
) -> None:
    """Accuracy of a trained model on a test set: top-1, top-5, loss and per-class accuracy.

    Example: finetune eval runs/deit_tiny_cifar --data data/cifar10-jpeg
    """
    from .data import BatchLoader, load_eval_split
    from .models import load_model
    from .train import autocast_dtype, evaluate, resolve_device

    model_obj = load_model(model)
    classes = model_obj.pretrained_cfg.get("label_names")
    cfg = _eval_data_config(model, data, root, None)
    split, class_names = load_eval_split(cfg, classes=classes)
    dev = resolve_device(device)
    model_obj = model_obj.to(dev)
    loader = BatchLoader(
        split, batch_size=batch_size, train=False, device=dev,
        out_size=tuple(model_obj.patch_embed.img_size), mean=model_obj.pretrained_cfg["mean"],
        std=model_obj.pretrained_cfg["std"],
    )
    result = evaluate(model_obj, loader, model_obj.num_classes, amp_dtype=autocast_dtype("bf16", dev))
    out.print(
        f"{model}: top-1 {100 * result.acc1:.2f}%  top-5 {100 * result.acc5:.2f}%  "
        f"loss {result.loss:.4f}  ({result.images} images)",
        highlight=False,
    )
    table = Table("class", "accuracy", box=None, header_style="bold")
    for name, acc in zip(class_names, result.per_class_acc):
        table.add_row(name, f"{100 * acc:.1f}%")
    out.print(table)


@app.command()
@friendly_errors
def predict(
    model: Annotated[Path, typer.Argument(help="A run directory, or a saved model folder or .safetensors file.")],
    images: Annotated[list[Path], typer.Argument(help="One or more image files.")],
    topk: Annotated[int, typer.Option(help="How many classes to show per image.")] = 3,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
) -> None:
    """Classify photos: the top classes and their probabilities, as the course does with one photo.

    Example: finetune predict runs/deit_tiny_cifar cat.jpg --topk 3
    """
    import torch

    from .data import preprocess_images, read_image
    from .models import load_model
    from .train import resolve_device

    decoded = [read_image(path) for path in images]  # every file checked before the model loads
    model_obj = load_model(model)
    names = model_obj.pretrained_cfg.get("label_names") or [str(i) for i in range(model_obj.num_classes)]
    dev = resolve_device(device)
    model_obj = model_obj.to(dev).eval()
    cfg = model_obj.pretrained_cfg
    batch = preprocess_images(decoded, tuple(model_obj.patch_embed.img_size), cfg["mean"], cfg["std"]).to(dev)
    with torch.no_grad():
        probs = model_obj(batch).float().softmax(dim=-1)
    k = min(topk, probs.shape[1])
    top = probs.topk(k, dim=-1)
    for path, values, indices in zip(images, top.values.tolist(), top.indices.tolist()):
        out.print(f"[bold]{path}[/]", highlight=False)
        for rank, (p, i) in enumerate(zip(values, indices), start=1):
            out.print(f"  {rank}. {names[i]:<20} {100 * p:6.2f}%", highlight=False)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="finetune")


if __name__ == "__main__":
    sys.exit(main())
