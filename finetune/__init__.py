"""finetune: fine-tune pretrained DeiT/ViT classifiers through timm, and compare them with a ViT
trained from scratch.

The library calls::

    from finetune import load_model, resize_pos_embed, set_trainable

    model = load_model("deit_tiny_patch16_224.fb_in1k", num_classes=10, img_size=32,
                       patch_size=4, pos_embed_mode="bicubic")
    print(set_trainable(model, "head"))

Names are imported on first use, so ``finetune validate`` and ``finetune ls`` start without
loading torch and timm.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "CheckpointError": "errors",
    "DataError": "errors",
    "DivergedError": "errors",
    "ExperimentError": "errors",
    "ExportError": "errors",
    "FinetuneError": "errors",
    "GridError": "errors",
    "OfflineError": "errors",
    "PushError": "errors",
    "RecipeError": "errors",
    "RunDirError": "errors",
    "RunInterrupted": "errors",
    "SourceNotFoundError": "errors",
    "LoadReport": "models.build",
    "create_model": "models.build",
    "load_model": "models.build",
    "reset_head": "models.build",
    "save_model": "models.saving",
    "ParamCounts": "models.params",
    "count_parameters": "models.params",
    "param_groups": "models.params",
    "set_trainable": "models.params",
    "POS_EMBED_MODES": "models.pos_embed",
    "resize_model_input": "models.pos_embed",
    "resize_pos_embed": "models.pos_embed",
    "PRESETS": "models.presets",
    "attention_maps": "viz.visual",
    "attention_rollout": "viz.visual",
    "attention_rollout_matrix": "viz.visual",
    "denormalise": "viz.visual",
    "last_layer_attention": "viz.visual",
    "most_confident_mistakes": "viz.visual",
    "patch_grid": "viz.visual",
    "pos_embed_similarity": "viz.visual",
    "training_samples": "viz.visual",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
