"""The library uses Lightning's and torch's public APIs: the replacements of the internals it used to read
behave as those did, and each internal still needed (lm_lightning/training/lightning_internals.py) is pinned
here, so a Lightning upgrade that changes it fails here, naming it."""

from __future__ import annotations

import contextlib
import functools
import time
from collections import Counter
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins.environments import LightningEnvironment
from torch.distributed.device_mesh import init_device_mesh
from torch.utils.data import DataLoader

from lm_lightning.models.gpt import build_gpt
from lm_lightning.parallel.fsdp2 import FSDP2Strategy, parallelize_fsdp2
from lm_lightning.tasks.language_model import LanguageModelTask
from lm_lightning.tracking.callbacks import ThroughputMonitor, measured_cpu_peak, reaches_loggers
from lm_lightning.training.lightning_internals import align_logged_step, batches_processed_in_epoch

V = 32
WINDOWS = torch.randint(0, V, (48, 9), generator=torch.Generator().manual_seed(0))  # 12 batches of 4 per epoch


class Rows(Logger):
    """Keeps what reaches the logger: (step, metrics) per call."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    name, version, experiment = "rows", 0, None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    def steps_with(self, key: str) -> dict[int, float]:
        return {step: metrics[key] for step, metrics in self.rows if key in metrics}


class Tiny(L.LightningModule):
    """Embedding-sum regression: a model whose only job is to let the loops run."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(V, 4)
        self.batch_indices: list[int] = []

    @property
    def flops_per_batch(self) -> int:
        return 1000 if self.training else 333

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.batch_indices.append(batch_idx)
        return self.emb(batch).pow(2).mean()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val/loss", self.emb(batch).pow(2).mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(module: L.LightningModule, tmp_path, ckpt_path=None, callbacks=(), **trainer_kwargs: Any) -> L.Trainer:
    options = {"max_steps": 10, "log_every_n_steps": 3, "val_check_interval": 5, "limit_val_batches": 2,
               "logger": Rows(), "enable_progress_bar": False, "enable_model_summary": False,
               "enable_checkpointing": False, "accelerator": "cpu", "default_root_dir": tmp_path}
    trainer = L.Trainer(callbacks=list(callbacks), **{**options, **trainer_kwargs})
    trainer.fit(module, DataLoader(WINDOWS, batch_size=4), DataLoader(WINDOWS, batch_size=4), ckpt_path=ckpt_path,
                weights_only=True)  # checkpoints are plain data (the random states as tensors)
    return trainer


# ---- "does this step reach the loggers": trainer.global_step and log_every_n_steps, as Lightning decides


class Gates(Callback):
    """(global_step, ours, Lightning's ``trainer._logger_connector.should_update_logs``) where the library asks:
    before a batch's step (as the training step does) and at the end of a batch whose optimizer step has run
    (as ThroughputMonitor does)."""

    def __init__(self) -> None:
        self.in_step: list[tuple[int, bool, bool]] = []
        self.after_step: list[tuple[int, bool, bool]] = []
        self.step = 0

    def on_train_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.step = trainer.global_step

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.in_step.append((trainer.global_step, reaches_loggers(trainer, trainer.global_step + 1),
                             trainer._logger_connector.should_update_logs))

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step != self.step:
            self.after_step.append((trainer.global_step, reaches_loggers(trainer, trainer.global_step),
                                    trainer._logger_connector.should_update_logs))
        self.step = trainer.global_step

    def agree(self) -> bool:
        return bool(self.in_step) and all(ours == lightning for _, ours, lightning in self.in_step + self.after_step)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_reaches_loggers_is_lightnings_own_decision_fresh_and_resumed(tmp_path, accumulate):
    periodic = ModelCheckpoint(dirpath=tmp_path / "periodic", every_n_train_steps=4, save_top_k=-1)
    at_validation = ModelCheckpoint(dirpath=tmp_path / "val", monitor="val/loss", filename="best")
    gates = Gates()
    fit(Tiny(), tmp_path, callbacks=[periodic, at_validation, gates], accumulate_grad_batches=accumulate,
        enable_checkpointing=True)
    assert gates.agree()
    assert sorted({step for step, ours, _ in gates.in_step if ours}) == [2, 5, 8]  # steps 3, 6 and 9 of 10
    assert [step for step, ours, _ in gates.after_step if ours] == [3, 6, 9]

    # resumed from a checkpoint written at the end of a training batch, and from one written at a validation's end
    for checkpoint in [tmp_path / "periodic" / "epoch=0-step=4.ckpt", tmp_path / "val" / "best.ckpt"]:
        gates = Gates()
        fit(Tiny(), tmp_path, ckpt_path=checkpoint, max_steps=14, callbacks=[gates], accumulate_grad_batches=accumulate)
        assert gates.agree(), checkpoint.name
        steps = {step for step, _, _ in gates.in_step}
        assert {step for step, ours, _ in gates.in_step if ours} == {2, 5, 8, 11} & steps


def test_reaches_loggers_never_with_log_every_zero_and_always_when_stopping(tmp_path):
    trainer = L.Trainer(log_every_n_steps=0, logger=False, enable_progress_bar=False)
    assert not any(reaches_loggers(trainer, step) for step in range(1, 20))
    trainer = L.Trainer(log_every_n_steps=5, logger=False, enable_progress_bar=False)
    assert [step for step in range(1, 12) if reaches_loggers(trainer, step)] == [5, 10]
    trainer.should_stop = True
    assert reaches_loggers(trainer, 7)


def language_model_task() -> LanguageModelTask:
    torch.manual_seed(0)
    model = {"_target_": "lm_lightning.models.gpt.build_gpt", "vocab_size": V, "block_size": 8, "n_layer": 1,
             "n_head": 2, "n_embd": 16}
    return LanguageModelTask(model=model, objective={"_target_": "lm_lightning.objectives.causal_lm.CausalLM"},
                             optimizer=functools.partial(torch.optim.AdamW, lr=1e-2))


def test_the_language_model_logs_each_written_steps_own_metrics(tmp_path):
    """Train metrics are computed on exactly the steps whose logs Lightning writes, so each row holds its own
    step's values (tokens seen = (step + 1) × 4 windows × 8 predicted tokens), fresh and after a resume."""
    saving = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    trainer = fit(language_model_task(), tmp_path, callbacks=[saving], enable_checkpointing=True)
    tokens_seen = trainer.logger.steps_with("train/tokens_seen")
    assert tokens_seen == {2: 3 * 32.0, 5: 6 * 32.0, 8: 9 * 32.0}
    assert set(trainer.logger.steps_with("train/loss")) == {2, 5, 8}

    resumed = fit(language_model_task(), tmp_path, ckpt_path=tmp_path / "epoch=0-step=4.ckpt", max_steps=12)
    assert resumed.logger.steps_with("train/tokens_seen") == {5: 6 * 32.0, 8: 9 * 32.0, 11: 12 * 32.0}


# ---- ThroughputMonitor on Lightning's public Throughput meter


class Clock:
    """A fake time.perf_counter: 1 s per training batch, 0.25 s per validation batch, 3 s spent starting each
    validation (after the monitor's own hook) and 5 s after it ends (e.g. a checkpoint being written)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Ticks(Callback):
    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def on_train_batch_start(self, *args: Any) -> None:
        self.clock.now += 1.0

    def on_validation_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.clock.now += 0 if trainer.sanity_checking else 3.0

    def on_validation_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.clock.now += 0 if trainer.sanity_checking else 0.25

    def on_validation_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.clock.now += 0 if trainer.sanity_checking else 5.0


def monitored_fit(tmp_path, monkeypatch, monitor: ThroughputMonitor, **trainer_kwargs: Any) -> list:
    clock = Clock()
    monkeypatch.setattr(time, "perf_counter", clock)
    trainer = fit(Tiny(), tmp_path, callbacks=[monitor, Ticks(clock)], max_steps=12, log_every_n_steps=2,
                  **trainer_kwargs)
    return [(step, metrics) for step, metrics in trainer.logger.rows if any(k.startswith("train/") for k in metrics)]


def test_throughput_rows_take_validation_out_of_the_training_clock(tmp_path, monkeypatch):
    peak = measured_cpu_peak()  # this CPU's, measured once per process (here, before the test's clock replaces time's)
    monitor = ThroughputMonitor(window_size=3)
    rows = monitored_fit(tmp_path, monkeypatch, monitor)
    assert monitor.available_flops == int(peak) and peak > 1e9
    # every 2nd optimizer step, on the step axis of the other metrics (global_step - 1 at the end of a batch)
    assert [step for step, _ in rows] == [1, 3, 5, 7, 9, 11]
    assert all(set(metrics) >= {"train/time", "train/batches", "train/samples", "train/lengths", "epoch"}
               for _, metrics in rows)
    # validation after steps 5 and 10 (0.5 s of batches after a 3 s start) is not training time; the 5 s
    # after it is, as in Lightning's monitor
    assert [metrics["train/time"] for _, metrics in rows] == [2.0, 4.0, 11.0, 13.0, 15.0, 22.0]
    assert [metrics["train/lengths"] for _, metrics in rows] == [64, 128, 192, 256, 320, 384]  # 32 tokens a batch
    # rates over the last 3 batches: 2 batch intervals of 1 s, or 1 s + 6 s across a validation
    tokens_per_s = [metrics.get("train/device/items_per_sec") for _, metrics in rows]
    assert tokens_per_s == [None, 32.0, pytest.approx(64 / 7), 32.0, 32.0, pytest.approx(64 / 7)]
    assert rows[1][1]["train/device/flops_per_sec"] == 1000.0
    assert rows[1][1]["train/device/mfu"] == pytest.approx(1000.0 / int(peak))
    assert not any(k.startswith("validate") for _, metrics in rows for k in metrics)


def test_throughput_is_logged_once_per_optimizer_step_with_accumulation(tmp_path, monkeypatch):
    rows = monitored_fit(tmp_path, monkeypatch, ThroughputMonitor(peak_flops=2000.0, window_size=3),
                         accumulate_grad_batches=2)
    assert [step for step, _ in rows] == [1, 3, 5, 7, 9, 11]
    assert [metrics["train/batches"] for _, metrics in rows] == [4, 8, 12, 16, 20, 24]
    assert rows[0][1]["train/device/mfu"] == pytest.approx(1000.0 / 2000.0)  # peak_flops overrides the CPU peak


def test_a_given_cpu_peak_is_used_instead_of_the_measured_one(tmp_path, monkeypatch):
    monitor = ThroughputMonitor(cpu_peak_flops=4000.0, window_size=3)
    rows = monitored_fit(tmp_path, monkeypatch, monitor)
    assert monitor.available_flops == 4000
    assert rows[1][1]["train/device/mfu"] == pytest.approx(1000.0 / 4000.0)


def test_the_measured_cpu_peak_is_measured_once_per_dtype_and_thread_count(monkeypatch):
    products = []
    monkeypatch.setattr(torch, "mm", lambda a, b: products.append(a.shape) or a @ b)
    from lm_lightning.tracking import callbacks

    callbacks._cpu_peak.cache_clear()
    peak = measured_cpu_peak(torch.float64)
    n = products[-1][0]  # 1,024 rows, fewer on a CPU slow in this dtype: two warm-ups and the best of five
    assert products[-7:] == [(n, n)] * 7 and n in (256, 512, 1024)
    assert 1e8 < peak < 1e14  # FLOP/s of a CPU
    count = len(products)
    assert measured_cpu_peak(torch.float64) == peak and len(products) == count  # once


# ---- pinned internals (lm_lightning/training/lightning_internals.py)


class SavesInsideAStep(Callback):
    """Writes a checkpoint from inside the step of one batch and ends the run there, as an error would."""

    def __init__(self, path, at_step: int) -> None:
        self.path, self.at_step = path, at_step

    def on_before_optimizer_step(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.at_step:
            trainer.save_checkpoint(self.path)
            raise RuntimeError("an error inside the step")


class RecordsProcessed(Callback):
    def __init__(self) -> None:
        self.saved: list[int] = []

    def state_dict(self) -> dict[str, int]:
        self.saved.append(batches_processed_in_epoch(self.trainer))
        return {"processed": self.saved[-1]}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.trainer = trainer


@pytest.mark.parametrize("inside_a_step", [False, True])
def test_batches_processed_in_epoch_is_where_lightning_resumes_the_epoch(tmp_path, inside_a_step):
    """fit_loop.epoch_loop.batch_progress.current.processed: the resumed epoch starts at that batch."""
    path = tmp_path / "resume.ckpt"
    recorder = RecordsProcessed()
    save = SavesInsideAStep(path, at_step=5) if inside_a_step else ModelCheckpoint(
        dirpath=tmp_path, filename="resume", every_n_train_steps=5, save_top_k=-1)
    with pytest.raises(RuntimeError) if inside_a_step else contextlib.nullcontext():
        fit(Tiny(), tmp_path, callbacks=[recorder, save], max_steps=7, enable_checkpointing=not inside_a_step)
    # batches 0-4 have stepped; inside a step the 6th batch (index 5) is in flight and is not counted
    assert recorder.saved == [5], "batches_processed_in_epoch counts a batch still in flight"
    resumed = Tiny()
    fit(resumed, tmp_path, ckpt_path=path, max_steps=8)
    assert resumed.batch_indices[0] == recorder.saved[0], (
        "Lightning's fit_loop.epoch_loop.batch_progress.current.processed no longer says where a resumed epoch "
        "starts: update lm_lightning/training/lightning_internals.py:batches_processed_in_epoch")


class LogsAtStep(Callback):
    """Logs the optimizer step it is at, so the logger's step column can be read against it."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        pl_module.log("at_step", float(trainer.global_step))


def test_the_step_metrics_are_logged_at_is_the_counter_align_logged_step_sets(tmp_path):
    """fit_loop.epoch_loop._batches_that_stepped is the step loggers receive: set to 100 at the first batch's start,
    that batch's row is logged at step 100."""
    class SetAtStart(Callback):
        def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
            if trainer.global_step == 0:
                align_logged_step(trainer)  # 0 here, as at any fresh start
                trainer.fit_loop.epoch_loop._batches_that_stepped += 100

    logger = Rows()
    fit(Tiny(), tmp_path, callbacks=[SetAtStart(), LogsAtStep()], max_steps=3, logger=logger, log_every_n_steps=1)
    assert logger.steps_with("at_step") == {100: 1.0, 101: 2.0, 102: 3.0}, (  # at_step: after the batch's step
        "Lightning no longer logs at fit_loop.epoch_loop._batches_that_stepped: update "
        "lm_lightning/training/lightning_internals.py:align_logged_step")


def test_fsdp2_strategy_builds_one_data_parallel_dimension_over_every_process(monkeypatch):
    """ModelParallelStrategy.setup_environment builds its mesh from ``_data_parallel_size``."""
    from lightning.pytorch.strategies import model_parallel

    built = {}
    monkeypatch.setattr(model_parallel, "_setup_device_mesh",
                        lambda dp, tp, world, device: built.update(dp=dp, tp=tp, world=world) or "mesh")
    monkeypatch.setattr(FSDP2Strategy, "_setup_distributed", lambda self: None)
    environment = LightningEnvironment()
    environment.set_world_size(4)
    strategy = FSDP2Strategy()
    strategy.accelerator, strategy.cluster_environment = CPUAccelerator(), environment
    strategy.parallel_devices, strategy.num_nodes = [torch.device("cpu")] * 2, 2
    strategy.connect(Tiny())
    strategy.setup_environment()
    assert built == {"dp": 4, "tp": 1, "world": 4}, (
        "ModelParallelStrategy no longer reads its data-parallel size from _data_parallel_size: update "
        "lm_lightning/training/lightning_internals.py:set_data_parallel_degree")


# ---- FSDP2 activation checkpointing with torch.utils.checkpoint


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def test_fsdp2_activation_checkpointing_recomputes_blocks_and_changes_nothing_else(one_process_group):
    torch.manual_seed(0)
    config = {"vocab_size": V, "block_size": 8, "n_layer": 2, "n_head": 2, "n_embd": 16}
    plain, checkpointed = build_gpt(**config), build_gpt(**config)
    checkpointed.load_state_dict(plain.state_dict())
    parallelize_fsdp2(plain, one_process_group)
    parallelize_fsdp2(checkpointed, one_process_group, activation_checkpointing=True)
    block_type = type(plain.h[0])
    assert type(checkpointed.h[0]) is block_type and list(checkpointed.state_dict()) == list(plain.state_dict())

    calls: Counter[str] = Counter()  # forward calls of the first block, and of the first layer inside it
    idx = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(1))
    losses = {}
    for name, model in [("plain", plain), ("checkpointed", checkpointed)]:
        block, inside = model.h[0], next(iter(model.h[0].children()))
        block.register_forward_hook(lambda *args, key=f"{name} block": calls.update([key]))
        inside.register_forward_hook(lambda *args, key=f"{name} inside": calls.update([key]))
        logits = model(idx)
        losses[name] = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten())
        losses[name].backward()
    assert losses["checkpointed"].item() == losses["plain"].item()
    for (name, p), (_, q) in zip(plain.named_parameters(), checkpointed.named_parameters(), strict=True):
        assert torch.equal(p.grad.full_tensor(), q.grad.full_tensor()), name
    # the block is called once either way (FSDP2's hooks run once); inside it, the checkpointed
    # forward runs again in the backward pass
    assert calls == {"plain block": 1, "plain inside": 1, "checkpointed block": 1, "checkpointed inside": 2}
