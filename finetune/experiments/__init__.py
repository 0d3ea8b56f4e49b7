"""Several runs compared: experiment files (:mod:`.spec`) and sweeps (:mod:`.sweep`), planned
(:mod:`.plan`) and run (:mod:`.execute`) into one folder, and the reports (:mod:`.report`: tables,
rankings on validation, CSV, Markdown) over run folders read back by
:mod:`finetune.runs.records`.

May import: :mod:`finetune.errors`, :mod:`finetune.snapshot`, :mod:`finetune.recipe`,
:mod:`finetune.runs`, :mod:`finetune.training` (distributed launching) and
:mod:`finetune.viz.plots` (the report's figures). Nothing here imports the CLI.
"""
