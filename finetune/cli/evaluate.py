"""``finetune eval`` and ``predict``: a trained model's accuracy on a test set, and its top classes
for a few photos."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import FinetuneError
from .common import (check_device, check_image_size, err, friendly_errors, model_class_names, out,
                     refuse_unfinished_run)

MANY_IMAGES = 16  # predict on more images than this shows its progress (a few take a second or two)


def _eval_data_config(target: Path, data: str | None, root: str | None, image_size: int | None):
    """The data to evaluate on, and the seed it needs: the run's own unless --data says otherwise."""
    from ..recipe import DataConfig, load_recipe

    if data is None:
        from ..runs.folder import check_links

        # A run folder, its best/ model, or a weights file inside a run folder.
        folders = [target, target.parent] if target.is_dir() else [target.parent]
        recipe_file = next((f / "recipe.yaml" for f in folders if (f / "recipe.yaml").is_file()), folders[0] / "recipe.yaml")
        check_links(recipe_file.parent, ("recipe.yaml",))  # a link out of the folder is another file: never read
        if not recipe_file.is_file():
            raise FinetuneError(
                f"{target} has no recipe.yaml to say which data it was trained on.",
                "Pass --data cifar10 (or cifar100, or an image folder).",
            )
        trained = load_recipe(recipe_file)  # its seed also fixes synthetic data and the val split
        update = {k: v for k, v in (("root", root), ("image_size", image_size)) if v is not None}
        return trained.data.model_copy(update=update), trained.seed
    if Path(data).expanduser().is_dir():
        return DataConfig(name="imagefolder", root=str(Path(data).expanduser()), image_size=image_size), 0
    if data not in ("cifar10", "cifar100", "synthetic"):
        raise FinetuneError(
            f"--data {data!r} is neither a folder nor a dataset name.",
            "Pass cifar10, cifar100, or a folder of <class>/<image> folders (or one holding test/).",
        )
    return DataConfig(name=data, root=root or "data", image_size=image_size), 0


@friendly_errors
def eval_cmd(
    model: Annotated[Path, typer.Argument(help="A run directory, or a saved model folder or .safetensors file.")],
    data: Annotated[
        str | None,
        typer.Option(help="cifar10, cifar100, or an image folder; default: the data the run was trained on."),
    ] = None,
    root: Annotated[str | None, typer.Option(help="Where CIFAR lives (or is downloaded to).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch.", min=1)] = 256,
    image_size: Annotated[
        int | None, typer.Option(help="Resize (shorter side, centre crop) images of mixed sizes to this size on load.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
) -> None:
    """Accuracy of a trained model on a test set: top-1, top-5, loss and per-class accuracy.

    Example: finetune eval runs/deit_tiny_cifar --data data/cifar10-jpeg
    """
    from ..data.load import load_eval_split
    from ..data.loader import BatchLoader
    from ..data.preprocess import stored_size_of
    from ..runs.folder import preprocess_of
    from ..training.activity import Activity
    from ..training.device import autocast_dtype, resolve_device
    from ..training.evaluate import evaluate
    from ..models.build import load_model

    check_device(device)
    refuse_unfinished_run(model)
    model_obj = load_model(model)
    check_image_size(image_size, model_obj)
    classes = model_obj.pretrained_cfg.get("label_names")
    stored = stored_size_of(model_obj.pretrained_cfg)
    if data is not None and image_size is None and stored is not None and stored[0] == stored[1]:
        # Other data, for a model whose run kept its images at a size of their own: images are
        # brought to that size on load, as the run's evaluation (and predict) brought them.
        image_size = stored[0]
    cfg, seed = _eval_data_config(model, data, root, image_size)
    line = (f"evaluating {model} on {cfg.root if cfg.name == 'imagefolder' else cfg.name} "
            "(reading the images, then scoring them) ...")
    with Activity(line, "reading the images", console=err) as shown:
        with shown.decoding():
            split, class_names, skipped = load_eval_split(cfg, seed=seed, classes=classes)
        if skipped:
            err.print(f"[yellow]warning:[/] {escape(skipped.describe())}", highlight=False)
        dev = resolve_device(device)
        model_obj = model_obj.to(dev)
        loader = BatchLoader(split, batch_size=batch_size, train=False, device=dev, preprocess=preprocess_of(model_obj, model))
        scoring = f"scoring {len(split):,} images in batches of {batch_size}"
        shown.update(scoring, 0, len(loader))
        result = evaluate(model_obj, loader, model_obj.num_classes, amp_dtype=autocast_dtype("auto", dev),
                          on_batch=lambda done, total: shown.update(scoring, done, total))
    out.print(
        f"{escape(str(model))}: top-1 {100 * result.acc1:.2f}%  top-5 {100 * result.acc5:.2f}%  "
        f"loss {result.loss:.4f}  ({result.images} images)",
        highlight=False,
    )
    table = Table("class", "accuracy", box=None, header_style="bold")
    for name, acc in zip(class_names, result.per_class_acc):
        table.add_row(name, "n/a (no images)" if acc is None else f"{100 * acc:.1f}%")
    out.print(table)


@friendly_errors
def predict(
    model: Annotated[Path, typer.Argument(help="A run directory, a saved model, any load_model source, or an "
                                                "exported .onnx or .pt2 file (finetune export).")],
    images: Annotated[list[Path], typer.Argument(help="One or more image files.")],
    topk: Annotated[int, typer.Option(help="How many classes to show per image.", min=1)] = 3,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
) -> None:
    """Classify photos: the top classes and their probabilities, as the course does with one photo.

    MODEL may also be any pretrained source, e.g. deit_tiny_patch16_224 (ImageNet class names).

    Example: finetune predict runs/deit_tiny_cifar cat.jpg --topk 3
    """
    import os
    import stat

    from ..data.decode import read_image
    from ..training.activity import Activity

    check_device(device)
    for path in images:  # by stat, which never opens: opening a FIFO would wait for a writer forever
        try:
            mode = os.stat(path).st_mode
        except OSError:
            continue  # read_image names a missing or unreadable file
        if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
            raise FinetuneError(f"{path} is not a regular file (a FIFO, socket or device); finetune reads image files only.",
                                "Pass the path of an image file.")
    count = len(images)
    with Activity(f"reading and classifying {count} images ...", f"reading {count} images", total=count,
                  quiet=count <= MANY_IMAGES, console=err) as shown:
        decoded = []
        for path in images:  # every file checked before the model loads
            decoded.append(read_image(path))
            shown.update(None, len(decoded), count)
        shown.update(f"classifying {count} images")
        if model.suffix.lower() in (".onnx", ".pt2") and not model.is_dir():
            probs, names = _exported_probs(model, decoded)
        else:
            probs, names = _model_probs(model, decoded, device)
    k = min(topk, probs.shape[1])
    top = probs.topk(k, dim=-1)
    for path, values, indices in zip(images, top.values.tolist(), top.indices.tolist()):
        out.print(f"[bold]{escape(str(path))}[/]", highlight=False)
        for rank, (p, i) in enumerate(zip(values, indices), start=1):
            out.print(f"  {rank}. {names[i]:<20} {100 * p:6.2f}%", highlight=False, markup=False)


def _model_probs(model: Path, decoded: list, device: str):
    """Class probabilities ``(B, classes)`` of a run folder or any load_model source, and its class names."""
    import torch

    from ..models.build import load_model
    from ..runs.folder import preprocess_of
    from ..training.device import resolve_device

    refuse_unfinished_run(model)
    model_obj = load_model(model)
    names = model_class_names(model_obj)
    dev = resolve_device(device)
    model_obj = model_obj.to(dev).eval()
    batch = preprocess_of(model_obj, model)(decoded).to(dev)
    with torch.no_grad():
        return model_obj(batch).float().softmax(dim=-1), names


def _exported_probs(model: Path, decoded: list):
    """Class probabilities of an exported file (on the CPU), preprocessed by the metadata it carries:
    a uint8 graph gets the photos brought to its input size by the run's resize policy (it does the
    rest), a float graph the whole preprocessing."""
    import torch

    from ..export.runtime import load_exported

    runner, meta = load_exported(model)
    batch = meta.graph_inputs(decoded)
    if meta.batch:  # a fixed batch size: run the photos in groups of that size, the last one padded
        groups = [batch[i : i + meta.batch] for i in range(0, len(batch), meta.batch)]
        logits = [runner(_pad(g, meta.batch))[: len(g)] for g in groups]
    else:
        logits = [runner(batch)]
    return torch.cat(logits).float().softmax(dim=-1), list(meta.class_names)


def _pad(batch, size: int):
    """``batch`` repeated along dim 0 to ``size`` rows (its first rows are its own)."""
    import torch

    return torch.cat([batch, batch[:1].expand(size - len(batch), *batch.shape[1:])]) if len(batch) < size else batch
