"""The constructor arguments a model may be given from a file: a recipe's ``model.args`` or a
saved model's ``config.json`` (``model_args``). Plain numbers, flags and short layer names, each
bounded, so that neither kind of file can make timm open another file or build something
unbounded. Free of torch, so a recipe validates without it; :mod:`finetune.models.reading`
applies the same rules to a model folder and adds the checks against its weights.
"""

from __future__ import annotations

import difflib
import math
import re
from typing import Any

# What a model folder may ask of timm's ViT-family constructors (ViT, EVA, BEiT, Swin, Swin V2):
# numbers, flags and layer names, each bounded. Anything else (checkpoint_path,
# pretrained_cfg_overlay, pretrained, a class...) could make timm open another file or build
# something unbounded, so it is refused.
FLAG_ARGS = ("qkv_bias", "qk_norm", "scale_attn_norm", "scale_mlp_norm", "proj_bias", "class_token", "no_embed_class",
             "pre_norm", "final_norm", "pool_include_prefix", "dynamic_img_size", "dynamic_img_pad", "fix_init",
             # EVA, BEiT and Swin
             "use_rot_pos_emb", "use_abs_pos_emb", "use_rel_pos_bias", "use_shared_rel_pos_bias", "swiglu_mlp",
             "scale_mlp", "scale_attn_inner", "qkv_fused", "use_fc_norm", "always_partition", "strict_img_size")
MAX_CLASSES = 1_000_000
"""Most classes a head may have, from a config.json or ``load_model``/``create_model``'s ``num_classes``:
far beyond any classification set (ImageNet-21k has 21,841), yet a ViT-B head of this size still fits
in memory (3 GB)."""
INT_ARGS = {"depth": (1, 256), "embed_dim": (1, 16384), "reg_tokens": (0, 64),
            "in_chans": (1, 64), "num_classes": (0, MAX_CLASSES)}
# One whole number, or one per stage (Swin's depths and heads): at most MAX_STAGES of them.
STAGE_ARGS = {"num_heads": (1, 1024), "depths": (1, 256)}
MAX_STAGES = 8
SIZE_ARGS = {"img_size": (1, 16384), "patch_size": (1, 1024), "ref_feat_shape": (1, 1024)}
RATE_ARGS = ("drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate")
NAME_ARGS = ("global_pool", "pos_embed", "weight_init", "act_layer", "norm_layer", "embed_norm_layer")
ALLOWED_MODEL_ARGS = (*FLAG_ARGS, *INT_ARGS, *STAGE_ARGS, *SIZE_ARGS, *RATE_ARGS, *NAME_ARGS, "mlp_ratio",
                      "init_values", "fc_norm", "window_size", "pretrained_window_sizes", "head_dim", "norm_eps",
                      "stem_channels")


RECIPE_OWN_KEYS = {"img_size": "model.img_size", "patch_size": "model.patch_size", "num_classes": "model.num_classes",
                   "drop_path_rate": "model.drop_path_rate"}
"""Constructor arguments a recipe sets with a key of its own, not through ``model.args``."""


def recipe_arg_problem(key: Any, value: Any) -> str | None:
    """What is wrong with one entry of a recipe's ``model.args``, or None: the rules of a saved
    model's config.json (:func:`arg_problem`, with its did-you-mean for a misspelt name), and what
    a recipe sets elsewhere or cannot use (its images are RGB; its head classifies pooled features)."""
    if not (isinstance(key, str) and key.isidentifier() and len(key) <= 40):
        return f"{short(key)} is not an argument name (letters, digits and _)"
    if key in RECIPE_OWN_KEYS:
        return f"{key} has its own key: set {RECIPE_OWN_KEYS[key]} instead of model.args.{key}"
    if key == "in_chans":
        return "in_chans: the images a run reads are RGB (3 channels); remove it"
    if key == "global_pool" and value == "":
        return "global_pool='' leaves the head without pooled features; use 'avg' or 'token'"
    return arg_problem(key, value)


def arg_problem(key: str, value: Any) -> str | None:
    """What is wrong with one model argument (``depth=100000 should be ...``), or None."""

    def why(text: str) -> str:
        return f"{key}={short(value)} {text}"

    if key not in ALLOWED_MODEL_ARGS:
        near = difflib.get_close_matches(key, ALLOWED_MODEL_ARGS, n=1)
        return f"{key!r} is not an argument finetune passes on" + (
            f"; did you mean {near[0]!r}?" if near else
            " (it takes e.g. depth, embed_dim, num_heads, mlp_ratio, stem_channels, qkv_bias, global_pool)")
    if key in FLAG_ARGS and not isinstance(value, bool):
        return why("should be true or false")
    if key == "fc_norm" and not (value is None or isinstance(value, bool)):
        return why("should be true, false or null")
    if key in INT_ARGS and not int_in(value, *INT_ARGS[key]):
        return why(f"should be a whole number from {INT_ARGS[key][0]} to {INT_ARGS[key][1]}")
    if key in SIZE_ARGS and not size_in(value, *SIZE_ARGS[key]):
        return why(f"should be a whole number (or two) from {SIZE_ARGS[key][0]} to {SIZE_ARGS[key][1]}")
    if key == "pretrained_window_sizes" and not (int_in(value, 0, 1024) or per_stage(value, size_in, 0, 1024)):
        return why(f"should be a whole number from 0 to 1024, or one (or two) per stage (at most {MAX_STAGES})")
    if key in STAGE_ARGS and not (int_in(value, *STAGE_ARGS[key]) or per_stage(value, int_in, *STAGE_ARGS[key])):
        return why(f"should be a whole number from {STAGE_ARGS[key][0]} to {STAGE_ARGS[key][1]}, or one per "
                   f"stage (at most {MAX_STAGES})")
    if key == "window_size" and not (size_in(value, 1, 1024) or per_stage(value, size_in, 1, 1024)):
        return why(f"should be a whole number (or two) from 1 to 1024, or one such per stage (at most {MAX_STAGES})")
    if key == "stem_channels" and not per_stage(value, int_in, 1, 4096):
        return why(f"should be a list of 1 to {MAX_STAGES} whole numbers from 1 to 4096 (channels per conv stage)")
    if key == "head_dim" and not (value is None or int_in(value, 1, 4096)):
        return why("should be null or a whole number from 1 to 4096")
    if key in RATE_ARGS and not number_in(value, 0.0, 1.0, high_open=True):
        return why("should be a number in [0, 1)")
    if key in NAME_ARGS and not (isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_]{0,40}", value)):
        return why("should be a short name such as 'token', 'avg' or 'gelu'")
    if key == "mlp_ratio" and not number_in(value, 0.0, 64.0, low_open=True):
        return why("should be a number in (0, 64]")
    if key == "norm_eps" and not number_in(value, 0.0, 0.1, low_open=True):  # LayerNorm eps
        return why("should be a number in (0, 0.1]")
    if key == "init_values" and not (value is None or number_in(value, 0.0, 10.0)):
        return why("should be null or a number in [0, 10]")
    return None


def int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def size_in(value: Any, low: int, high: int) -> bool:
    """One whole number in ``low..high``, or a pair of them (an (H, W) size)."""
    return int_in(value, low, high) or (
        isinstance(value, (list, tuple)) and len(value) == 2 and all(int_in(v, low, high) for v in value))


def per_stage(value: Any, check: Any, low: int, high: int) -> bool:
    """A list of 1 to :data:`MAX_STAGES` values, each passing ``check(v, low, high)``."""
    return (isinstance(value, (list, tuple)) and 1 <= len(value) <= MAX_STAGES
            and all(check(v, low, high) for v in value))


def number_in(value: Any, low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return (value > low if low_open else value >= low) and (value < high if high_open else value <= high)


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
