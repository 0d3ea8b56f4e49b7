"""Exported models: a finished run's model written as an ONNX file or a ``torch.export`` program
(``.pt2``), by default behind its own preprocessing so that the graph takes uint8 pixels
(``graph``), described by metadata derived from the model's ``Preprocess`` (``metadata``), checked
against the PyTorch model on the run's own test images at batch 1 and at the largest batch before
the file appears (``exporter``), and read back to classify photos (``runtime``), a ``.pt2`` only
once nothing in it would run code on loading (``archive``).

May import: :mod:`finetune.errors`, :mod:`finetune.snapshot`, :mod:`finetune.recipe`,
:mod:`finetune.data`, :mod:`finetune.models`, and of :mod:`finetune.runs` only ``runs.folder`` (to
read a run folder). onnx, onnxruntime and onnxscript (the ``export`` extra) are imported inside
the functions that need them.
"""
