"""Pictures: patches, attention maps and rollout, position-embedding similarity, training samples
and mistakes, the matplotlib figures of runs and reports (:mod:`.plots`), and the TensorBoard logger.

May import: :mod:`finetune.errors`, :mod:`finetune.data`, :mod:`finetune.models`,
:mod:`finetune.training` (the callback base and device helpers), and of :mod:`finetune.runs` only
the folder helpers the logger writes with and the run records the comparison figures draw
(:mod:`finetune.runs.folder`, :mod:`finetune.runs.records`: neither imports viz). Nothing here
imports experiments or the CLI.
"""
