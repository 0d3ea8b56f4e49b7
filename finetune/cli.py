"""The ``finetune`` command line: a thin typer shell over the library.

Every command turns a :class:`~finetune.errors.FinetuneError` into one paragraph on stderr and
exit code 1, with no traceback. Heavy imports (torch, timm) happen inside the commands, so
``finetune ls`` and ``finetune validate`` answer quickly.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, Callable

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import FinetuneError

app = typer.Typer(
    name="finetune",
    help="Fine-tune pretrained DeiT/ViT classifiers and compare them with ViTs trained from scratch.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# soft_wrap: long lines (paths, YAML) are never broken, so output can be piped or copied as is.
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(help="Recipe overrides as dotted.key=value, e.g. optim.lr=3e-4 data.batch_size=64.", show_default=False),
]


def friendly_errors(fn: Callable) -> Callable:
    """Print user errors as one paragraph and exit 1; let real bugs keep their traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with _plain_warnings():
                return fn(*args, **kwargs)
        except FinetuneError as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as exc:
            detail = f": {escape(str(exc))}" if str(exc) else ""  # RunInterrupted says how to resume
            err.print(f"[yellow]interrupted[/]{detail}", highlight=False)
            raise typer.Exit(130) from None

    return wrapper


@contextlib.contextmanager
def _plain_warnings():
    """Print finetune's own warnings (``engine.TrainingWarning``: a setting that does less than it
    says) as one ``warning:`` line, by the main process only; other warnings keep Python's format."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if getattr(category, "__module__", "").split(".")[0] != "finetune":
            return previous(message, category, filename, lineno, file, line)
        if _is_main_process():
            err.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False)

    with warnings.catch_warnings():  # also forgets which warnings an earlier command showed
        warnings.showwarning = show
        yield


NprocOpt = Annotated[
    int,
    typer.Option("--nproc", min=1, help="Processes to train with on this machine, through torchrun (one per GPU; "
                 "gloo on a CPU). data.batch_size stays the global batch."),
]


def _launch(command: list[str], nproc: int, run_dir: Path) -> None:
    """Start ``finetune COMMAND`` in ``nproc`` processes (torchrun) and exit with its code; a
    failure gets one paragraph (which process died, and how to resume), not torchrun's report."""
    from .training.distributed import run_processes

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
        from .training.distributed import is_peer_failure, peer_failure_error

        if is_peer_failure(exc):
            raise peer_failure_error(exc, run_dir) from None
        raise


def _is_main_process() -> bool:
    """False on the ranks of a torchrun other than 0, which print nothing but errors."""
    import os

    return os.environ.get("RANK", "0") == "0"


@app.command()
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
    from .recipe import find_recipe, load_recipe
    from .runs.folder import check_run_dir, run_dir_for

    path = find_recipe(recipe)
    parsed = load_recipe(path, overrides or [])
    if nproc > 1:  # the common mistakes, before launching
        from .training.distributed import check_batch_split

        check_batch_split(parsed.data.batch_size, nproc, pairs=parsed.train.mixing)
        check_run_dir(run_dir_for(parsed), parsed.output.overwrite)
        _launch(["run", str(path), *(overrides or []), *(["-q"] if quiet else [])], nproc, run_dir_for(parsed))
    from .runs.run import run as run_recipe

    with _peer_failures_as_messages(run_dir_for(parsed)):
        summary = run_recipe(parsed, recipe_path=str(path), quiet=quiet)
    _done(summary, run_dir_for(parsed))


@app.command()
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
        from .training.distributed import check_batch_split
        from .recipe import load_recipe
        from .runs.folder import RunDir

        RunDir.reopen(run_dir).close()  # the common mistakes (finished, in use...), before launching
        stored = load_recipe(run_dir / "recipe.yaml")
        check_batch_split(stored.data.batch_size, nproc, pairs=stored.train.mixing)
        _launch(["resume", str(run_dir), *(["-q"] if quiet else [])], nproc, run_dir)
    from .runs.run import resume as resume_run

    with _peer_failures_as_messages(run_dir):
        summary = resume_run(run_dir, quiet=quiet)
    _done(summary, run_dir)


def _done(summary: dict, folder: Path) -> None:
    """The closing line of a run, printed by the main process only."""
    from .runs.run import describe

    if _is_main_process():
        out.print(f"[bold green]done[/] {escape(describe(summary, folder))}", highlight=False)


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
    from .recipe import dump_recipe_yaml, find_recipe, is_experiment, load_recipe, read_yaml_file

    path = find_recipe(recipe)
    if is_experiment(read_yaml_file(path)):
        from .experiments.experiment import load_experiment

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
    """The data to evaluate on, and the seed it needs: the run's own unless --data says otherwise."""
    from .recipe import DataConfig, load_recipe

    if data is None:
        # A run folder, its best/ model, or a weights file inside a run folder.
        folders = [target, target.parent] if target.is_dir() else [target.parent]
        recipe_file = next((f / "recipe.yaml" for f in folders if (f / "recipe.yaml").is_file()), folders[0] / "recipe.yaml")
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


@app.command("eval")
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
    from .data.core import BatchLoader, load_eval_split, normalisation
    from .training.device import autocast_dtype, resolve_device
    from .training.evaluate import evaluate
    from .models.build import load_model

    _refuse_unfinished_run(model)
    model_obj = load_model(model)
    classes = model_obj.pretrained_cfg.get("label_names")
    cfg, seed = _eval_data_config(model, data, root, image_size)
    split, class_names, skipped = load_eval_split(cfg, seed=seed, classes=classes)
    if skipped:
        err.print(f"[yellow]warning:[/] {escape(skipped.describe())}", highlight=False)
    dev = resolve_device(device)
    model_obj = model_obj.to(dev)
    mean, std = normalisation(model_obj.pretrained_cfg)
    loader = BatchLoader(
        split, batch_size=batch_size, train=False, device=dev,
        out_size=tuple(model_obj.patch_embed.img_size), mean=mean, std=std,
    )
    result = evaluate(model_obj, loader, model_obj.num_classes, amp_dtype=autocast_dtype("auto", dev))
    out.print(
        f"{escape(str(model))}: top-1 {100 * result.acc1:.2f}%  top-5 {100 * result.acc5:.2f}%  "
        f"loss {result.loss:.4f}  ({result.images} images)",
        highlight=False,
    )
    table = Table("class", "accuracy", box=None, header_style="bold")
    for name, acc in zip(class_names, result.per_class_acc):
        table.add_row(name, "n/a (no images)" if acc is None else f"{100 * acc:.1f}%")
    out.print(table)


@app.command()
@friendly_errors
def predict(
    model: Annotated[Path, typer.Argument(help="A run directory, a saved model, or any load_model source.")],
    images: Annotated[list[Path], typer.Argument(help="One or more image files.")],
    topk: Annotated[int, typer.Option(help="How many classes to show per image.", min=1)] = 3,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
) -> None:
    """Classify photos: the top classes and their probabilities, as the course does with one photo.

    MODEL may also be any pretrained source, e.g. deit_tiny_patch16_224 (ImageNet class names).

    Example: finetune predict runs/deit_tiny_cifar cat.jpg --topk 3
    """
    import torch

    from .data.core import normalisation, preprocess_images, read_image
    from .training.device import resolve_device
    from .models.build import load_model

    decoded = [read_image(path) for path in images]  # every file checked before the model loads
    _refuse_unfinished_run(model)
    model_obj = load_model(model)
    names = _class_names(model_obj)
    dev = resolve_device(device)
    model_obj = model_obj.to(dev).eval()
    batch = preprocess_images(decoded, tuple(model_obj.patch_embed.img_size), *normalisation(model_obj.pretrained_cfg)).to(dev)
    with torch.no_grad():
        probs = model_obj(batch).float().softmax(dim=-1)
    k = min(topk, probs.shape[1])
    top = probs.topk(k, dim=-1)
    for path, values, indices in zip(images, top.values.tolist(), top.indices.tolist()):
        out.print(f"[bold]{escape(str(path))}[/]", highlight=False)
        for rank, (p, i) in enumerate(zip(values, indices), start=1):
            out.print(f"  {rank}. {names[i]:<20} {100 * p:6.2f}%", highlight=False, markup=False)


def _refuse_unfinished_run(target: Path) -> None:
    """A run folder that has no model yet gets a message about the run, not about a missing file."""
    from .runs.folder import BEST_DIR, is_run_folder, run_status

    if not is_run_folder(target) or (target / "config.json").is_file():
        return
    status = run_status(target) or "unknown"
    best = target / BEST_DIR
    also = f" Its best epoch so far is saved in {best}, which you can evaluate now." if (best / "config.json").is_file() else ""
    if status == "running":
        fix = "Wait for it to finish." + also
    elif status in ("interrupted", "failed"):
        fix = f"Continue it with `finetune resume {target}` first." + also
    else:
        fix = "Train it again (finetune run ...), or pass another model." + also
    raise FinetuneError(f"The run {target} did not finish (status {status}), so it has no final model.", fix)


def _print_plan(plans: list) -> None:
    table = Table("variant", "action", "run folder", box=None, header_style="bold")
    for plan in plans:
        action = f"{plan.action} ({plan.reason})" if plan.reason else plan.action
        table.add_row(plan.name, action, str(plan.run_dir))
    out.print(table)


def _run_and_report(experiment: Any, dry_run: bool, quiet: bool, nproc: int = 1) -> None:
    """Shared tail of compare and sweep: plan or run, print the table, fail if a variant failed."""
    from .experiments.experiment import plan_experiment, run_experiment

    if dry_run:
        _print_plan(plan_experiment(experiment))
        out.print(experiment.describe_ranking(), highlight=False, markup=False)
        out.print(f"[green]ok[/] {len(experiment.variants)} variants validate -> {escape(str(experiment.dir))}", highlight=False)
        return
    result = run_experiment(experiment, quiet=quiet, nproc=nproc)
    out.print(result.table, markup=False, highlight=False, soft_wrap=True)
    out.print(f"report: {result.report['markdown']}", highlight=False, markup=False)
    if result.failed:
        names = ", ".join(v.name for v in result.failed)
        raise FinetuneError(
            f"{len(result.failed)} of {len(result.variants)} variants failed: {names}.",
            f"The errors are in {result.report['markdown']}. Fix them and rerun the same command: "
            "finished runs are reused, the others resume from their last checkpoint or start again.",
        )


ExperimentNameOpt = Annotated[
    str | None,
    typer.Option("--name", help="Experiment name, the folder under output.dir (default: from the file or recipe)."),
]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="Validate every variant and show what would run, reuse or be replaced.")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or status lines.")]


@app.command()
@friendly_errors
def compare(
    experiment: Annotated[
        str, typer.Argument(help="Experiment file (a base recipe plus named variants), or an experiment folder.")
    ],
    overrides: OverridesArg = None,
    name: ExperimentNameOpt = None,
    dry_run: DryRunOpt = False,
    quiet: QuietOpt = False,
    nproc: NprocOpt = 1,
) -> None:
    """Run the variants of an experiment on the same data and seed, and compare them in one report.

    Overrides apply to every variant. Rerunning reuses finished runs and resumes unfinished ones.
    With --nproc N each variant trains in N processes.

    Example: finetune compare recipes/compare_cifar.yaml train.epochs=1
    """
    from .experiments.experiment import load_experiment

    _run_and_report(load_experiment(experiment, overrides or [], name=name), dry_run, quiet, nproc)


@app.command()
@friendly_errors
def sweep(
    recipe: Annotated[str, typer.Argument(help="Recipe file, or the name of a shipped recipe.")],
    overrides: OverridesArg = None,
    grid: Annotated[
        list[str] | None,
        typer.Option("--grid", "-g", help="KEY=VALUE1,VALUE2,...; repeat for more keys (Cartesian product).",
                     show_default=False),
    ] = None,
    name: ExperimentNameOpt = None,
    dry_run: DryRunOpt = False,
    quiet: QuietOpt = False,
    nproc: NprocOpt = 1,
) -> None:
    """Train every combination of the --grid values, and compare them in one report.

    Example: finetune sweep recipes/vit_lab_cifar.yaml --grid optim.lr=1e-3,3e-4 --grid data.batch_size=32,128
    """
    from .experiments.experiment import sweep_experiment

    _run_and_report(sweep_experiment(recipe, grid or [], overrides or [], name=name), dry_run, quiet, nproc)


@app.command()
@friendly_errors
def report(
    run_dirs: Annotated[
        list[Path], typer.Argument(help="Run folders, or experiment folders (all their variants).", show_default=False)
    ],
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Folder for the report (default: the experiment folder, else ./report)."),
    ] = None,
    sweep_keys: Annotated[
        str | None, typer.Option("--sweep-keys", help="Comma-separated swept keys for sweep.png, e.g. optim.lr,data.batch_size.")
    ] = None,
    title: Annotated[str | None, typer.Option(help="Heading of report.md.")] = None,
) -> None:
    """Compare finished runs: a Markdown and CSV table, accuracy curves and, for a sweep, its plot.

    Example: finetune report runs/compare_cifar --out runs/compare_cifar
    """
    from .experiments.experiment import EXPERIMENT_FILE, read_experiment_folder, write_experiment_report

    dirs: list[Path] = []
    experiments = []
    for path in run_dirs:
        if not path.exists():
            raise FinetuneError(f"{path} does not exist.", "Pass run folders (runs/NAME) or experiment folders.")
        if not path.is_dir():
            raise FinetuneError(f"{path} is a file, not a run folder.", "Pass run folders (runs/NAME) or experiment folders.")
        if (path / EXPERIMENT_FILE).is_file():
            experiments.append((path, *read_experiment_folder(path)))
            dirs += experiments[-1][1]
        else:
            dirs.append(path)
    single = experiments[0] if len(experiments) == 1 and len(run_dirs) == 1 else None
    keys = [k.strip() for k in sweep_keys.split(",") if k.strip()] if sweep_keys else (single[2] if single else [])
    target = out_dir or (single[0] if single else Path("report"))
    _check_writable_folder(target, "--out")
    paths, table = write_experiment_report(dirs, target, title=title or (single[3] if single else None), sweep_keys=keys)
    out.print(table, markup=False, highlight=False, soft_wrap=True)
    out.print(f"report: {paths['markdown']}", highlight=False, markup=False)


show_app = typer.Typer(
    help="Pictures of what a ViT sees: its patch grid, its attention, its position embeddings.\n\n"
    "Example: finetune show attention runs/deit_tiny_cifar cat.jpg",
    no_args_is_help=True,
)
app.add_typer(show_app, name="show")
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="The PNG to write.")]


@show_app.command("patches")
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
    from .data.core import read_image, resize_center_crop
    from .viz.figures import draw_patches
    from .viz.visual import check_patch_picture

    _check_output_file(out)
    if img_size is not None and patch_size is not None:
        check_patch_picture(img_size, patch_size)  # before the image is read
    decoded = read_image(image)
    prefix = 1
    if model is not None:
        from .models.build import load_model

        loaded = load_model(model)
        img_size = img_size or loaded.patch_embed.img_size[0]
        patch_size = patch_size or loaded.patch_embed.patch_size[0]
        prefix = int(getattr(loaded, "num_prefix_tokens", 1))
    if img_size is None or patch_size is None:
        raise FinetuneError("Which grid? Give --model, or both --img-size and --patch-size.",
                            "For example: finetune show patches cat.jpg --img-size 224 --patch-size 16")
    check_patch_picture(img_size, patch_size)
    resized = resize_center_crop(decoded, (img_size, img_size))
    _write_figure(out, lambda: draw_patches(resized, patch_size, out, prefix_tokens=prefix))


@show_app.command("attention")
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

    from .data.core import normalisation, preprocess_images, read_image, resize_center_crop
    from .training.device import resolve_device
    from .viz.figures import draw_attention
    from .models.build import load_model
    from .viz.visual import attention_rollout, last_layer_attention

    _check_output_file(out)
    decoded = [read_image(path) for path in images]
    _refuse_unfinished_run(Path(model))
    loaded = load_model(model)
    dev = resolve_device(device)
    loaded = loaded.to(dev).eval()
    size = tuple(loaded.patch_embed.img_size)
    x = preprocess_images(decoded, size, *normalisation(loaded.pretrained_cfg)).to(dev)
    with torch.no_grad():
        confidence, predicted = loaded(x).softmax(-1).max(-1)
    names = _class_names(loaded)
    titles = [f"{p.parent.name}/{p.name}\npredicted: {names[c]} ({100 * float(q):.0f}%)"
              for p, c, q in zip(images, predicted.tolist(), confidence)]
    shown = torch.stack([resize_center_crop(image, size) for image in decoded])
    rollout, last = attention_rollout(loaded, x).cpu(), last_layer_attention(loaded, x).cpu()
    _write_figure(out, lambda: draw_attention(shown, rollout, last, out, titles=titles))


@show_app.command("pos-embed")
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
    from .viz.figures import draw_pos_embed_similarity
    from .models.build import load_model
    from .models.pos_embed import POS_EMBED_MODES, pos_embed_prefix_tokens, resize_pos_embed, to_2tuple
    from .viz.visual import check_similarity_picture, pos_embed_similarity

    _check_output_file(out)
    loaded = load_model(model)
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


def _check_writable_folder(folder: Path, option: str) -> None:
    """Refuse, before any work, a folder that cannot be made or written: one under a file, a file
    itself, or one without write permission."""
    import os

    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "it is a file" if existing == folder else f"{existing} is a file, not a folder"
        raise FinetuneError(f"Cannot write to {folder} ({option}): {where}.",
                            f"Pass {option} a path in a folder, or the name of a new folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FinetuneError(f"Cannot write to {folder} ({option}): {existing} is not writable (permissions, or a "
                            "read-only file system).", f"Pass {option} a path in a folder you can write to.")


def _check_output_file(path: Path) -> None:
    """:func:`_check_writable_folder` for the folder of an output file; the file must not be a folder."""
    if path.is_dir():
        raise FinetuneError(f"--out {path} is a folder; it names the PNG to write.",
                            f"Pass a file name, e.g. --out {path / 'figure.png'}.")
    _check_writable_folder(path.parent, "--out")


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


def _class_names(model: Any) -> list[str]:
    """The model's class names: saved with it, ImageNet's for an ImageNet head, else numbers."""
    names = model.pretrained_cfg.get("label_names")
    if names:
        return list(names)
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(model)  # e.g. a timm hub model that kept its 1000-class head
    if subset:
        info = ImageNetInfo(subset)
        return [info.index_to_description(i) for i in range(model.num_classes)]
    return [str(i) for i in range(model.num_classes)]


def main() -> None:
    """Console-script entry point."""
    app(prog_name="finetune")


if __name__ == "__main__":
    sys.exit(main())
