"""The three Lightning internals this project cannot do without, each behind one function.

Lightning has no public API for either; ``tests/test_public_apis.py`` pins each one against the
installed Lightning, so an upgrade that renames or changes it fails there, naming it, instead of
silently breaking resume or FSDP2.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.strategies import ModelParallelStrategy


def batches_processed_in_epoch(trainer: L.Trainer) -> int:
    """Training batches of the current epoch whose step has run: where Lightning resumes the epoch.

    A batch still in flight (a checkpoint written from inside its step, e.g. on an exception) is not
    counted, so the resumed run repeats it, as Lightning's own progress counters do. No public
    counter has this meaning: ``trainer.fit_loop.epoch_loop.batch_idx`` counts the batch in flight.
    """
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed


def set_data_parallel_degree(strategy: ModelParallelStrategy, size: int) -> None:
    """Sets the ``data_parallel`` dimension of the device mesh ``strategy.setup_environment`` builds.

    ``ModelParallelStrategy`` takes it only in its constructor, before the number of processes is
    known; call this after the Trainer has given the strategy its devices and nodes.
    """
    strategy._data_parallel_size = size


def align_logged_step(trainer: L.Trainer) -> None:
    """Makes the step Lightning logs metrics at (``fit_loop.epoch_loop._batches_that_stepped``) the optimizer step count.

    On resume Lightning adds one to the saved counter, as if every checkpoint were written in ``on_train_batch_end``
    before the counter moves; a checkpoint written once the loop had stopped (Ctrl-C, where ``train`` saves last.ckpt
    itself) then made every later step log one step late, leaving a gap in the curves. With one optimizer under
    automatic optimization the two counts are the same at the start of every batch, so the caller checks that first
    and calls this at a batch start.
    """
    trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step
