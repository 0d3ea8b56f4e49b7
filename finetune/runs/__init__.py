"""Run folders: creating, locking and replacing them, what is written into them, and the
``run``/``resume`` orchestration that ties a recipe, a training state and a folder together.

May import: :mod:`finetune.errors`, :mod:`finetune.snapshot`, :mod:`finetune.recipe`,
:mod:`finetune.data`, :mod:`finetune.models`, :mod:`finetune.training`, and the TensorBoard
callback of :mod:`finetune.viz`. Nothing here imports experiments or the CLI.
"""
