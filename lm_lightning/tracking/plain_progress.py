"""Progress that reads well where stdout is not a terminal (SLURM, nohup, CI, a file): one plain line every few
steps instead of a progress bar's carriage-return redraws; and the choice of bar, made by ``progress_bar``."""

from __future__ import annotations

import math
import sys
import time
from datetime import timedelta
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.trainer.states import TrainerFn

from lm_lightning.errors import UserError

KINDS = ("auto", "tqdm", "plain", "rich")
LINES_PER_RUN = 20  # training lines of a run when every_n_steps is not given


def progress_bar(kind: str = "auto", refresh_rate: int = 10, every_n_steps: int | None = None) -> ProgressBar:
    """The progress callback for ``kind``: ``auto`` is Lightning's tqdm bar on a terminal and
    :class:`PlainProgress` elsewhere; ``tqdm``, ``plain`` and ``rich`` (Lightning's RichProgressBar) force one.
    ``refresh_rate``: steps between redraws of a bar; ``every_n_steps``: steps between plain lines."""
    if kind not in KINDS:
        raise UserError(f"callbacks.progress_bar.kind={kind!r} is not valid: choose one of {', '.join(KINDS)}")
    if kind == "auto":
        kind = "tqdm" if sys.stdout.isatty() else "plain"
    if kind == "plain":
        return PlainProgress(every_n_steps)
    if kind == "rich":
        from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

        if not _RICH_AVAILABLE:
            raise UserError("callbacks.progress_bar.kind=rich needs the rich package: pip install rich")
        from lightning.pytorch.callbacks import RichProgressBar

        return RichProgressBar(refresh_rate=refresh_rate)
    return TQDMProgressBar(refresh_rate=refresh_rate)


class PlainProgress(ProgressBar):
    """One line per ``every_n_steps`` optimizer steps and one per validation, printed on rank 0 and flushed:
    ``step 30/200 | loss 3.4630 | val/loss 3.5922 | lr 9.6e-04 | 40,369 tok/s | ETA 0:00:01``.

    ``loss`` is the latest logged training loss; ``val/loss`` appears on the line of a step that validated (a
    validation between the printed steps gets a line of its own);
    ``lr`` is the first parameter group's; tokens/s counts the training tokens (``(batch, seq)`` windows:
    ``batch * (seq - 1)`` predicted tokens, times the processes) since the previous line over the training
    time (validation excluded), steps/s when batches are not token tensors; ETA extrapolates the wall time per
    step so far (validation included) to the remaining steps. ``every_n_steps=None``: a round number giving
    about 20 lines per run (10 for 200 steps). Validation and test batches print nothing.
    """

    def __init__(self, every_n_steps: int | None = None) -> None:
        super().__init__()
        self.every_n_steps = every_n_steps
        self._enabled = True
        self._interval = 1
        self._pending: list[str] | None = None  # the line of the latest step, held back in case validation follows it
        self._pending_step = -1
        self._start_step = 0  # global step at the start of fit (a resumed run starts past 0)
        self._wall0 = 0.0  # wall clock at the start of fit
        self._val_seconds = 0.0  # validation time so far, taken out of the training clock
        self._val_start = 0.0
        self._step = 0  # global step at the latest batch
        self._last_clock, self._last_tokens, self._last_step = 0.0, 0, 0  # at the previous line
        self._tokens = 0  # training tokens of this process since the start of fit
        self._counts_tokens = True
        self.total_steps = math.inf

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # optimizer steps of the whole run (max_steps, or what max_epochs amounts to); inf if unknown
        self.total_steps = total = float(trainer.estimated_stepping_batches)
        self._interval = self.every_n_steps or _round_interval(total / LINES_PER_RUN if math.isfinite(total) else 1000)
        self._start_step = self._step = self._last_step = trainer.global_step
        self._wall0 = time.perf_counter()
        self._val_seconds, self._tokens, self._last_tokens, self._last_clock = 0.0, 0, 0, 0.0
        self._pending = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._flush()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._tokens += self._batch_tokens(batch)
        stepped, self._step = trainer.global_step != self._step, trainer.global_step
        step = trainer.global_step
        if stepped and (step % self._interval == 0 or step >= self.total_steps):
            self._pending, self._pending_step = self._line(trainer), step

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._val_seconds += time.perf_counter() - self._val_start
        if trainer.state.fn != TrainerFn.FITTING:
            return  # a validation outside fit (trainer.validate): the command prints its own figures
        if self._pending is None or self._pending_step != trainer.global_step:  # a line of its own between printed steps
            self._flush()
            self._pending, self._pending_step = self._line(trainer), trainer.global_step
        val = self.get_metrics(trainer, pl_module).get("val/loss")
        if val is not None and self._pending:
            at = 2 if self._pending[1].startswith("loss") else 1  # after the training loss
            self._pending.insert(at, f"val/loss {_number(val)}")
        self._flush()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush()

    def _flush(self) -> None:
        if self._pending and self._enabled and self.trainer.is_global_zero:
            print(" | ".join(self._pending), flush=True)  # flushed: a redirected stdout is block-buffered
        self._pending = None

    def _line(self, trainer: L.Trainer) -> list[str]:
        step, total = trainer.global_step, self.total_steps
        parts = [f"step {step}/{int(total)}" if math.isfinite(total) else f"step {step}"]
        metrics = self.get_metrics(trainer, trainer.lightning_module)
        loss = metrics.get("train/loss", metrics.get("loss"))
        if loss is not None:
            parts.append(f"loss {_number(loss)}")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.1e}")
        clock = time.perf_counter() - self._wall0 - self._val_seconds  # training time since the start of fit
        seconds, steps = clock - self._last_clock, step - self._last_step
        if seconds > 0 and steps > 0:
            if self._counts_tokens:
                rate = (self._tokens - self._last_tokens) * trainer.world_size / seconds
                parts.append(f"{rate:,.0f} tok/s")
            else:
                parts.append(f"{steps / seconds:.2f} steps/s")
        done = step - self._start_step
        if done > 0 and math.isfinite(total):
            eta = (time.perf_counter() - self._wall0) / done * (total - step)
            parts.append(f"ETA {timedelta(seconds=round(max(eta, 0.0)))}")
        self._last_clock, self._last_tokens, self._last_step = clock, self._tokens, step
        return parts

    def _batch_tokens(self, batch: Any) -> int:
        """Predicted tokens of a batch of ``(batch, seq)`` token windows (what ThroughputMonitor counts); 0 and
        steps/s for other batches."""
        if hasattr(batch, "dim") and batch.dim() == 2 and not batch.is_floating_point():
            return batch[:, 1:].numel()
        self._counts_tokens = False
        return 0


def _round_interval(steps: float) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50, ... that is at least ``steps``."""
    interval = 1
    while interval < steps:
        for factor in (2, 2.5, 2):  # 1 -> 2 -> 5 -> 10
            interval = int(interval * factor)
            if interval >= steps:
                break
    return interval


def _number(value: Any) -> str:
    return f"{float(value):.4f}"
