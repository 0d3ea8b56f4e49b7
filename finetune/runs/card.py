"""The model card of a run folder: ``README.md`` beside the model (and in ``best/``), written when a
run finishes, read by the Hugging Face hub when the folder is pushed (``finetune push``).

The card is built with ``huggingface_hub.ModelCardData`` (the YAML front matter the hub reads:
``library_name: timm``, tags, datasets, ``model-index`` with the test accuracy, the source's
licence when timm records one) and says in prose where the weights came from, what data they were
trained on, the recipe, how the headline accuracy was chosen and what it cost to train.

Honest headlines: the card in ``best/`` gives the test top-1 of the epoch selected on validation;
the card beside the final model gives the test top-1 after the last epoch, "final epoch, no
selection". The best test accuracy over epochs, chosen on the test set itself, is never shown.

The folder already holds timm's ``config.json`` (architecture, ``model_args``, ``pretrained_cfg``
with mean, std, input size and class names) and ``model.safetensors``: what
``timm.create_model("hf-hub:REPO_ID", pretrained=True)`` and ``"local-dir:FOLDER"`` read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..snapshot import write_text_atomically
from .folder import BEST_DIR, read_summary
from .records import number

CARD_NAME = "README.md"
SELECTED = "selected on validation"
NOT_SELECTED = "final epoch, no selection"
HUB_DATASETS = {"cifar10": ("uoft-cs/cifar10", "CIFAR-10"), "cifar100": ("uoft-cs/cifar100", "CIFAR-100")}
"""finetune's dataset names -> (the dataset's id on the hub, its name)."""


def write_model_cards(folder: Path, summary: dict[str, Any]) -> list[Path]:
    """Write the card of the final model (``folder/README.md``) and, when the run saved a model
    selected on validation, of that one (``folder/best/README.md``); each atomically.

    Args:
        folder: the run folder, holding ``recipe.yaml``.
        summary: the run's summary with its results (what ``summary.json`` says when it finishes).

    Returns:
        The cards written.
    """
    recipe_text = (folder / "recipe.yaml").read_text(encoding="utf-8")
    written = []
    targets = [(folder, False)]
    if summary.get("selection") == "val" and (folder / BEST_DIR / "config.json").is_file():
        targets.append((folder / BEST_DIR, True))
    for target, best in targets:
        card = model_card(summary, recipe_text, best=best, config=_config(target))
        write_text_atomically(target / CARD_NAME, str(card))
        written.append(target / CARD_NAME)
    return written


def card_for(model_dir: Path, repo_id: str | None = None):
    """The card of one model folder of a finished run (the run folder or its ``best/``), from its
    ``summary.json``, ``recipe.yaml`` and ``config.json``: for runs from before finetune wrote cards."""
    best = model_dir.name == BEST_DIR
    run_dir = model_dir.parent if best else model_dir
    summary = read_summary(run_dir) or {}
    return model_card(summary, (run_dir / "recipe.yaml").read_text(encoding="utf-8"), best=best, repo_id=repo_id,
                      config=_config(model_dir))


def _config(model_dir: Path) -> dict[str, Any] | None:
    """The folder's ``config.json`` as written by ``save_model``, or ``None`` (no model, unreadable)."""
    import json

    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return config if isinstance(config, dict) else None


def with_repo_id(card_text: str, repo_id: str) -> str:
    """A card written before the folder was pushed, with the repository it is pushed to in place of
    the ``REPO_ID`` placeholder (the rest of the card, edits included, as it is)."""
    lines = [line for line in card_text.splitlines() if not line.startswith(_PLACEHOLDER_NOTE)]
    return "\n".join(lines).replace(f"hf-hub:{PLACEHOLDER}", f"hf-hub:{repo_id}") + "\n"


def model_card(summary: dict[str, Any], recipe_text: str, *, best: bool = False, repo_id: str | None = None,
               config: dict[str, Any] | None = None):
    """The ``huggingface_hub.ModelCard`` of the run's final model, or (``best``) of its model
    selected on validation; ``repo_id``, when known, goes into the loading examples, and
    ``config`` (the folder's config.json) says how plain timm loads and preprocesses it."""
    import yaml
    from huggingface_hub import ModelCard

    recipe = yaml.safe_load(recipe_text) or {}
    data = card_data(summary, recipe, best=best)
    body = card_body(summary, recipe, recipe_text, best=best, repo_id=repo_id, config=config)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def headline(summary: dict[str, Any], *, best: bool) -> tuple[float | None, str, int | None]:
    """``(test top-1 in 0..1, how it was chosen, epoch)`` of the model a card describes: the epoch
    selected on validation for ``best/``, else the last epoch."""
    if best:
        return number(summary.get("best_test_acc1")), SELECTED, summary.get("best_epoch")
    return number(summary.get("final_acc1")), NOT_SELECTED, summary.get("epochs_done")


def card_data(summary: dict[str, Any], recipe: dict[str, Any], *, best: bool):
    """The front matter: ``ModelCardData`` with timm as library, tags, datasets, licence and the
    test accuracy as ``model-index``."""
    from huggingface_hub import EvalResult, ModelCardData

    arch = summary.get("arch") or (recipe.get("model") or {}).get("arch") or "vit"
    dataset_id, _ = dataset_of(recipe.get("data") or {})
    dataset_name = data_used(recipe.get("data") or {}, summary)  # a 5-class run is no CIFAR-10 result
    acc, how, epoch = headline(summary, best=best)
    results = None
    if acc is not None:
        results = [EvalResult(
            task_type="image-classification", task_name="Image Classification",
            dataset_type=dataset_id or str((recipe.get("data") or {}).get("name", "images")),
            dataset_name=dataset_name, dataset_split="test",
            metric_type="accuracy", metric_value=round(acc, 6),
            metric_name=f"Test top-1 (epoch {epoch}, {how})",
        )]
    source = summary.get("source")
    return ModelCardData(
        library_name="timm",
        pipeline_tag="image-classification",
        tags=["image-classification", "timm", "finetune", arch],
        datasets=[dataset_id] if dataset_id else None,
        metrics=["accuracy"],
        license=source_license(source),
        base_model=base_model(source),
        model_name=str(summary.get("name") or arch),
        eval_results=results,
    )


def data_used(data: dict[str, Any], summary: dict[str, Any]) -> str:
    """The data the run actually used, in words: the dataset, the classes when the recipe chose
    some (``data.classes``), and the subset when it trained on part of the training set."""
    _, name = dataset_of(data)
    classes = [str(c) for c in summary.get("classes") or []]
    if data.get("classes"):
        shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
        name += f", {len(classes)} of its classes ({shown})"
    if data.get("train_subset") is not None:
        name += f", a random subset of {summary.get('train_images', data['train_subset'])} training images"
    return name


def dataset_of(data: dict[str, Any]) -> tuple[str | None, str]:
    """``(the dataset's hub id or None, its name)`` from the recipe's ``data`` section."""
    name = str(data.get("name", "cifar10"))
    if name in HUB_DATASETS:
        return HUB_DATASETS[name]
    if name == "hf" and data.get("path"):
        path = str(data["path"])
        return (path if _is_hub_id(path) and not Path(path).expanduser().exists() else None), path
    if name == "imagefolder":
        return None, f"image folder {Path(str(data.get('root', 'data'))).name}"
    return None, "synthetic images" if name == "synthetic" else name


def source_license(source: str | None) -> str | None:
    """The licence timm records for a pretrained source (a timm name, or ``hf-hub:timm/NAME``);
    ``None`` for anything else (a file, another hub repo, no source): no licence is guessed."""
    cfg = _timm_cfg(source)
    return getattr(cfg, "license", None) if cfg is not None else None


def base_model(source: str | None) -> str | None:
    """The hub id of the pretrained source, when it is a hub model (``base_model`` metadata)."""
    if not source:
        return None
    if source.startswith("hf-hub:"):
        repo = source.removeprefix("hf-hub:").split("@")[0]
        return repo if _is_hub_id(repo) else None
    cfg = _timm_cfg(source)
    return getattr(cfg, "hf_hub_id", None) if cfg is not None else None


def _timm_cfg(source: str | None):
    """timm's pretrained config for a timm name (``deit_tiny_patch16_224.fb_in1k``) or
    ``hf-hub:timm/NAME``; ``None`` otherwise. Read from timm's tables: no download."""
    if not source or Path(source).expanduser().exists():
        return None
    name = source.removeprefix("hf-hub:timm/") if source.startswith("hf-hub:timm/") else source
    if ":" in name or "/" in name:
        return None
    import timm.models

    try:
        return timm.models.get_pretrained_cfg(name)
    except (RuntimeError, ValueError, KeyError):
        return None


def _is_hub_id(text: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# The prose


def card_body(summary: dict[str, Any], recipe: dict[str, Any], recipe_text: str, *, best: bool,
              repo_id: str | None = None, config: dict[str, Any] | None = None) -> str:
    """The card's prose: what the model is, its results, its training, its recipe, how to load it."""
    fence = "````" if "```" in recipe_text else "```"  # a recipe quoting a fence cannot close ours
    saved = (recipe.get("output") or {}).get("save_model", True)
    usage = _usage(summary, repo_id, config or {}) if saved else "No model was saved (`output.save_model: false`)."
    return "\n\n".join([
        _introduction(summary, recipe, best=best),
        "## Results\n\n" + _results(summary, best=best),
        "## Training\n\n" + _training(summary, recipe),
        f"## Recipe\n\nThe run's resolved `recipe.yaml` (`finetune run recipe.yaml` trains it again):\n\n"
        f"{fence}yaml\n{recipe_text.rstrip()}\n{fence}",
        "## How to use\n\n" + usage,
    ]) + "\n"


def _introduction(summary: dict[str, Any], recipe: dict[str, Any], *, best: bool) -> str:
    name = summary.get("name") or "run"
    arch = summary.get("arch") or "?"
    source = summary.get("source")
    origin = f"fine-tuned from `{source}`" if source else "trained from scratch (random initialisation)"
    dataset = data_used(recipe.get("data") or {}, summary)
    classes = summary.get("classes") or []
    acc, how, epoch = headline(summary, best=best)
    text = f"# {name}\n\n"
    # This run's own figure, not the recipe's description (which says what the recipe aims at; it
    # is in the recipe below).
    text += (f"A `{arch}` image classifier {origin} on {dataset} ({len(classes)} classes) with finetune "
             f"(`train.mode: {summary.get('mode')}`): {_pct(acc)} test top-1 after epoch {epoch} "
             f"({how}). ")
    if not (recipe.get("output") or {}).get("save_model", True):
        text += "The run saved no model (`output.save_model: false`); this card records its results."
    elif best:
        text += f"This folder holds the model of epoch {summary.get('best_epoch')}, {SELECTED}."
    else:
        text += f"This folder holds the model after the last epoch (epoch {summary.get('epochs_done')})."
    return text


def _pct(value: Any) -> str:
    value = number(value)
    return "–" if value is None else f"{100 * value:.2f}%"


def _results(summary: dict[str, Any], *, best: bool) -> str:
    """The headline (the model in this folder, and how it was chosen) and both figures in a table."""
    acc, how, epoch = headline(summary, best=best)
    text = (f"**Test top-1 accuracy: {_pct(acc)}** ({how}; epoch {epoch} of {summary.get('epochs_done')}, "
            f"{summary.get('test_images', '?')} test images)\n\n")
    rows = [("last epoch" + ("" if best else " (this model)"), summary.get("epochs_done"), summary.get("final_acc1"),
             summary.get("final_val_acc1"), NOT_SELECTED)]
    if summary.get("selection") == "val":
        rows.append(("best epoch" + (" (this model)" if best else ""), summary.get("best_epoch"),
                     summary.get("best_test_acc1"), summary.get("best_val_acc1"), SELECTED))
    text += "| model | epoch | test top-1 | validation top-1 | how it was chosen |\n|---|---|---|---|---|\n"
    text += "\n".join(f"| {m} | {e} | {_pct(t)} | {_pct(v)} | {h} |" for m, e, t, v, h in rows)
    text += f"\n\nTest top-5 of the final model: {_pct(summary.get('final_acc5'))}.\n\n"
    if summary.get("selection") == "val":
        text += (f"The best epoch was chosen on a validation split of {summary.get('val_images')} images held out "
                 "of the training set; the test set played no part in choosing it.")
    else:
        text += ("The run had no validation split, so no epoch was selected: the figure is the test accuracy "
                 "after the last epoch.")
    if not best and summary.get("selection") == "val":
        text += f" The model {SELECTED} is in `best/`, with its own card."
    return text


def _duration(seconds: Any) -> str:
    s = number(seconds)
    if s is None:
        return "?"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.2f} h"


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "?"


def _device(summary: dict[str, Any]) -> str:
    """Where it trained, in words; a CPU's times are called CPU figures."""
    device, name = str(summary.get("device") or "?"), summary.get("device_name") or ""
    if device.startswith("cpu"):
        threads = summary.get("cpu_threads")
        count = f"{threads} thread{'' if threads == 1 else 's'}" if threads else ""
        about = [n for n in (name if name != "cpu" else "", count) if n]
        return "a CPU" + (f" ({', '.join(about)})" if about else "") + ": CPU figures"
    if device.startswith("cuda"):
        return f"a GPU ({name or device})"
    return f"{name or device} ({device})"


def _training(summary: dict[str, Any], recipe: dict[str, Any]) -> str:
    source = summary.get("source")
    classes = [str(c) for c in summary.get("classes") or []]
    shown = ", ".join(classes[:20]) + (f", ... ({len(classes)} in all)" if len(classes) > 20 else "")
    versions = summary.get("versions") or {}
    lines = [
        f"- Source: `{source}` (pretrained weights)" if source else "- Source: none, trained from scratch",
        f"- Data: {data_used(recipe.get('data') or {}, summary)}: {summary.get('train_images')} training, "
        f"{summary.get('val_images', 0)} validation and {summary.get('test_images')} test images; classes: {shown}",
        f"- Epochs: {summary.get('epochs_done')} ({summary.get('steps')} optimizer steps): "
        f"{_duration(summary.get('train_time_s'))} of training ({_duration(summary.get('wall_time_s'))} wall clock) "
        f"on {_device(summary)}",
        f"- Precision {summary.get('precision')}; {(number(summary.get('images_per_s')) or 0):,.0f} training "
        f"images/s; {_count(summary.get('params_trainable'))} of {_count(summary.get('params_total'))} parameters trained",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v),
    ]
    if summary.get("resumed"):
        lines.append(f"- Resumed {len(summary['resumed'])} time(s) from a checkpoint; the times count every process")
    return "\n".join(lines)


PLACEHOLDER = "REPO_ID"
_PLACEHOLDER_NOTE = "`REPO_ID` is where the folder was pushed"


def _usage(summary: dict[str, Any], repo_id: str | None, config: dict[str, Any]) -> str:
    """How plain timm (and finetune) load the folder and preprocess a photo as the run's evaluation
    did, from its config.json; a preset with finetune's own layers says that it needs finetune."""
    from ..models.presets import PRESETS

    arch = config.get("architecture") or summary.get("arch")
    where = repo_id or PLACEHOLDER
    needs_finetune = arch in PRESETS  # a preset saved under its own name: only finetune can build it
    stored = config.get("stored_size")  # beside pretrained_cfg: plain timm does not keep it, so the card states it
    code = ("import timm\n" + ("import finetune.models.presets  # this architecture is built by finetune's code\n"
                               if needs_finetune else "")
            + "from PIL import Image\n"
            + f'\nmodel = timm.create_model("hf-hub:{where}", pretrained=True).eval()\n'
            '# or from a copy of this folder: timm.create_model("local-dir:PATH/TO/FOLDER", pretrained=True)\n'
            "config = timm.data.resolve_data_config(model=model)  # the input size, interpolation, mean, std it was evaluated with\n"
            "transform = timm.data.create_transform(**config)\n"
            'classes = model.pretrained_cfg["label_names"]\n'
            'image = Image.open("photo.jpg").convert("RGB")\n')
    if stored:
        code += ("# The run kept its images at stored_size and resized them from there to the model's input:\n"
                 "# bring a photo to that (square) size first: shorter side, then the centre, as its evaluation did.\n"
                 "import torchvision.transforms as T\n"
                 f"stored = {list(stored)}  # config.json's stored_size\n"
                 'resample = T.InterpolationMode(config["interpolation"])\n'
                 "image = T.CenterCrop(stored)(T.Resize(min(stored), interpolation=resample)(image))\n")
    code += "probs = model(transform(image).unsqueeze(0)).softmax(-1)"
    text = f"```python\n{code}\n```\n\n"
    if needs_finetune:
        text += (f"`{arch}` uses layers of finetune's own (a convolutional tokenizer): `pip install` finetune and "
                 "import `finetune.models.presets` before timm builds it.\n\n")
    if stored:
        text += (f"The run stored its images at {stored[0]}x{stored[1]} (`stored_size` in config.json, a key timm "
                 "ignores) before resizing them to the model's input. timm's transform alone resizes a photo "
                 "straight to the input size, a sharper input than the model learned on: on one of finetune's "
                 "measured models (stored at 24 px, fed at 32) that cost 15.6 points of test top-1.\n\n")
    if not repo_id:
        text += f"{_PLACEHOLDER_NOTE} (`finetune push RUN_DIR REPO_ID`).\n\n"
    text += (f"With finetune, which does all of this itself: `finetune predict hf-hub:{where} photo.jpg`, or "
             f"`finetune.load_model(\"hf-hub:{where}\")`.")
    return text
