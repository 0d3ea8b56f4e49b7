"""The recipe schema: one frozen pydantic section per part of a run (``model``, ``train``,
``optim``, ``schedule``, ``data``, ``output``) and :class:`Recipe`, which holds them and checks the
rules between them. The plain words messages use for types and values (``a number or null``) are in
:mod:`.words`; the rules for ``model.args`` in :mod:`.model_args`.

Field names are a contract with the engine and the command line; every field has a description,
which ``finetune validate`` and the docs show.
"""

from __future__ import annotations

import re
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from .model_args import recipe_arg_problem
from .words import describe_type, section_type, short_repr  # noqa: F401  (section_type: imported from here)

TrainMode = Literal["head", "full", "last_k", "scratch", "lora", "bitfit", "attn"]
"""What a run trains (``train.mode``); ``finetune.models.params.set_trainable`` implements each."""
TRAIN_MODES: tuple[str, ...] = get_args(TrainMode)
MAX_IMG_SIDE = 16_384
"""Largest ``model.img_size`` per side: ``finetune.models.pos_embed.MAX_GRID_SIDE`` patches of 16 px."""
PRESET_PATCH_SIZES: dict[str, int] = {
    "vit_lab": 4, "vit_cifar_s": 4, "vit_cifar_b": 4, "vit_cifar_xs": 4, "vit_tiny_test": 8,
}
"""Patch sizes of the from-scratch presets of ``finetune.models.presets`` that cut images into
patches (a test keeps the two equal), so that ``finetune validate`` refuses an image size they
cannot split without importing torch. Other sources' patch sizes are known only once they load,
which refuses such sizes then (``finetune.models.pos_embed.check_image_size``)."""
MAX_NAME_BYTES = 200
"""Longest ``name`` in UTF-8 bytes: it is a folder under ``output.dir``, and the names finetune
gives beside it (``.NAME.replaced-<time>-<hex>`` for an overwritten run, 33 bytes more) must stay
within the 255-byte file-name limit of common file systems."""
MAX_SEED = 2**32 - 1
"""Largest ``seed``: NumPy's global seed, set from it, takes 0 to 2**32 - 1."""


# ---------------------------------------------------------------------------------------------
# Schema. Field names are a contract with the engine and the command line.
# ---------------------------------------------------------------------------------------------


class _Section(BaseModel):
    """Base of every recipe model: strict about keys, frozen, and no booleans posing as numbers."""

    # Frozen so that a validated recipe cannot drift from what was checked, and so it is hashable.
    # Numbers are accepted for text fields because an override like `name=2024` reads as an int.
    # No float of a recipe means anything at inf or nan (a learning rate, a std, a timeout), and a
    # bound like `gt=0` lets inf through: refuse both for every float field.
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads `batch_size: true` as 1 and `lr: true` as 1.0.
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and annotation is not bool and bool not in get_args(annotation):
            raise ValueError(f"expected {describe_type(annotation)}, got {short_repr(value)}")
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
    args: dict[str, Any] = Field(
        default_factory=dict,
        description="Constructor arguments of a model built from scratch (train.mode scratch), on top of "
        "model.arch's: e.g. {embed_dim: 192, depth: 6, num_heads: 3, mlp_ratio: 2.0}, or a conv tokenizer's "
        "stem_channels: [32, 64, 128] (each stage halves the grid). Plain numbers, flags, short names and "
        "lists of numbers, each within the bounds a saved config.json is held to (checked when the recipe "
        "validates); they are saved with the model, so eval, predict and export rebuild it. img_size, "
        "patch_size, num_classes and drop_path_rate have their own keys.",
    )

    @field_validator("args")
    @classmethod
    def _plain_args(cls, value: dict[str, Any]) -> dict[str, Any]:
        problems = [p for key, arg in value.items() if (p := recipe_arg_problem(key, arg)) is not None]
        if problems:
            raise ValueError("; ".join(problems))
        return value

    def __hash__(self) -> int:
        # A recipe is hashable; model.args is the one mapping in it, hashed as sorted pairs.
        frozen = {k: tuple(v) if isinstance(v, list) else v for k, v in self.args.items()}
        return hash(tuple((name, tuple(sorted(frozen.items())) if name == "args" else getattr(self, name))
                          for name in type(self).model_fields))

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
    epochs: int = Field(1, ge=1, description="Passes over the training set; ignored with train.time_budget.")
    time_budget: float | None = Field(
        None, gt=0.0, description="Minutes of training (evaluation not counted); null: off. At start-up the run times "
        "its own training step on a copy for a few seconds and plans its optimizer steps so that the whole schedule "
        "(warm-up, then the decay to schedule.min_lr) ends inside the budget less a 5% margin; train.epochs is then "
        "ignored (the plan sets the epochs, the last one cut short) and finetune resume keeps the recorded plan."
    )
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Autocast dtype. auto: bf16 on a GPU that has it (else fp16); on a CPU, fp32 unless bf16 "
        "trains this model clearly faster in a start-up check of interleaved steps (at most about 5 s; summary.json: "
        "precision_choice); fp32 or bf16 skips the check. fp16 falls back to fp32 on a CPU."
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
    seed: int = Field(0, ge=0, le=MAX_SEED, description=f"Random seed, 0 to {MAX_SEED:,} (2**32 - 1).")
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
        if value is not None:
            check_name_length(value)
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> Recipe:
        """Cross-field rules; all broken rules are reported together, one per line."""
        model, train, data = self.model, self.train, self.data
        problems = _source_problems(model, train)
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
        if self.schedule.warmup_epochs > train.epochs and train.time_budget is None:  # else checked by the plan
            problems.append(
                f"schedule.warmup_epochs: {self.schedule.warmup_epochs} is longer than train.epochs "
                f"({train.epochs}), so the learning rate would never reach optim.lr"
            )
        preset_patch = PRESET_PATCH_SIZES.get(model.arch) if train.mode == "scratch" else None
        patch = model.patch_size or preset_patch
        if model.img_size is not None and patch is not None:
            sizes = (model.img_size,) * 2 if isinstance(model.img_size, int) else model.img_size
            bad = next((s for s in sizes if s % patch), None)
            if bad is not None:
                whose = f"model.patch_size ({patch})" if model.patch_size else f"{model.arch}'s patch size ({patch})"
                nearest = sorted({max(patch, bad // patch * patch), (bad // patch + 1) * patch})
                problems.append(
                    f"model.img_size: {model.img_size!r} is not a multiple of {whose}, so the image does not split "
                    f"into whole patches; use e.g. {' or '.join(map(str, nearest))}"
                    + ("" if model.patch_size else ", or set model.patch_size")
                )
        if problems:
            raise ValueError("\n".join(problems))
        return self


def _source_problems(model: ModelConfig, train: TrainConfig) -> list[str]:
    """Where the weights come from: a preset (and its args) from scratch, a source otherwise."""
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
    if model.args and train.mode != "scratch":
        problems.append(
            f"model.args: shapes a model built from scratch, but train.mode is {train.mode!r}, whose shape comes "
            "from the pretrained weights; remove model.args, or use train.mode scratch"
        )
    return problems


def check_name_length(name: str) -> None:
    """Refuse a run name too long for a folder name (:data:`MAX_NAME_BYTES`).

    Raises:
        ValueError: the name's UTF-8 bytes exceed the limit.
    """
    size = len(name.encode("utf-8", "surrogateescape"))
    if size > MAX_NAME_BYTES:
        raise ValueError(
            f"is {size} bytes long ({short_repr(name)}); a run name becomes a folder name, and file systems "
            f"allow 255 bytes, so finetune takes at most {MAX_NAME_BYTES} (room for the names it gives beside "
            "the folder): choose a shorter name"
        )
