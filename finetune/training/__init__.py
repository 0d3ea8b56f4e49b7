"""One training run in memory: its state, its parts, and the loop that advances it.

Owns the training state and random states (``state``), the components built from a recipe
(``components``: optimizer, schedule, EMA, mixup, loss, gradient clipping, precision), preparing
the data and model and building the state (``setup``), the epoch loop (``loop``) and evaluation
(``evaluate``), training to a time budget (``budget``: the start-up probe of the step and the
plan), the loop's callbacks (``callbacks``, ``progress``), the progress shown for the long steps
outside the loop (``activity``: decoding, scoring, exporting, reports), the device and precision
helpers (``device``) and distributed processes (``distributed``).

May import: :mod:`finetune.errors`, :mod:`finetune.snapshot`, :mod:`finetune.recipe`,
:mod:`finetune.data`, :mod:`finetune.models`. Nothing here writes a run folder (that is
:mod:`finetune.runs`) or imports experiments, viz or the CLI.
"""
