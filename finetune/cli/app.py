"""The ``finetune`` typer app: every command registered in the order ``finetune --help`` lists
them, the ``show`` sub-app, and :func:`main`, the console-script entry point.

The commands live in :mod:`.train`, :mod:`.evaluate`, :mod:`.export`, :mod:`.compare` and
:mod:`.show`; each imports torch, timm and the training code inside its body, so ``finetune ls``
and ``finetune validate`` answer quickly.
"""

from __future__ import annotations

import typer

from . import compare, evaluate, export, push, show, train

app = typer.Typer(
    name="finetune",
    help="Fine-tune pretrained DeiT/ViT classifiers and compare them with ViTs trained from scratch.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command()(train.run)
app.command()(train.resume)
app.command()(train.validate)
app.command("ls")(train.list_recipes_cmd)
app.command("eval")(evaluate.eval_cmd)
app.command()(evaluate.predict)
app.command()(export.export)
app.command()(push.push)
app.command()(compare.compare)
app.command()(compare.sweep)
app.command()(compare.report)

show_app = typer.Typer(
    help="Pictures of what a ViT sees: its patch grid, its attention, its position embeddings.\n\n"
    "Example: finetune show attention runs/deit_tiny_cifar cat.jpg",
    no_args_is_help=True,
)
app.add_typer(show_app, name="show")
show_app.command("patches")(show.show_patches)
show_app.command("attention")(show.show_attention)
show_app.command("pos-embed")(show.show_pos_embed)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="finetune")
