"""Networks: where they come from, how they are built and saved, and how they are changed.

Owns checkpoint sources (timm names, the Hugging Face hub, local folders and files, and
transformers ViT/DeiT checkpoints converted to timm's layout) and reading them safely, building
and saving models (``load_model``, ``create_model``, ``save_model``), surgery on a loaded model
(position embeddings, relative position tables, rotary embeddings, windows, patch kernels, input
size), the from-scratch presets, and which parameters train (``set_trainable``, LoRA, BitFit,
parameter groups).

May import: :mod:`finetune.errors`, :mod:`finetune.snapshot`, :mod:`finetune.hub`, :mod:`finetune.recipe`
(types only).
Nothing here imports data, training, runs, experiments, viz or the CLI.
"""
