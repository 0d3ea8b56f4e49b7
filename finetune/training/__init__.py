"""One training run in memory: its state, its parts, and the loop that advances it.

Owns the training state (model, optimizer, schedule, EMA, scaler, RNG, counters), the components
built from a recipe (optimizer, schedule, EMA, mixup, loss, gradient clipping, precision), the
epoch loop and evaluation, callbacks, the device and precision helpers, and distributed processes.

May import: :mod:`finetune.errors`, :mod:`finetune.snapshot`, :mod:`finetune.recipe`,
:mod:`finetune.data`, :mod:`finetune.models`. Nothing here writes a run folder (that is
:mod:`finetune.runs`) or imports experiments, viz or the CLI.
"""
