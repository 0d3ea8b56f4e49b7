"""The run folder as an observer of the training loop: :class:`RunRecorder` writes metrics lines,
checkpoints on schedule (and when a stop is requested), the best model on validation, the final
model and plots, and the summary, through ``finetune.runs.rundir.RunDir``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..training.budget import budget_record
from ..training.callbacks import Callback
from ..training.loop import check_finite
from ..training.state import TrainState, throughput
from ..errors import RunDirError
from ..models.params import merge_lora
from .card import write_model_cards
from .folder import BEST_DIR
from .rundir import RunDir


def result_fields(state: TrainState) -> dict[str, Any]:
    """What a run has found so far, for ``summary.json`` (the confusion matrix, C x C numbers, is
    added once, when the run finishes, not at every checkpoint).

    ``selection`` says how the headline figure was chosen: ``val`` (the best epoch on the
    validation split; its test accuracy is ``best_test_acc1``) or ``final`` (no validation split:
    the test accuracy after the last epoch, ``final_acc1``). ``peak_test_acc1`` is the best test
    accuracy over epochs, selected on the test set itself: optimistic, shown only as such.
    """
    p, seconds = state.progress, state.train_time()  # mid-epoch too: the stretch in progress counts
    fields: dict[str, Any] = {
        "selection": "val" if state.val_loader is not None else "final",
        "epochs_done": min(p.epoch - 1, state.epochs),
        "steps": p.step,
        "train_time_s": seconds,
        "images_per_s": throughput(p, seconds),
    }
    if p.last_eval is not None:
        e = p.last_eval
        fields.update(
            final_acc1=e["acc1"], final_acc5=e["acc5"], final_loss=e["loss"],
            per_class_acc=e["per_class_acc"],
        )
    if p.last_val_acc1 is not None:
        fields["final_val_acc1"] = p.last_val_acc1
    if p.best is not None:
        fields.update(best_epoch=p.best["epoch"], best_val_acc1=p.best["val_acc1"], best_test_acc1=p.best["test_acc1"])
    if p.peak_test is not None:
        fields.update(peak_test_acc1=p.peak_test["test_acc1"], peak_test_epoch=p.peak_test["epoch"])
    if state.budget is not None:  # the plan, the time used so far and the accuracy at shares of the budget
        fields["time_budget"] = budget_record(state.budget, p, seconds, done=p.epoch > state.epochs)
    states = [t for st in state.optimizer.state.values() for t in st.values() if torch.is_tensor(t)]
    fields["optimizer_state_mb"] = sum(t.numel() * t.element_size() for t in states) / 2**20
    return fields


class RunRecorder(Callback):
    """Writes what the loop reports into the run folder: metrics lines, checkpoints on schedule
    (and when a stop is requested), the best model on validation, and the summary.

    With several processes every one runs a recorder, since a checkpoint sums the running losses
    across them; only rank 0's has a folder (``rundir``) and writes.

    Args:
        rundir: the folder, held by this process; ``None`` on ranks other than 0.
        summary: the summary so far (written on every checkpoint and at the end).
        wall_before_s: wall-clock seconds of earlier processes of this run (resumed runs).
    """

    def __init__(self, rundir: RunDir | None, summary: dict[str, Any], *, wall_before_s: float = 0.0):
        self.rundir = rundir
        self.summary = summary
        self.wall_before_s = wall_before_s
        self._wall_start = time.perf_counter()

    def wall_time(self) -> float:
        return self.wall_before_s + time.perf_counter() - self._wall_start

    def on_log(self, state: TrainState, row: dict[str, Any]) -> None:
        if self.rundir is not None:
            self.rundir.log(row)

    def on_step_end(self, state: TrainState) -> None:
        every = state.recipe.output.checkpoint_every_steps
        if state.stopping or (every and state.progress.step % every == 0):
            self.checkpoint(state)

    def on_epoch_end(self, state: TrainState, row: dict[str, Any] | None) -> None:
        r, p = state.recipe, state.progress
        if row is not None and self.rundir is not None:
            self.rundir.log(row)
            if p.best is not None and p.best["epoch"] == row["epoch"] and r.output.save_model:
                self.rundir.save_model(_as_evaluated(state, self.summary.get("stored_size")), state.classes, BEST_DIR)
        finished = p.epoch - 1
        every = r.output.checkpoint_every
        if state.stopping or finished == state.epochs or (every and finished % every == 0):
            self.checkpoint(state)

    def checkpoint(self, state: TrainState) -> None:
        """Save the full training state, then the summary with the results so far. Every process
        takes part (the state sums the running losses across processes); rank 0 writes."""
        check_finite(state)  # never save a state that has already gone bad
        tree = state.state_dict()
        if self.rundir is None:
            return
        tree["metrics_offset"] = self.rundir.metrics_offset()
        tree["wall_time_s"] = self.wall_time()
        self.rundir.save_checkpoint(tree)
        p = state.progress
        # last_checkpoint: proof that the run had one, should checkpoints/ go missing (resume says so)
        self.summary.update(result_fields(state), wall_time_s=tree["wall_time_s"],
                            last_checkpoint={"epoch": p.epoch, "step": p.step})
        self.rundir.write_summary(self.summary)

    def finish(self, state: TrainState) -> list[Path]:
        """Save the final model, plots and model cards, then mark the run finished (last, so that a
        folder that says ``finished`` has everything), then delete the runs it replaced, if any.

        Returns:
            The earlier runs deleted (parked by ``output.overwrite``), as paths.
        """
        from ..training.device import peak_memory_mb

        r = state.recipe
        if self.rundir is None:
            return []
        if r.output.save_model:
            self.rundir.save_model(_as_evaluated(state, self.summary.get("stored_size")), state.classes)
            if hasattr(state.eval_model, "save_pretrained"):  # the adapters alone, in peft's format
                self.rundir.save_adapter(state.eval_model)
        if r.output.plots:
            from ..viz.figures import draw_mistakes, draw_samples
            from ..viz.plots import plot_confusion, plot_curves
            from ..viz.visual import run_pictures

            folder = self.rundir.path
            pictures = run_pictures(state)
            images, true, predicted, confidence = pictures.mistakes
            # matplotlib and PIL report a full disk as OSError: the run's message, not a traceback
            with self.rundir.writing(f"draw the pictures in {folder}"):
                plot_curves(folder / "metrics.jsonl", folder / "curves.png", title=r.name)
                plot_confusion(state.progress.last_eval["confusion"], state.classes, folder / "confusion_matrix.png")
                draw_samples(pictures.samples, pictures.sample_labels.tolist(), state.classes, folder / "samples.png",
                             title="Training inputs as the model receives them (epoch 1, first batch; de-normalised)")
                draw_mistakes(images, true.tolist(), predicted.tolist(), confidence.tolist(), state.classes,
                              folder / "mistakes.png", where=pictures.where)
        self.summary.pop("replaced_runs", None)  # earlier finetune versions wrote it; nothing reads it
        self.summary.update(
            result_fields(state),
            confusion_matrix=state.progress.last_eval["confusion"],
            status="finished",
            error=None,
            wall_time_s=self.wall_time(),
            peak_memory_mb=peak_memory_mb(state.device),
            peak_memory_kind="cuda" if state.device.type == "cuda" else "process_rss",
        )
        with self.rundir.writing(f"write the model card in {self.rundir.path}"):
            write_model_cards(self.rundir.path, self.summary)  # README.md, from the summary about to be written
        self.rundir.write_summary(self.summary)
        return self.rundir.discard_replaced()

    def mark(self, state: TrainState, status: str, error: str) -> None:
        """Record how the run ended when it did not finish; best effort (the disk may be full)."""
        if self.rundir is None:
            return
        self.summary.update(result_fields(state), status=status, error=error, wall_time_s=self.wall_time())
        self.summary.pop("replaced_runs", None)
        try:
            self.rundir.write_summary(self.summary)
        except RunDirError:
            pass  # the status stays "running"; with no process holding the lock it reads as interrupted


def _as_evaluated(state: TrainState, stored_size: list[int] | None):
    """The model to save: a plain timm model (LoRA adapters merged, on a copy) whose
    ``pretrained_cfg`` states the preprocessing its evaluation used (input size, interpolation, no
    extra crop, the normalisation it trained with, the size its images were stored at), so that
    ``eval``, ``predict``, an export and timm's own ``resolve_data_config`` all feed it what the run
    measured it on."""
    model = merge_lora(state.eval_model)
    model.pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if k != "stored_size"}
    model.pretrained_cfg.update(state.test_loader.preprocess.to_pretrained_cfg(stored_size))
    return model
