"""``finetune show patches``, ``attention`` and ``pos-embed``: the pictures of what a ViT sees,
each written to one PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Callable

import typer
from rich.markup import escape

from ..errors import FinetuneError
from .common import (check_device, check_writable_folder, friendly_errors, model_class_names, out,
                     refuse_unfinished_run)

OutOpt = Annotated[Path, typer.Option("--out", "-o", help="The PNG to write.")]


@friendly_errors
def show_patches(
    image: Annotated[Path, typer.Argument(help="An image file.")],
    model: Annotated[str | None, typer.Option(help="A model (run folder, file or timm name) whose input size and patch size to use.")] = None,
    img_size: Annotated[int | None, typer.Option(help="Input size, instead of a model's.", min=1)] = None,
    patch_size: Annotated[int | None, typer.Option(help="Patch size, instead of a model's.", min=1)] = None,
    out: OutOpt = Path("patches.png"),
) -> None:
    """The image resized as the model sees it, cut into its numbered patch grid, beside the token
    sequence the transformer reads (class token first), as in the lecture.

    Example: finetune show patches cat.jpg --img-size 224 --patch-size 16
    """
    from ..data.decode import read_image
    from ..data.preprocess import Preprocess
    from ..viz.figures import draw_patches
    from ..viz.visual import check_patch_picture

    _check_output_file(out)
    if img_size is not None and patch_size is not None:
        check_patch_picture(img_size, patch_size)  # before the image is read
    decoded = read_image(image)
    prefix = 1
    if model is not None:
        from ..models.build import load_model

        loaded = load_model(model)
        img_size = img_size or loaded.patch_embed.img_size[0]
        # Pixels per token: the patch size for a plain ViT; a conv tokenizer (vit_cifar_conv) has
        # 1-px "patches" of its feature map, and its stem's stride makes each token 4 px of the image.
        patch_size = patch_size or loaded.patch_embed.img_size[0] // loaded.patch_embed.grid_size[0]
        prefix = int(getattr(loaded, "num_prefix_tokens", 1))
    if img_size is None or patch_size is None:
        raise FinetuneError("Which grid? Give --model, or both --img-size and --patch-size.",
                            "For example: finetune show patches cat.jpg --img-size 224 --patch-size 16")
    check_patch_picture(img_size, patch_size)
    resized = Preprocess(size=(img_size, img_size)).resize_uint8(decoded)
    _write_figure(out, lambda: draw_patches(resized, patch_size, out, prefix_tokens=prefix))


@friendly_errors
def show_attention(
    model: Annotated[str, typer.Argument(help="A run folder, a saved model, or any load_model source.")],
    images: Annotated[list[Path], typer.Argument(help="One or more image files.")],
    out: OutOpt = Path("attention.png"),
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
) -> None:
    """Attention rollout and the last layer's class-token attention per head, over each image.

    Example: finetune show attention runs/deit_tiny_cifar cat.jpg dog.jpg
    """
    import torch

    from ..data.decode import read_image
    from ..runs.folder import preprocess_of
    from ..training.device import resolve_device
    from ..viz.figures import draw_attention
    from ..models.build import load_model
    from ..viz.visual import attention_rollout, last_layer_attention

    _check_output_file(out)
    check_device(device)
    decoded = [read_image(path) for path in images]
    refuse_unfinished_run(Path(model))
    loaded = load_model(model)
    dev = resolve_device(device)
    loaded = loaded.to(dev).eval()
    pre = preprocess_of(loaded, Path(model))
    x = pre(decoded).to(dev)
    with torch.no_grad():
        confidence, predicted = loaded(x).softmax(-1).max(-1)
    names = model_class_names(loaded)
    titles = [f"{p.parent.name}/{p.name}\npredicted: {names[c]} ({100 * float(q):.0f}%)"
              for p, c, q in zip(images, predicted.tolist(), confidence)]
    shown = torch.stack([pre.resize_uint8(image, pre.size) for image in decoded])
    rollout, last = attention_rollout(loaded, x).cpu(), last_layer_attention(loaded, x).cpu()
    _write_figure(out, lambda: draw_attention(shown, rollout, last, out, titles=titles))


@friendly_errors
def show_pos_embed(
    model: Annotated[str, typer.Argument(help="A run folder, a saved model, or any load_model source.")],
    img_size: Annotated[int | None, typer.Option(help="Also show the embedding resized for this input size.", min=1)] = None,
    modes: Annotated[str, typer.Option(help="Resize modes to compare, comma-separated.")] = "truncate,crop,bicubic",
    out: OutOpt = Path("pos_embed.png"),
) -> None:
    """Each position embedding's cosine similarity to all the others (ViT paper, figure 7), for the
    model's own grid and, with --img-size, for each resize mode.

    Example: finetune show pos-embed deit_tiny_patch16_224 --img-size 64 --modes truncate,crop,bicubic
    """
    from ..viz.figures import draw_pos_embed_similarity
    from ..models.build import load_model
    from ..models.pos_embed import (POS_EMBED_MODES, pos_embed_prefix_tokens, position_encodings, resize_pos_embed,
                                    supported_modes, to_2tuple)
    from ..viz.visual import check_similarity_picture, pos_embed_similarity

    _check_output_file(out)
    loaded = load_model(model)
    if supported_modes(loaded) != POS_EMBED_MODES:  # BEiT, Swin: nothing to draw
        raise FinetuneError(
            f"{model} has no absolute position embedding to draw: its position comes from "
            f"{', '.join(position_encodings(loaded)) or 'nothing a picture could show'}.",
            "Use a model with one (ViT, DeiT, DINOv2, CLIP, SigLIP, FlexiViT, EVA).",
        )
    prefix = pos_embed_prefix_tokens(loaded)
    grid = to_2tuple(loaded.patch_embed.grid_size)
    check_similarity_picture(grid, f"The model's {loaded.patch_embed.img_size[0]} px input")
    if img_size is not None:
        check_similarity_picture((img_size // loaded.patch_embed.patch_size[0],) * 2, f"--img-size {img_size}")
    pe = loaded.pos_embed.detach()
    maps = {f"{loaded.patch_embed.img_size[0]} px (as trained)": pos_embed_similarity(pe, grid, num_prefix_tokens=prefix)}
    if img_size is not None:
        new_grid = (img_size // loaded.patch_embed.patch_size[0],) * 2
        for mode in [m.strip() for m in modes.split(",") if m.strip()]:
            if mode not in POS_EMBED_MODES:
                raise FinetuneError(f"Unknown resize mode {mode!r}.", f"Use some of: {', '.join(POS_EMBED_MODES)}.")
            resized = resize_pos_embed(pe, new_grid, num_prefix_tokens=prefix, mode=mode)
            maps[f"{img_size} px, {mode}"] = pos_embed_similarity(resized, new_grid, num_prefix_tokens=prefix)
    _write_figure(out, lambda: draw_pos_embed_similarity(maps, out))


def _check_output_file(path: Path) -> None:
    """:func:`check_writable_folder` for the folder of an output file; the file must not be a folder."""
    if path.is_dir():
        raise FinetuneError(f"--out {path} is a folder; it names the PNG to write.",
                            f"Pass a file name, e.g. --out {path / 'figure.png'}.")
    check_writable_folder(path.parent, "--out")


def _write_figure(path: Path, draw: Callable[[], Path]) -> None:
    """Make the folder and draw the figure into it; a disk that refuses the file is a message."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _wrote(draw())
    except OSError as exc:
        raise FinetuneError(
            f"Cannot write {path}: {exc.strerror or exc}.",
            "Pass --out a path in a folder you can write to (not under a file, nor on a full disk).",
        ) from None


def _wrote(path: Path) -> None:
    out.print(f"[green]wrote[/] {escape(str(path))}", highlight=False)
