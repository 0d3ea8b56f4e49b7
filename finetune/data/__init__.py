"""Images, from where they are stored to the batches a model sees.

Owns the dataset sources (CIFAR, image folders, Hugging Face datasets, synthetic images), decoding
(one function for files and bytes, on the CPU or the GPU), the decode cache, the one description of
preprocessing (:class:`~finetune.data.preprocess.Preprocess`), batch augmentation, the batch plan
and the loader.

May import: :mod:`finetune.errors`, :mod:`finetune.snapshot`, :mod:`finetune.recipe` (the recipe's
types only). Nothing here imports models, training, runs, experiments, viz or the CLI.
"""
