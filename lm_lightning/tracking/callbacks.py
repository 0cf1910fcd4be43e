"""Training callbacks that Lightning does not ship in the form we need, and when logged metrics reach the loggers."""

from __future__ import annotations

import functools
import time
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput, get_available_flops
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

# the dtype whose peak Lightning looks up for a Trainer precision; any other precision computes in float32
PEAK_DTYPES = {"64-true": torch.float64, "bf16-true": torch.bfloat16, "bf16-mixed": torch.bfloat16,
               "16-true": torch.float16, "16-mixed": torch.float16,
               "transformer-engine": torch.int8, "transformer-engine-float16": torch.int8}


def reaches_loggers(trainer: L.Trainer, step: int) -> bool:
    """Whether what is logged during optimizer step ``step`` (counted from 1) is written to the loggers.

    Lightning writes the logged metrics every ``trainer.log_every_n_steps`` steps, and on the step
    where the trainer is stopping; never with ``log_every_n_steps=0``. Lightning keeps its own count
    of these steps, ``trainer.global_step`` but for one case: resumed from a checkpoint written inside
    a step (on an error) or after the end of a step that validated (at the end of a run), its count
    runs one ahead, and the rows it writes then hold what was logged one step earlier.
    """
    if trainer.log_every_n_steps == 0:
        return False
    return step % trainer.log_every_n_steps == 0 or trainer.should_stop


def _batch_size(batch: Any) -> int:
    return batch.size(0)


def _batch_tokens(batch: Any) -> int:
    return batch[:, 1:].numel()


class ThroughputMonitor(Callback):
    """Training throughput (tokens/s, FLOP/s, MFU) from Lightning's ``Throughput``, with a configurable peak.

    Writes what Lightning's own ThroughputMonitor writes while fitting: every ``log_every_n_steps``
    optimizer steps a row of ``train/<metric>`` (``train/device/items_per_sec``: tokens/s,
    ``train/device/flops_per_sec``, ``train/device/mfu``, batches and samples per second over the
    last ``window_size`` micro-batches; totals) on the step axis of the other metrics. Validation is
    timed and taken out of the training clock, but not logged: its own batch counter as the step
    would run backwards on the tracker's step axis.

    Lightning knows the peak FLOP/s of GPUs but not of CPUs: on CPU the peak is ``cpu_peak_flops`` when given, else
    this CPU's own, measured when fit starts (:func:`measured_cpu_peak`, ~0.1 s): CPUs of one kind of machine
    differ 2-3x (BASELINES.md's 129 GFLOP/s; 330-370 on an AVX-512 machine), so a fixed figure read above 100% MFU
    on a faster one. ``peak_flops`` overrides Lightning's table and the measurement on any device.
    """

    def __init__(self, peak_flops: float | None = None, cpu_peak_flops: float | None = None,
                 window_size: int = 50) -> None:
        self.peak_flops, self.cpu_peak_flops, self.window_size = peak_flops, cpu_peak_flops, window_size
        self.available_flops: int | None = None  # peak FLOP/s of one device, for MFU
        self._throughput: Throughput | None = None
        self._batches = self._samples = self._tokens = 0  # training micro-batches, windows and tokens so far
        self._t0 = 0.0  # start of the training clock (time.perf_counter), moved past each validation
        self._elapsed = 0.0  # training clock at the latest micro-batch, s
        self._step = 0  # trainer.global_step at the latest micro-batch
        self._val_t0 = self._val_elapsed = 0.0  # start of the running validation, and its clock at its latest batch
        self._flops_known: bool | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        device = trainer.strategy.root_device
        dtype = PEAK_DTYPES.get(str(trainer.precision), torch.float32)  # what the run computes in
        peak = self.peak_flops
        if peak is None:
            peak = get_available_flops(device, dtype)
        if peak is None and device.type == "cpu" and trainer.is_global_zero:  # the rank that logs
            peak = self.cpu_peak_flops or measured_cpu_peak(dtype)
        self.available_flops = None if peak is None else int(peak)

    @rank_zero_only
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._throughput = Throughput(available_flops=self.available_flops, world_size=trainer.world_size,
                                      window_size=self.window_size)
        self._batches = self._samples = self._tokens = 0
        self._elapsed, self._step = 0.0, trainer.global_step
        self._t0 = time.perf_counter()

    @rank_zero_only
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._elapsed = _clock(trainer) - self._t0
        self._batches += 1
        self._samples += _batch_size(batch)
        self._tokens += _batch_tokens(batch)
        self._throughput.update(time=self._elapsed, batches=self._batches, samples=self._samples,
                                lengths=self._tokens, flops=self._flops_per_batch(pl_module))
        # only once the optimizer has stepped (gradient accumulation over), so the step's time is included
        stepped, self._step = trainer.global_step != self._step, trainer.global_step
        if stepped and reaches_loggers(trainer, trainer.global_step):
            metrics = {f"train{self._throughput.separator}{k}": v for k, v in self._throughput.compute().items()}
            for logger in trainer.loggers:  # in a row of their own at the step of this step's other metrics
                logger.log_metrics({**metrics, "epoch": trainer.current_epoch}, step=trainer.global_step - 1)
                logger.save()

    @rank_zero_only
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._val_t0, self._val_elapsed = time.perf_counter(), 0.0

    @rank_zero_only
    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                *args: Any, **kwargs: Any) -> None:
        if not trainer.sanity_checking:
            self._val_elapsed = _clock(trainer) - self._val_t0

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        # the training clock goes on from the end of the last validation batch as if no time had passed since
        # the last training batch: the gap up to validation and validation itself are not training time
        self._t0 = self._val_t0 + self._val_elapsed - self._elapsed

    def _flops_per_batch(self, pl_module: L.LightningModule) -> int | None:
        if self._flops_known is None:
            self._flops_known = hasattr(pl_module, "flops_per_batch")
            if not self._flops_known:
                rank_zero_warn(f"ThroughputMonitor needs a `flops_per_batch` attribute or property in "
                               f"{type(pl_module).__name__} to compute FLOP/s and MFU")
        return pl_module.flops_per_batch if self._flops_known else None


def measured_cpu_peak(dtype: torch.dtype = torch.float32) -> float:
    """Matrix-product FLOP/s of this CPU in ``dtype`` at torch's current thread count, as BASELINES.md measures the
    CPU's practical peak: the best of five square products after two warm-ups, at 1,024 rows, or at 256 or 512
    where a product of that size takes over 5 ms already (bf16 on a CPU without bf16 units). Measured once per
    process."""
    return _cpu_peak(dtype, torch.get_num_threads())


@functools.cache
def _cpu_peak(dtype: torch.dtype, threads: int) -> float:
    def timed(n: int, repeats: int) -> float:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
        return best

    n = 256
    while n < 1024 and timed(n, 2) < 5e-3:
        n *= 2
    timed(n, 2)  # warm-up at the size measured
    return 2 * n**3 / timed(n, 5)


def _clock(trainer: L.Trainer) -> float:
    if trainer.strategy.root_device.type == "cuda":
        torch.cuda.synchronize()  # the GPU's queued work belongs to the time measured
    return time.perf_counter()


class FinalValidationBatches(Callback):
    """Validation batches after fit: ``trainer.limit_val_batches`` sets how many each evaluation during fit reads
    (e.g. nanoGPT's 20-batch estimate), this how many the final validation reads (1.0: the whole split).

    When the two differ the last evaluation during fit does not stand for the final figure, so the task's
    ``last_val_step`` is cleared and the final validation runs.
    """

    def __init__(self, limit_val_batches: int | float = 1.0) -> None:
        self.limit_val_batches = limit_val_batches

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.limit_val_batches != self.limit_val_batches:
            trainer.limit_val_batches = self.limit_val_batches
            if hasattr(pl_module, "last_val_step"):
                pl_module.last_val_step = None
