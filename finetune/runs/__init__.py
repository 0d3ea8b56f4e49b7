"""Run folders: creating, locking and replacing them (``folder``), holding and writing one
(``rundir``), what a run writes into it (``recorder``), and the ``run``/``resume`` orchestration
that ties a recipe, a training state and a folder together (``run``); and a finished or running
folder read back into a :class:`~finetune.runs.records.RunRecord` (``records``), with the words
reports and figures use for how runs are ranked; the model card beside each saved model
(``card``) and a finished run's model uploaded to the Hugging Face hub (``push``).

May import: :mod:`finetune.errors`, :mod:`finetune.snapshot`, :mod:`finetune.recipe`,
:mod:`finetune.data`, :mod:`finetune.models`, :mod:`finetune.training`, and of :mod:`finetune.viz`
the end-of-run figures and the TensorBoard callback (``recorder``, ``run``). Nothing here imports
experiments or the CLI.
"""
