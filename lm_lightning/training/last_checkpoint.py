"""``last.ckpt`` at the end of a run holds the final step, whatever the last-checkpoint callback's period."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lm_lightning.parallel.checkpoint import METADATA, is_sharded
from lm_lightning.training.lightning_internals import align_logged_step
from lm_lightning.training.checkpoint_io import load_checkpoint_file, replace_folder, write_checkpoint_file


def checkpoint_step(path: str | Path) -> int | None:
    """The optimizer step a checkpoint file (or a sharded checkpoint folder) was saved at; None without one.
    The tensors are memory-mapped, not read."""
    path = Path(path)
    if is_sharded(path):
        path = path / METADATA
    if not path.is_file():
        return None
    return load_checkpoint_file(path, mmap=True).get("global_step")


class FinalStepCheckpoint(Callback):
    """The state at the end of the step that reaches ``trainer.max_steps``, saved from inside the epoch as the
    periodic checkpoints are, then put in place as ``last.ckpt`` by :func:`save_last`: a run continued from it
    (``ckpt_path=last trainer.max_steps=<more>``) goes on with the batches the uninterrupted run would have seen.

    A checkpoint written once ``fit`` has ended (by :func:`save_last` before, or by Lightning's ModelCheckpoint at
    train end when the run was shorter than its period) holds the loops as a run stopped by ``max_steps`` leaves
    them, the epoch counted as finished: a run continued from it started the next epoch's batches instead."""

    def __init__(self, path: Path, every_n_train_steps: int | None = None) -> None:
        self.path = Path(path)
        self.staged = self.path.with_name("final-step.ckpt")
        self.every_n_train_steps = every_n_train_steps  # the last-checkpoint callback's period: it writes those steps
        self.saved_step: int | None = None

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        step = trainer.global_step
        if trainer.fast_dev_run:  # Lightning's fast dev run saves nothing (debug=fdr)
            return
        if 0 < trainer.max_steps <= step and self.saved_step != step and not (
                self.every_n_train_steps and step % self.every_n_train_steps == 0):
            trainer.save_checkpoint(self.staged, weights_only=False)  # the full state: it resumes
            self.saved_step = step

    def put_in_place(self) -> None:
        """Replaces ``last.ckpt`` with the staged checkpoint (a file atomically, with its checksum; a sharded folder
        by renaming it)."""
        if self.staged.is_dir():
            replace_folder(self.staged, self.path)
            return
        write_checkpoint_file(self.staged.read_bytes(), self.path)
        for leftover in (self.staged, self.staged.with_name(self.staged.name + ".sha256")):
            leftover.unlink(missing_ok=True)


class LoggedStepOnResume(Callback):
    """A resumed run logs its metrics at the optimizer step, whatever the checkpoint it resumed was written from
    (``lightning_internals.align_logged_step``): set at its first batch, after Lightning's own restore has moved
    the counter."""

    def __init__(self) -> None:
        self._pending = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pending = bool(trainer.ckpt_path) and pl_module.automatic_optimization and len(trainer.optimizers) == 1

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._pending:
            align_logged_step(trainer)
            self._pending = False


def save_last(trainer: L.Trainer, path: Path) -> None:
    """Saves the final state to ``path``: the one :class:`FinalStepCheckpoint` staged at the final step, or, unless a
    ``save_last`` checkpoint callback already wrote it at the final step (the callback writes last.ckpt every n
    steps; a run's length need not be a multiple of n), the state now."""
    if trainer.global_step == 0:
        return
    staged = [c for c in trainer.callbacks if isinstance(c, FinalStepCheckpoint) and c.saved_step == trainer.global_step]
    if staged:
        if trainer.is_global_zero:
            staged[0].put_in_place()
        trainer.strategy.barrier("final_step_checkpoint")
        return
    current = None
    if trainer.is_global_zero:  # the file is rank 0's; every rank must take the same decision to save
        current = any(checkpoint_step(callback.last_model_path) == trainer.global_step
                      for callback in trainer.checkpoint_callbacks
                      if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.last_model_path)
    if not trainer.strategy.broadcast(current, src=0):
        trainer.save_checkpoint(path, weights_only=False)  # the full state: it resumes
