"""Throughput of the platform's Trainer path against a plain PyTorch loop: same GPT, same batches, same
optimizer, measured in one run (machines are shared and noisy: compare the ratio, not the figures).

    python benchmarks/throughput.py                       # both CPU shapes of issue 7, fp32, compile off
    python benchmarks/throughput.py --shapes gpt2 --precision bf16-mixed --compile --device cuda

The Trainer path is the Trainer of ``lm-lightning train experiment=shakespeare_char`` (reshaped): the Job's
loggers (conf/logger: W&B, offline unless logged in, and CSV) and every callback of conf/callbacks (checkpoints,
non-finite guard, lr monitor, throughput monitor, progress bar), the task's metrics and logging, the optimizer and
schedule of conf/ (warm-up shortened to a tenth of ``--steps``); only validation is off. The plain loop has the
same model, optimizer (conf/, with the fused kernels the task picks), schedule and batches. Between them, "bare
Lightning" is Lightning's own floor: the plain loop's model, loss, optimizer and schedule in a LightningModule that
logs nothing, under a Trainer with every callback, logger and the progress bar off (gradient clipping on, as in both).
Each path runs ``--runs`` times, in turn; the ratios quoted are medians over runs.

Shapes: ``nanogpt`` = BASELINES.md's CPU nanoGPT run (4 layers, 4 heads, 128 wide, context 64, batch 12,
65 characters); ``small`` = 6 layers, 6 heads, 384 wide, context 256, batch 4; ``gpt2`` = GPT-2 124M
(12 × 768, context 1024, vocabulary 50304, batch 16). Both paths train ``--steps`` steps; the median
step time is taken after ``--warmup`` steps, as wall time between consecutive step ends (data
loading and all framework work included). MFU is against ``--peak`` (default: on CPU, this CPU's matrix-product
peak as ``lm-lightning train`` measures it; 989 TFLOP/s for bf16 on an H100).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import statistics
import tempfile
import time
from pathlib import Path

import hydra
import lightning as L
import torch
import torch.nn.functional as F
import wandb
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from torch.utils.data import DataLoader

from lm_lightning.config.app import CONF_DIR, instantiate_group, plain
from lm_lightning.models.gpt import GPT, GPTConfig
from lm_lightning.parallel.cuda import optimizer_kwargs_for
from lm_lightning.tasks.language_model import LanguageModelTask, weight_decay_groups
from lm_lightning.tracking.callbacks import measured_cpu_peak
from lm_lightning.training.job import Job

SHAPES = {
    "nanogpt": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65, batch=12),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65, batch=4),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, batch=16),
}
AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
PRECISION_GROUPS = {"32-true": "fp32", "bf16-mixed": "bf16_mixed", "16-mixed": "fp16_mixed", "bf16-true": "bf16_true"}


def model_config(shape: dict) -> dict:
    return {k: v for k, v in shape.items() if k != "batch"} | {"dropout": 0.0, "bias": False}


def batches(shape: dict, steps: int, seed: int = 0) -> list[torch.Tensor]:
    """``steps`` random windows batches of shape (batch, block_size + 1), identical for both paths."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(shape["vocab_size"], (shape["batch"], shape["block_size"] + 1), generator=g)
            for _ in range(steps)]


def plain_parts(shape: dict, steps: int, device: str, precision: str, compile: bool) -> tuple:
    """The model, and the Trainer path's optimizer (with the fused kernels the task picks) and schedule."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**model_config(shape))).to(device)
    if compile:
        model.compile()
    with tempfile.TemporaryDirectory(prefix="throughput_") as run_dir:
        cfg = train_config(shape, steps, device, precision, Path(run_dir))
    factory = hydra.utils.instantiate(cfg.optimizer)
    optimizer = factory(params=weight_decay_groups(model, cfg.optimizer.weight_decay),
                        **optimizer_kwargs_for(factory, torch.device(device)))
    return model, optimizer, hydra.utils.instantiate(cfg.scheduler)(optimizer=optimizer)


def next_token_loss(model: torch.nn.Module, xy: torch.Tensor) -> torch.Tensor:
    logits = model(xy[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), xy[:, 1:].reshape(-1))


def plain_loop(shape: dict, data: list[torch.Tensor], device: str, precision: str, compile: bool) -> list[float]:
    model, optimizer, scheduler = plain_parts(shape, len(data), device, precision, compile)
    ends = [time.perf_counter()]
    for xy in data:
        xy = xy.to(device, non_blocking=True)
        with torch.autocast(device, dtype=AUTOCAST.get(precision, torch.float32), enabled=precision in AUTOCAST):
            loss = next_token_loss(model, xy)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the loop synchronises once a step, as Lightning's loss logging does
        ends.append(time.perf_counter())
    return [b - a for a, b in zip(ends, ends[1:])]


class BareTask(L.LightningModule):
    """Lightning's own floor: the plain loop's model, loss, optimizer and schedule in a LightningModule that logs
    nothing, trained by a Trainer with every default callback, logger and progress bar off."""

    def __init__(self, parts: tuple) -> None:
        super().__init__()
        self.model, self.optimizer, self.scheduler = parts

    def training_step(self, xy: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return next_token_loss(self.model, xy)

    def configure_optimizers(self) -> dict:
        return {"optimizer": self.optimizer, "lr_scheduler": {"scheduler": self.scheduler, "interval": "step"}}


def bare_lightning(shape: dict, data: list[torch.Tensor], device: str, precision: str, compile: bool) -> list[float]:
    task = BareTask(plain_parts(shape, len(data), device, precision, compile))
    timer = StepEnds()
    trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision=precision,
                        max_steps=len(data), gradient_clip_val=1.0, logger=False, callbacks=[timer],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(task, train_dataloaders=DataLoader(data, batch_size=None, shuffle=False, pin_memory=device == "cuda"))
    return [b - a for a, b in zip(timer.ends, timer.ends[1:])]


class StepEnds(L.Callback):
    def __init__(self) -> None:
        self.ends = [0.0]

    def on_train_start(self, trainer, pl_module) -> None:
        self.ends = [time.perf_counter()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())


def train_config(shape: dict, steps: int, device: str, precision: str, run_dir: Path) -> DictConfig:
    """``lm-lightning train experiment=shakespeare_char`` with the shape's model and batch: the trainer,
    callbacks and loggers of conf/ as a real run has them (W&B offline unless logged in, CSV)."""
    model = model_config(shape)
    overrides = [
        "experiment=shakespeare_char", "model.position=learned", f"data.batch_size={shape['batch']}",
        *(f"model.{k}={v}" for k, v in model.items() if k != "vocab_size"),
        f"trainer.max_steps={steps}", f"scheduler.warmup_steps={steps // 10}", f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}",
        f"precision={PRECISION_GROUPS[precision]}", f"paths.log_dir={run_dir}",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    job_cfg = copy.deepcopy(cfg)
    with open_dict(job_cfg):
        del job_cfg["hydra"]
    return job_cfg


def trainer_path(shape: dict, data: list[torch.Tensor], device: str, precision: str, compile: bool) -> list[float]:
    """The Trainer as ``lm-lightning train`` builds it (Job: conf/trainer, conf/logger, conf/callbacks), fed the
    same batches; only validation is off (this measures training steps)."""
    with tempfile.TemporaryDirectory(prefix="throughput_") as run_dir:
        cfg = train_config(shape, len(data), device, precision, Path(run_dir))
        torch.manual_seed(0)
        task = LanguageModelTask(
            model={**plain(cfg.model), "vocab_size": shape["vocab_size"]},
            objective=plain(cfg.objective),
            optimizer=hydra.utils.instantiate(cfg.optimizer),
            scheduler=hydra.utils.instantiate(cfg.scheduler),
            bytes_per_token={"train": 1.0, "val": 1.0},  # characters: one byte per token
            tokens_per_step=shape["batch"] * shape["block_size"],
            compile=compile,
        )
        timer = StepEnds()
        with Job(cfg) as job:
            trainer = job.build_trainer(callbacks=[*instantiate_group(cfg.callbacks), timer], limit_val_batches=0,
                                        num_sanity_val_steps=0)
            loader = DataLoader(data, batch_size=None, shuffle=False, pin_memory=device == "cuda")
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # the progress bar
                trainer.fit(task, train_dataloaders=loader)
            for logger in job.loggers:
                logger.finalize("success")
            if wandb.run is not None:
                wandb.run.finish()
    return [b - a for a, b in zip(timer.ends, timer.ends[1:])]


PATHS = {"plain PyTorch": plain_loop, "bare Lightning": bare_lightning, "Trainer": trainer_path}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["nanogpt", "small"], choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=30, help="steps per path (median over those after warm-up)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3, help="runs of each path, alternating; the ratio is the median over runs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "16-mixed", "bf16-true"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the model in both paths")
    parser.add_argument("--peak", type=float, default=None, help="peak FLOP/s for MFU")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = args.peak or (measured_cpu_peak() if args.device == "cpu" else 989e12)
    print(f"device {args.device}, {torch.get_num_threads()} threads, precision {args.precision}, "
          f"compile {'on' if args.compile else 'off'}, {args.steps} steps, median after {args.warmup}, peak {peak:.4g} FLOP/s")
    for name in args.shapes:
        shape = SHAPES[name]
        data = batches(shape, args.steps)
        flops_per_token = GPT(GPTConfig(**model_config(shape))).flops_per_token()
        tokens = shape["batch"] * shape["block_size"]
        medians: dict[str, list[float]] = {path: [] for path in PATHS}
        for _ in range(args.runs):  # in turn, so a busy spell of a shared machine hits every path
            for path, fn in PATHS.items():
                medians[path].append(statistics.median(fn(shape, data, args.device, args.precision, args.compile)[args.warmup:]))
        results = {path: statistics.median(values) for path, values in medians.items()}
        print(f"\n{name}: {shape['n_layer']} layers x {shape['n_embd']} wide, context {shape['block_size']}, "
              f"batch {shape['batch']} ({tokens} tokens/step), {flops_per_token:.4g} FLOPs/token")
        for path, median in results.items():
            rate = tokens / median
            print(f"  {path:<14} median step {median * 1000:8.2f} ms  {rate:10,.0f} tokens/s  "
                  f"MFU {rate * flops_per_token / peak:6.2%}")
        for path in ("bare Lightning", "Trainer"):
            ratios = [plain / other for plain, other in zip(medians["plain PyTorch"], medians[path])]
            ratio = statistics.median(ratios)
            print(f"  {path} / plain tokens/s = {ratio:.3f} ({(ratio - 1) * 100:+.1f}%), median of {args.runs} runs "
                  f"({', '.join(f'{r:.3f}' for r in ratios)})" + ("; target >= 0.98" if path == "Trainer" else ""))


if __name__ == "__main__":
    main()
