"""Recipes: YAML files validated once, at the edge, into typed objects.

A recipe is a YAML mapping with the sections ``model``, ``train``, ``optim``, ``schedule``,
``data`` and ``output``. :func:`load_recipe` reads it, applies ``key.sub=value`` overrides from
the command line and validates the result into a frozen :class:`Recipe`; everything after that
works with typed attributes, never with raw dicts. Every mistake a user can make here (a file that
is missing, bad YAML, an unknown key, a wrong type, settings that contradict each other) becomes a
:class:`RecipeError` whose message names the file, the dotted key and what to do.
"""

from __future__ import annotations

import copy
import difflib
import re
import reprlib
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from finetune.errors import RecipeError

SHIPPED_RECIPES = Path(__file__).resolve().parent.parent / "recipes"
"""The recipes folder of the repository, next to the package."""

TrainMode = Literal["head", "full", "last_k", "scratch", "lora", "bitfit", "attn"]
"""What a run trains (``train.mode``); ``finetune.params.set_trainable`` implements each."""
TRAIN_MODES: tuple[str, ...] = get_args(TrainMode)
MAX_IMG_SIDE = 16_384
"""Largest ``model.img_size`` per side: ``finetune.pos_embed.MAX_GRID_SIDE`` patches of 16 px."""


# ---------------------------------------------------------------------------------------------
# Schema. Field names are a contract with the engine and the command line.
# ---------------------------------------------------------------------------------------------


class _Section(BaseModel):
    """Base of every recipe model: strict about keys, frozen, and no booleans posing as numbers."""

    # Frozen so that a validated recipe cannot drift from what was checked, and so it is hashable.
    # Numbers are accepted for text fields because an override like `name=2024` reads as an int.
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads `batch_size: true` as 1 and `lr: true` as 1.0.
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and annotation is not bool and bool not in get_args(annotation):
            raise ValueError(f"expected {_describe(annotation)}, got {_brief(value)}")
        return value


class ModelConfig(_Section):
    """Which network to build and how to adapt its checkpoint."""

    source: str | None = Field(
        None,
        description="Pretrained weights: a timm name with optional tag (deit_tiny_patch16_224.fb_in1k), "
        "hf-hub:org/name, a local file or folder, or a finetune run directory.",
    )
    arch: str | None = Field(
        None,
        description="timm architecture when the source does not name it, or a from-scratch preset "
        "such as vit_lab.",
    )
    num_classes: int | None = Field(
        None, ge=1, description="Classes of the new head; null uses the dataset's."
    )
    img_size: int | tuple[int, int] | None = Field(
        None, description=f"Model input size in pixels (int or [height, width], each 1 to {MAX_IMG_SIDE:,}); null "
        "keeps the model's. The run checks, before any data loads, that its images and tokens fit in memory."
    )
    patch_size: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Patch size; null keeps the checkpoint's, another value resamples the patch embedding.",
    )
    pos_embed_mode: Literal["bicubic", "bilinear", "nearest", "truncate", "crop"] = Field(
        "bicubic", description="How position embeddings are fitted to a new patch grid."
    )
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0, description="Stochastic depth rate.")
    strict: bool = Field(True, description="Fail when checkpoint keys do not load into the model.")

    @field_validator("img_size")
    @classmethod
    def _positive_size(cls, value: int | tuple[int, int] | None) -> int | tuple[int, int] | None:
        sizes = (value,) if isinstance(value, int) else value or ()
        if any(s < 1 for s in sizes):
            raise ValueError(f"must be a positive number of pixels, got {value!r}")
        if any(s > MAX_IMG_SIDE for s in sizes):
            raise ValueError(
                f"must be at most {MAX_IMG_SIDE:,} pixels per side, got {value!r}: the largest input a ViT's "
                "position embedding is resized to (1,024 patches of 16 px); a run at that size also needs the "
                "memory, which it checks before loading data"
            )
        return value


class LoraConfig(_Section):
    """Low-rank adapters (train.mode lora), through Hugging Face peft."""

    r: int = Field(8, ge=1, le=1024, description="Rank of each adapter.")
    alpha: float = Field(16.0, gt=0.0, description="Scale of the adapters' update: alpha / r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapters' input.")
    target_modules: tuple[str, ...] = Field(
        ("qkv",), min_length=1, description="Linear layers that get adapters (timm ViT names: qkv, proj, fc1, fc2)."
    )


class TrainConfig(_Section):
    """What is trained, for how long and with which numerics."""

    mode: TrainMode = Field(
        "full",
        description="head: train only the classifier; full: all layers; last_k: the last k blocks and "
        "the head; scratch: a new model from random weights; lora: low-rank adapters (train.lora) and the "
        "head; bitfit: biases and the head; attn: attention weights (qkv, proj) and the head.",
    )
    last_k: int = Field(0, ge=0, description="Number of final blocks to train in last_k mode.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="Adapters for train.mode lora.")
    bitfit_norms: bool = Field(False, description="In bitfit mode, also train the norm layers' weights.")
    epochs: int = Field(1, ge=1, description="Passes over the training set.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Autocast dtype. auto: bf16 on a GPU that has it (else fp16); on a CPU, bf16 or fp32, "
        "whichever trains this model faster, measured at start-up (summary.json: precision_choice). fp16 falls "
        "back to fp32 on a CPU."
    )
    cpu_threads: int | None = Field(
        None, ge=1, le=1024, description="Threads per process on a CPU; null: the physical cores, shared among "
        "the processes on this machine."
    )
    compile: bool = Field(False, description="Wrap the model in torch.compile.")
    channels_last: bool = Field(False, description="Use channels-last memory format for images and model.")
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=1.0, description="Label smoothing of the cross-entropy loss."
    )
    mixup_alpha: float = Field(0.0, ge=0.0, description="Mixup beta-distribution alpha; 0 turns mixup off.")
    cutmix_alpha: float = Field(
        0.0, ge=0.0, description="CutMix beta-distribution alpha; 0 turns CutMix off."
    )
    ema: bool = Field(False, description="Keep an exponential moving average of the weights and evaluate it.")
    ema_decay: float = Field(
        0.9998, gt=0.0, lt=1.0, description="Decay of the weight EMA per optimizer step, from the second step "
        "on (the first sets the average to the weights): it averages over about 1 / (1 - ema_decay) steps, 5,000 "
        "at 0.9998."
    )
    ema_warmup: bool = Field(
        False, description="Ramp the EMA decay up as timm's ModelEmaV3 warm-up does: at step t it is min(ema_decay, "
        "1 - t^(-2/3)), so the average spans only about t^(2/3) steps until the ramp reaches ema_decay: 0.99 after "
        "1,000 steps, 0.999 after 31,600, 0.9998 after 354,000. The run warns with the decay it ends at."
    )
    clip_grad: float | None = Field(
        None, gt=0.0, description="Clip the gradient norm to this value; null: no clipping."
    )
    @property
    def mixing(self) -> bool:
        """True when Mixup or CutMix is on (they pair the images of a batch)."""
        return bool(self.mixup_alpha or self.cutmix_alpha)

    log_every: int = Field(50, ge=1, description="Optimizer steps between metrics lines.")
    eval_every: int = Field(1, ge=1, description="Epochs between evaluations.")
    dist_timeout: float = Field(
        300.0, ge=1.0, description="With several processes (torchrun): seconds a process waits for one that "
        "stopped answering before the run fails."
    )


class OptimConfig(_Section):
    """The optimizer."""

    name: Literal["sgd", "adamw", "adam"] = Field("adamw", description="Optimizer.")
    lr: float = Field(5e-4, gt=0.0, description="Peak learning rate.")
    weight_decay: float = Field(0.05, ge=0.0, description="Weight decay (decoupled for adamw).")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="Momentum, used by sgd only.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas.")
    layer_decay: float | None = Field(
        None, gt=0.0, le=1.0, description="Layer-wise learning-rate decay in (0, 1]; null: off."
    )
    fused: bool | None = Field(
        None, description="Use torch's fused optimizer kernel; null: fused on CUDA and on the CPU "
        "(summary.json: optimizer_kernel)."
    )

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError(f"each beta must be in [0, 1), got {list(value)}")
        return value


class ScheduleConfig(_Section):
    """The learning-rate schedule, stepped per optimizer step."""

    name: Literal["cosine", "constant", "step"] = Field("cosine", description="Schedule after warmup.")
    warmup_epochs: float = Field(
        0.0, ge=0.0, description="Linear warmup length in epochs (fractions allowed)."
    )
    warmup_lr: float = Field(1e-6, ge=0.0, description="Learning rate at the start of warmup.")
    min_lr: float = Field(1e-6, ge=0.0, description="Final learning rate of the cosine schedule.")
    step_epochs: int = Field(30, ge=1, description="Epochs between decays of the step schedule.")
    step_gamma: float = Field(
        0.1, gt=0.0, le=1.0, description="Factor applied at each step of the step schedule."
    )


class AugmentConfig(_Section):
    """Training augmentation, applied to whole batches on the device."""

    hflip: bool = Field(True, description="Random horizontal flip.")
    crop_padding: int = Field(
        4, ge=0, description="Random crop after padding by this many pixels at stored resolution; 0: off."
    )
    random_resized_crop: bool = Field(False, description="Random resized crop instead of pad-and-crop.")
    rrc_scale: tuple[float, float] = Field((0.35, 1.0), description="Area range of the random resized crop.")

    @field_validator("rrc_scale")
    @classmethod
    def _scale_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"must be [low, high] with 0 < low <= high <= 1, got {list(value)}")
        return value


class DataConfig(_Section):
    """The dataset and how it is fed."""

    name: Literal["cifar10", "cifar100", "imagefolder", "hf", "synthetic"] = Field(
        "cifar10", description="Dataset: hf is a Hugging Face dataset (data.path)."
    )
    root: str = Field(
        "data",
        description="Download/cache folder; for imagefolder the folder holding train/ and test/ (or val/).",
    )
    path: str | None = Field(
        None,
        description="For hf: a hub id (uoft-cs/cifar10), a save_to_disk folder, or parquet files named by split.",
    )
    image_column: str | None = Field(None, description="For hf: the image column; null finds the Image feature.")
    label_column: str | None = Field(None, description="For hf: the label column; null finds the ClassLabel feature.")
    download: bool = Field(True, description="Download the dataset when it is not under root.")
    batch_size: int = Field(128, ge=1, description="Training images per micro-batch.")
    eval_batch_size: int | None = Field(None, ge=1, description="Evaluation batch size; null: 2x batch_size.")
    train_subset: int | float | None = Field(
        None, description="Train on this many images (int) or this fraction (float in (0, 1]); null: all."
    )
    classes: tuple[str, ...] | None = Field(
        None, description="Keep only these classes (by name), relabelled 0..k-1 in this order; null: all."
    )
    val_split: int | float = Field(
        0, description="Images (int) or fraction (float in [0, 1)) of the train set held out for validation."
    )
    image_size: int | None = Field(
        None, ge=1, description="Size images are stored at in memory; null keeps the dataset's own size."
    )
    mean: tuple[float, float, float] | None = Field(
        None, description="Normalisation mean; null: the model's."
    )
    std: tuple[float, float, float] | None = Field(None, description="Normalisation std; null: the model's.")
    in_memory: bool | Literal["auto"] = Field(
        "auto",
        description="true: decode the whole dataset into memory and keep it on the device as uint8; false: "
        "stream it (image folders and hf), decoding each batch from the files; auto: in memory when it fits "
        "(on the device when it fits there too), else streamed.",
    )
    workers: int = Field(4, ge=1, le=64, description="Threads decoding images while streaming.")
    cache: bool = Field(
        True, description="Keep decoded image folders in the decode cache (~/.cache/finetune) and memory-map "
        "them at the next start instead of decoding again."
    )
    synthetic_train: int = Field(256, ge=1, description="Training images of the synthetic dataset.")
    synthetic_test: int = Field(128, ge=1, description="Test images of the synthetic dataset.")
    synthetic_classes: int = Field(10, ge=2, description="Classes of the synthetic dataset.")
    synthetic_size: int = Field(32, ge=1, description="Image size of the synthetic dataset.")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="Training augmentation.")

    @field_validator("train_subset")
    @classmethod
    def _subset_in_range(cls, value: int | float | None) -> int | float | None:
        if isinstance(value, float) and not 0.0 < value <= 1.0:
            raise ValueError(
                f"a float is a fraction in (0, 1], got {value}; "
                "write a number of images as an integer, e.g. 10000"
            )
        if isinstance(value, int) and value < 1:
            raise ValueError(f"must be at least 1 image, got {value}")
        return value

    @field_validator("val_split")
    @classmethod
    def _val_split_in_range(cls, value: int | float) -> int | float:
        if isinstance(value, float) and not 0.0 <= value < 1.0:
            raise ValueError(
                f"a float is a fraction in [0, 1), got {value}; "
                "write a number of images as an integer, e.g. 5000"
            )
        if isinstance(value, int) and value < 0:
            raise ValueError(f"must be 0 or more images, got {value}")
        return value

    @field_validator("std")
    @classmethod
    def _std_positive(cls, value: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if value is not None and min(value) <= 0:
            raise ValueError(f"every std must be > 0, got {list(value)}")
        return value


class OutputConfig(_Section):
    """Where and what a run writes."""

    dir: str = Field("runs", description="Folder that holds one sub-folder per run.")
    overwrite: bool = Field(
        False,
        description="Replace an existing run folder of the same name: it is moved aside when the new run "
        "starts and deleted once the new run finishes (a folder that is not a run is never touched).",
    )
    save_model: bool = Field(True, description="Save the fine-tuned weights (and the best epoch's, with a val split).")
    plots: bool = Field(True, description="Draw loss and accuracy plots.")
    checkpoint_every: int = Field(
        1, ge=0, description="Epochs between checkpoints of the full training state (0: only at the end "
        "and when stopped); finetune resume continues from the last one."
    )
    checkpoint_every_steps: int | None = Field(
        None, ge=1, description="Also checkpoint every this many optimizer steps, for long epochs; null: off."
    )
    tensorboard: bool = Field(
        False, description="Also write metrics and pictures for TensorBoard (RUN/tensorboard; needs the tensorboard extra)."
    )


class Recipe(_Section):
    """A complete, validated training recipe."""

    description: str = Field("", description="One-line summary shown by `finetune ls`.")
    name: str | None = Field(None, description="Run name; null: the recipe file's stem.")
    seed: int = Field(0, description="Random seed.")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The network.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The training loop.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="The optimizer.")
    schedule: ScheduleConfig = Field(
        default_factory=ScheduleConfig, description="The learning-rate schedule."
    )
    data: DataConfig = Field(default_factory=DataConfig, description="The dataset.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="The run folder.")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            raise ValueError(f"must be auto, cpu, cuda, cuda:N or mps, got {value!r}")
        return value

    @field_validator("name")
    @classmethod
    def _usable_as_folder(cls, value: str | None) -> str | None:
        # The name becomes a folder under output.dir, so it must stay one path component.
        if value is not None and (value in ("", ".", "..") or "/" in value or "\\" in value):
            raise ValueError(f"must be a plain folder name without slashes, got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> Recipe:
        """Cross-field rules; all broken rules are reported together, one per line."""
        model, train, data = self.model, self.train, self.data
        problems = []
        if train.mode == "scratch":
            if model.arch is None:
                problems.append(
                    "model.arch: train.mode 'scratch' builds a new model from a preset; set model.arch, "
                    "e.g. vit_lab"
                )
            if model.source is not None:
                problems.append(
                    f"model.source: train.mode 'scratch' starts from random weights, so model.source must "
                    f"be null (got {model.source!r}); remove it, or use train.mode full, head or last_k"
                )
        elif model.source is None:
            problems.append(
                f"model.source: train.mode {train.mode!r} fine-tunes pretrained weights; set model.source, "
                "e.g. deit_tiny_patch16_224.fb_in1k (or use train.mode scratch with model.arch)"
            )
        if train.mode == "last_k" and train.last_k < 1:
            problems.append(
                f"train.last_k: train.mode 'last_k' needs train.last_k >= 1 (how many final blocks to "
                f"train), got {train.last_k}"
            )
        if data.name == "hf" and not data.path:
            problems.append(
                "data.path: data.name 'hf' needs data.path, a hub id (uoft-cs/cifar10), a save_to_disk folder "
                "or parquet files"
            )
        if data.name == "imagefolder" and "root" not in data.model_fields_set:
            problems.append(
                "data.root: data.name 'imagefolder' needs data.root, the folder holding train/ and "
                "test/ (or val/)"
            )
        if (data.mean is None) != (data.std is None):
            problems.append("data.mean, data.std: set both or neither (null takes both from the model)")
        if self.schedule.warmup_epochs > train.epochs:
            problems.append(
                f"schedule.warmup_epochs: {self.schedule.warmup_epochs} is longer than train.epochs "
                f"({train.epochs}), so the learning rate would never reach optim.lr"
            )
        if model.img_size is not None and model.patch_size is not None:
            sizes = (model.img_size,) * 2 if isinstance(model.img_size, int) else model.img_size
            if any(s % model.patch_size for s in sizes):
                problems.append(
                    f"model.img_size: {model.img_size!r} is not a multiple of model.patch_size "
                    f"({model.patch_size})"
                )
        if problems:
            raise ValueError("\n".join(problems))
        return self


# ---------------------------------------------------------------------------------------------
# YAML reading.
# ---------------------------------------------------------------------------------------------


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-3`` as a float and rejects duplicate keys.

    PyYAML follows YAML 1.1, where a float needs a dot, so ``lr: 1e-3`` would be the string
    ``'1e-3'``; YAML 1.2 and every user read it as a number. A duplicate key would silently keep
    only the last value.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges are resolved by the base class
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789")
)


class RecipeDumper(yaml.SafeDumper):
    """SafeDumper that writes lists inline (``betas: [0.9, 0.999]``) and sections as blocks."""


RecipeDumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)
)


def parse_yaml(
    text: str, where: str, fix: str = "Check the indentation and write each entry as `key: value`."
) -> Any:
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # safe: a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        if "could not determine a constructor for the tag" in str(err.problem):
            tag = str(err.problem).rsplit("tag", 1)[-1].strip(" '")
            raise RecipeError(
                f"{where}{at} uses the YAML tag {tag}. Recipes hold plain values only, and finetune never "
                "builds objects from tags (nothing was run).",
                "Write the value as plain YAML: a number, text, true/false, a list or a mapping.",
            ) from None
        raise RecipeError(f"{where}: YAML syntax error{at}: {err.problem or err.context}.", fix) from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{where}: YAML syntax error: {err}.", fix) from None
    except RecursionError:
        raise RecipeError(f"{where}: the YAML is nested too deeply to be a recipe.", fix) from None


RECIPE_MAX_BYTES = 1 << 20
"""Largest recipe or experiment file read (1 MiB); real ones are a few kB."""


def read_yaml_file(path: Path, what: str = "recipe") -> Any:
    """Read and parse a recipe or experiment file: at most 1 MiB, UTF-8 text, plain YAML.

    Raises:
        RecipeError: the file cannot be read, is too large, is not UTF-8 text, or is not valid YAML.
    """
    try:
        size = path.stat().st_size
        if size > RECIPE_MAX_BYTES:
            raise RecipeError(
                f"{what} {str(path)!r} is {size:,} bytes; a {what} is a short YAML file (at most "
                f"{RECIPE_MAX_BYTES:,} bytes are read).",
                "Check that you passed the right file.",
            )
        data = path.read_bytes()
    except OSError as err:
        raise RecipeError(f"cannot read {what} {str(path)!r}: {err.strerror or err}.") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(
            f"{what} {str(path)!r} is not UTF-8 text (byte {err.start} cannot be decoded): it looks like a "
            "binary file.",
            "Pass a YAML file; recipes are plain text (see `finetune ls`).",
        ) from None
    if "\x00" in text:
        raise RecipeError(f"{what} {str(path)!r} contains NUL bytes: it is not a text file.", "Pass a YAML file.")
    return parse_yaml(text, path.name)


# ---------------------------------------------------------------------------------------------
# Overrides.
# ---------------------------------------------------------------------------------------------

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_OVERRIDE_EXAMPLE = "Write overrides as dotted.key=value, e.g. optim.lr=3e-4 data.batch_size=64"


def _split_override(override: str) -> tuple[str, Any]:
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not _KEY.fullmatch(key):
        raise RecipeError(f"bad override {override!r}.", _OVERRIDE_EXAMPLE + ".")
    return key, parse_yaml(text, f"override {override!r}", "Quote text values; write lists as [0.9, 0.99].")


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """Set dotted keys in a raw recipe mapping.

    Args:
        raw: The recipe as read from YAML; it is not modified.
        overrides: Items like ``optim.lr=3e-4``. The value is read as YAML, so ``true``, ``null``,
            ``[1, 2]`` and ``1e-3`` have their usual types. Missing sections are created.

    Returns:
        A new mapping with the overrides applied, still unvalidated.

    Raises:
        RecipeError: An override without ``=``, with a malformed key, or one that descends into a
            value that is not a section.
    """
    result = copy.deepcopy(raw)
    for override in overrides:
        key, value = _split_override(override)
        *parents, leaf = key.split(".")
        node = result
        for depth, part in enumerate(parents):
            child = node.get(part)
            if child is None:  # absent, or a YAML section left empty (`augment:`)
                child = node[part] = {}
            if not isinstance(child, dict):
                section = ".".join(parents[: depth + 1])
                raise RecipeError(
                    f"bad override {override!r}: {section!r} is a value ({_brief(child)}), not a section.",
                    _OVERRIDE_EXAMPLE + ".",
                )
            node = child
        node[leaf] = value
    return result


# ---------------------------------------------------------------------------------------------
# Turning pydantic's ValidationError into one line per bad field.
# ---------------------------------------------------------------------------------------------


def _section_type(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def valid_keys() -> list[str]:
    """All dotted leaf keys of the schema, e.g. ``optim.lr`` and ``data.augment.hflip``."""

    def walk(model: type[BaseModel], prefix: str) -> list[str]:
        keys = []
        for name, field in model.model_fields.items():
            section = _section_type(field.annotation)
            keys += walk(section, f"{prefix}{name}.") if section else [f"{prefix}{name}"]
        return keys

    return walk(Recipe, "")


def _describe(annotation: Any) -> str:
    """Plain-words type name for error messages: ``float | None`` -> 'a number or null'."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        words = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(words + (["null"] if type(None) in args else []))
    if origin is tuple:
        element = {float: "numbers", int: "integers", str: "strings"}.get(args[0], "values")
        return f"a list of {element}" if args[-1] is Ellipsis else f"a list of {len(args)} {element}"
    if _section_type(annotation):
        return "a section of keys (a mapping)"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        annotation, str(annotation)
    )


def suggest_key(path: list[str]) -> str | None:
    """Nearest valid key to an unknown dotted key: a close sibling, the same leaf elsewhere, or any."""
    keys = valid_keys()
    parent, leaf = path[:-1], path[-1]
    model: type[BaseModel] | None = Recipe
    for part in parent:
        model = (
            _section_type(model.model_fields[part].annotation)
            if model and part in model.model_fields
            else None
        )
    prefix = "".join(f"{p}." for p in parent)
    # The same name in another section first (train.lr -> optim.lr), then a close one in this section.
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    if same_leaf:
        return same_leaf[0]
    if model:
        siblings = difflib.get_close_matches(leaf, list(model.model_fields), n=1, cutoff=0.6)
        if siblings:
            return prefix + siblings[0]
    anywhere = difflib.get_close_matches(".".join(path), keys, n=1, cutoff=0.6)
    return anywhere[0] if anywhere else None


def _field_path(loc: tuple) -> tuple[list[str], Any]:
    """Schema field named by a pydantic error location, dropping union tags and tuple indices."""
    model: type[BaseModel] | None = Recipe
    path, annotation = [], None
    for item in loc:
        if model is None or item not in model.model_fields:
            break
        path.append(item)
        annotation = model.model_fields[item].annotation
        model = _section_type(annotation)
    return path, annotation


def _lookup(raw: Any, path: list[str]) -> Any:
    for part in path:
        raw = raw[part]
    return raw


_BRIEF = reprlib.Repr()  # Python 3.11's takes no arguments: set the limits one by one
_BRIEF.maxlevel, _BRIEF.maxdict, _BRIEF.maxlist, _BRIEF.maxtuple = 3, 6, 8, 8
_BRIEF.maxstring, _BRIEF.maxother, _BRIEF.maxlong = 60, 60, 40


def _brief(value: Any) -> str:
    """``repr`` cut short, so that a huge or deeply nested bad value gives a short message quickly."""
    return _BRIEF.repr(value)


_LIMITS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _error_lines(
    err: ValidationError, raw: dict, file_label: str, override_keys: dict[str, str]
) -> list[str]:
    """One message line per bad field, each starting with where the bad value came from."""

    def origin(dotted: str) -> str:
        # A key set (or whose section was set) on the command line is blamed on that override.
        for key, override in reversed(override_keys.items()):
            if dotted == key or dotted.startswith(key + ".") or key.startswith(dotted + "."):
                return f"override {override!r}"
        return file_label

    by_field: dict[str, str] = {}
    is_constraint: dict[str, bool] = {}
    for error in err.errors():
        kind, loc = error["type"], error["loc"]
        if kind == "extra_forbidden":
            dotted = ".".join(str(p) for p in loc)
            hint = suggest_key([str(p) for p in loc])
            message = f"unknown key {dotted!r}." + (f" Did you mean {hint!r}?" if hint else "")
            by_field.setdefault(dotted, f"{origin(dotted)}: {message}")
            continue
        path, annotation = _field_path(loc)
        dotted = ".".join(path)
        if kind == "value_error":
            # Our own validators; cross-field ones (empty path) already name their fields.
            text = str(error["ctx"]["error"])
            if not path:
                for line in text.splitlines():
                    by_field[line] = f"{origin(line.split(':', 1)[0])}: {line}"
                continue
            message, constraint = text, True
        elif kind in _LIMITS:
            limit = next(iter(error["ctx"].values()))  # ctx is {"gt": 0.0}, {"ge": 1}, ...
            message, constraint = f"must be {_LIMITS[kind]} {limit}, got {_brief(error['input'])}", True
        else:
            try:
                given = _lookup(raw, path)
            except (KeyError, TypeError):
                given = error["input"]
            message, constraint = f"expected {_describe(annotation)}, got {_brief(given)}", False
        # A union reports one error per member; a range error means the type itself was right.
        if dotted not in by_field or (constraint and not is_constraint[dotted]):
            by_field[dotted] = f"{origin(dotted)}: {dotted}: {message}"
            is_constraint[dotted] = constraint
    return list(by_field.values())


# ---------------------------------------------------------------------------------------------
# Public entry points.
# ---------------------------------------------------------------------------------------------


def recipe_from_dict(raw: Any, where: str = "recipe", overrides: Sequence[str] = ()) -> Recipe:
    """Validate a raw mapping (e.g. read from YAML) into a :class:`Recipe`.

    Args:
        raw: The unvalidated recipe mapping.
        where: How messages name the origin of the mapping, usually the file name.
        overrides: ``dotted.key=value`` items applied before validation.

    Raises:
        RecipeError: One line per bad field, or a bad override.
    """
    if not isinstance(raw, dict):
        got = "nothing (the file is empty)" if raw is None else f"{type(raw).__name__} {_brief(raw)}"
        raise RecipeError(
            f"{where}: the top level must be a mapping of keys and sections (model:, train:, ...), "
            f"got {got}.",
            "See the recipes that `finetune ls` lists for the layout.",
        )
    raw = apply_overrides(raw, overrides)
    override_keys = {_split_override(o)[0]: o for o in overrides}
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError("\n".join(_error_lines(err, raw, where, override_keys))) from None


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read, override and validate a recipe.

    Args:
        path: A YAML file, or the name of a shipped recipe (see :func:`find_recipe`).
        overrides: ``dotted.key=value`` items, e.g. ``("optim.lr=3e-4", "data.batch_size=64")``.

    Returns:
        The validated recipe; ``name`` defaults to the file's stem.

    Raises:
        RecipeError: A missing or unreadable file, bad YAML, a bad override or an invalid recipe.
    """
    file = find_recipe(path)
    recipe = recipe_from_dict(read_yaml_file(file), file.name, overrides)
    if recipe.name is None:
        recipe = recipe.model_copy(update={"name": file.stem})
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict:
    """Every field of the recipe, defaults included, as plain JSON/YAML types (tuples become lists)."""
    return recipe.model_dump(mode="json")


def computed_settings(recipe: Recipe | dict) -> dict:
    """The recipe as a dict without the keys that do not change what a run computes
    (``description``, ``output.dir``, ``output.overwrite``): runs with equal settings train alike.

    Args:
        recipe: a recipe, or :func:`recipe_to_dict`'s output.
    """
    data = copy.deepcopy(recipe_to_dict(recipe) if isinstance(recipe, Recipe) else recipe)
    data.pop("description", None)
    for key in ("dir", "overwrite"):
        data.get("output", {}).pop(key, None)
    return data


def dump_recipe_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML that :func:`load_recipe` reads back to an equal recipe."""
    header = "# Resolved recipe: defaults filled in, overrides applied. Rerun with: finetune run THIS_FILE name=NEW_NAME\n"
    return header + yaml.dump(recipe_to_dict(recipe), Dumper=RecipeDumper, sort_keys=False)


def is_experiment(raw: Any) -> bool:
    """True for an experiment file (``finetune compare``): a mapping with ``variants``."""
    return isinstance(raw, dict) and "variants" in raw


def list_recipes(directory: str | Path = SHIPPED_RECIPES) -> list[tuple[str, str]]:
    """``(file name, description)`` for each ``*.yaml`` recipe in ``directory``, sorted by name.

    Only the ``description:`` field is read; a file that is not valid YAML still gets listed so
    that ``finetune ls`` shows it, and ``finetune validate`` says what is wrong with it.
    """
    entries = []
    for file in sorted(Path(directory).glob("*.y*ml")):
        try:
            raw = read_yaml_file(file)
            description = str(raw.get("description", "")) if isinstance(raw, dict) else ""
            if is_experiment(raw):
                description = f"[finetune compare] {description}"
        except RecipeError:
            description = "(unreadable: run `finetune validate` on it)"
        entries.append((file.name, description))
    return entries


def find_recipe(name_or_path: str | Path) -> Path:
    """Locate a recipe file.

    Args:
        name_or_path: A path to a YAML file, or a bare name such as ``deit_tiny_cifar`` (with or
            without ``.yaml``), looked up in ``./recipes/`` and then in the shipped recipes folder.

    Raises:
        RecipeError: Nothing found; the message lists the shipped recipes.
    """
    given = Path(name_or_path)
    if given.is_file():
        return given
    if given.is_dir():
        raise RecipeError(f"recipe {str(given)!r} is a folder.", "Give the path of a .yaml file inside it.")
    names = [given.name] if given.suffix in (".yaml", ".yml") else [given.name + ".yaml", given.name + ".yml"]
    candidates = [given.with_name(n) for n in names]
    if given.parent == Path("."):  # a bare name, not a path that happens to be missing
        candidates += [folder / n for folder in (Path("recipes"), SHIPPED_RECIPES) for n in names]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    shipped = [Path(name).stem for name, _ in list_recipes(SHIPPED_RECIPES)]
    # Suggest only a name that is really close: `deit_tiny_cifr` -> deit_tiny_cifar, `nope` -> nothing.
    close = difflib.get_close_matches(Path(given.name).stem, shipped, n=1, cutoff=0.75)
    hint = f"Did you mean {close[0]!r}? " if close else ""
    raise RecipeError(
        f"recipe {str(name_or_path)!r} not found.",
        f"{hint}Give a path to a YAML file or a shipped recipe: {', '.join(shipped)}.",
    )
