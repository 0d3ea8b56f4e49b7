"""Pictures: patches, attention maps and rollout, position-embedding similarity, training samples
and mistakes, and the TensorBoard logger.

May import: :mod:`finetune.errors`, :mod:`finetune.data`, :mod:`finetune.models`,
:mod:`finetune.training` (the callback base and device helpers) and :mod:`finetune.runs` (the run
folder the logger writes into). Nothing here imports experiments or the CLI.
"""
