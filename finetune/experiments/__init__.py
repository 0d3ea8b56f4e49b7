"""Several runs compared: experiment files, ``compare`` and ``sweep``, and the reports (tables,
rankings on validation, figures) read back from run folders.

May import: :mod:`finetune.errors`, :mod:`finetune.snapshot`, :mod:`finetune.recipe`,
:mod:`finetune.runs` and :mod:`finetune.training` (distributed launching). Nothing here imports the
CLI.
"""
