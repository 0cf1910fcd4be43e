"""The GPU check of issue 19 (``benchmarks/gpu_check.sh`` runs it): GPT-2 124M (12 × 768, context 1024,
vocabulary 50304) on synthetic tokens (``data=synthetic``), compiled, one GPU, through ``lm-lightning train``:

    bf16-mixed, fsdp (bf16-mixed), fsdp2 (bf16-mixed), fp16-mixed (loss scaling), bf16-true   --steps each
    resume: a bf16-mixed run killed (SIGKILL) after its step-5 last.ckpt, resumed with ckpt_path=last to step 10

Each run prints tokens/s (median step after --warmup steps), MFU against --peak (989 TFLOP/s, H100 bf16
dense) with the model's own training FLOPs per token, and the peak ``torch.cuda.max_memory_allocated``
against ``lm-lightning estimate``'s per-device total for the same shape, precision and micro-batch.

Without a GPU it composes every run's config (the train command's override check, Hydra's composition and
``check_train_config``: what ``--cfg job`` shows, with ``--print-config``), prints the estimates, says in one
line that there is no GPU and exits 0. Nothing trains.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch

HERE = Path(__file__).resolve().parent
GPT2 = ["model.n_layer=12", "model.n_head=12", "model.n_embd=768", "model.block_size=1024",
        "data=synthetic", "data.corpus.vocab_size=50304"]
# the estimate command's strategy row for each run's strategy (fsdp with one unit per block shards as fsdp2)
ESTIMATE_ROW = {"auto": "single", "ddp": "ddp", "fsdp": "fsdp2", "fsdp2": "fsdp2"}


@dataclass
class Run:
    name: str
    overrides: list[str]
    strategy: str = "auto"
    precision: str = "bf16_mixed"
    kill_after_step: int | None = None  # resume check: SIGKILL once last.ckpt of this step exists, then resume
    extra: list[str] = field(default_factory=list)


def runs(steps: int) -> list[Run]:
    timed = [Run("bf16-mixed", []), Run("fsdp", [], strategy="fsdp"), Run("fsdp2", [], strategy="fsdp2"),
             Run("fp16-mixed", [], precision="fp16_mixed"), Run("bf16-true", [], precision="bf16_true")]
    for run in timed:
        run.overrides = [f"trainer.max_steps={steps}", f"scheduler.total_steps={steps}", "compile=true"]
    resume = Run("resume", ["trainer.max_steps=10", "scheduler.total_steps=10", "compile=false",
                            "callbacks.last_checkpoint.every_n_train_steps=5"], kill_after_step=5)
    return [*timed, resume]


def overrides_of(run: Run, out: Path, batch: int, warmup: int) -> list[str]:
    """The train command line of ``run`` (without ``hydra.run.dir``)."""
    return [*GPT2, f"strategy={run.strategy}", f"precision={run.precision}", f"data.batch_size={batch}",
            *run.overrides, "scheduler.warmup_steps=2", "trainer.accelerator=gpu", "trainer.devices=1",
            "trainer.val_check_interval=100000", "trainer.limit_val_batches=1", "sample.max_new_tokens=0",
            "logger=csv", "trainer.enable_model_summary=false",
            "+callbacks.gpu_check._target_=gpu_check.StepStats", f"+callbacks.gpu_check.out={out / 'gpu_check.json'}",
            f"+callbacks.gpu_check.warmup={warmup}", *run.extra]


class StepStats(L.Callback):
    """Writes ``out`` (JSON) at the end of training: step seconds (wall time between consecutive batch ends),
    tokens per step, and the peak CUDA memory allocated since training started (bytes)."""

    def __init__(self, out: str, warmup: int = 5) -> None:
        self.out, self.warmup, self.ends, self.tokens = Path(out), warmup, [], 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.ends = [time.perf_counter()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.tokens = batch.numel() - batch.size(0)  # (batch, block + 1) windows: inputs are block tokens each
        self.ends.append(time.perf_counter())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        seconds = [b - a for a, b in zip(self.ends, self.ends[1:])]
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
        self.out.write_text(json.dumps({"step_seconds": seconds, "tokens_per_step": self.tokens * trainer.world_size,
                                        "warmup": self.warmup, "peak_bytes": peak}))


def compose(args: list[str], output_dir: Path):
    """``args`` composed as the train command composes them (override check, Hydra, config checks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from lm_lightning.config.app import CONF_DIR
    from lm_lightning.config.checks import check_train_config
    from lm_lightning.config.overrides import check_overrides

    problem = check_overrides("train", args)
    if problem:
        raise SystemExit(f"error: {problem}")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=[*args, f"paths.output_dir={output_dir}"])
    check_train_config(cfg)
    return cfg


def estimate_bytes(cfg, strategy: str) -> tuple[float, str]:
    """``lm-lightning estimate``'s per-device total (no activation checkpointing) for ``cfg`` under
    ``strategy``, and the estimate command line that prints it."""
    from lm_lightning.config.app import plain
    from lm_lightning.models.memory import estimate, per_device

    model = {**plain(cfg.model), "vocab_size": cfg.data.corpus.vocab_size}
    est = estimate(model, cfg.precision.trainer_precision, "adamw", cfg.data.batch_size, None)
    row = ESTIMATE_ROW[strategy]
    command = (f"lm-lightning estimate model.n_layer={model['n_layer']} model.n_embd={model['n_embd']} "
               f"model.n_head={model['n_head']} model.block_size={model['block_size']} vocab_size={model['vocab_size']} "
               f"precision={_option(cfg.precision.trainer_precision)} micro_batch_size={cfg.data.batch_size} devices=1"
               f"  # row {row}")
    return per_device(est, row, 1)["total"], command


def _option(trainer_precision: str) -> str:
    return {"bf16-mixed": "bf16_mixed", "bf16-true": "bf16_true", "16-mixed": "fp16_mixed"}.get(trainer_precision, "fp32")


def train(args: list[str], run_dir: Path, kill_after_step: int | None, timeout: float) -> tuple[int, float]:
    """``python -m lm_lightning train args hydra.run.dir=run_dir``; with ``kill_after_step``, SIGKILLed once
    ``last.ckpt`` holds that step. Returns (exit status, seconds); the output goes to ``run_dir/train.out``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "WANDB_MODE": "disabled"}
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(run_dir / "train.out", "a") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lm_lightning", "train", *args, f"hydra.run.dir={run_dir}"],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            if kill_after_step is None:
                proc.wait(timeout=timeout)
            else:
                from lm_lightning.training.last_checkpoint import checkpoint_step

                last = run_dir / "checkpoints" / "last.ckpt"
                while proc.poll() is None and time.perf_counter() - start < timeout:
                    if last.exists() and _step_or_none(checkpoint_step, last) == kill_after_step:
                        proc.send_signal(signal.SIGKILL)
                        proc.wait()
                        break
                    time.sleep(0.2)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return proc.returncode, time.perf_counter() - start


def _step_or_none(read, path: Path) -> int | None:
    try:
        return read(path)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError):  # read while the rename replaced it
        return None


def report(name: str, run_dir: Path, peak_flops: float, estimated: float) -> str:
    stats = json.loads((run_dir / "gpu_check.json").read_text())
    record = json.loads((run_dir / "run.json").read_text())
    steady = stats["step_seconds"][stats["warmup"]:] or stats["step_seconds"]
    step = statistics.median(steady)
    tokens_per_s = stats["tokens_per_step"] / step
    mfu = tokens_per_s * record["flops_per_token"] / peak_flops
    peak = stats["peak_bytes"]
    return (f"{name:<11} {tokens_per_s:>10,.0f} tokens/s  MFU {mfu:6.1%}  step {step * 1e3:7.1f} ms  "
            f"peak {peak / 1e9:6.2f} GB vs estimate {estimated / 1e9:6.2f} GB ({peak / estimated:.2f}x)  "
            f"final val/loss {record['final'].get('val/loss', float('nan')):.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/gpu_check"), help="folder of the run folders")
    parser.add_argument("--steps", type=int, default=20, help="steps of each timed run")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the median (compilation)")
    parser.add_argument("--batch-size", type=int, default=16, help="windows of 1024 tokens per step")
    parser.add_argument("--peak", type=float, default=989e12, help="peak FLOP/s for MFU (H100 bf16 dense)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these (names as listed)")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds: later runs are skipped past this")
    parser.add_argument("--print-config", action="store_true", help="print each composed config (--cfg job)")
    opts = parser.parse_args(argv)
    if opts.steps <= opts.warmup:
        parser.error(f"--steps={opts.steps} must exceed --warmup={opts.warmup}")

    from omegaconf import OmegaConf

    plan = [run for run in runs(opts.steps) if opts.only is None or run.name in opts.only]
    if not plan:
        parser.error(f"--only {' '.join(opts.only)}: choose from {', '.join(r.name for r in runs(opts.steps))}")
    composed = {}
    for run in plan:
        run_dir = (opts.out / run.name).resolve()
        args = overrides_of(run, run_dir, opts.batch_size, opts.warmup)
        cfg = compose(args, run_dir)
        estimated, estimate_command = estimate_bytes(cfg, run.strategy)
        composed[run.name] = (args, run_dir, estimated)
        print(f"composed {run.name}: lm-lightning train {' '.join(args)}", flush=True)
        print(f"  estimate {estimated / 1e9:.2f} GB per device: {estimate_command}", flush=True)
        if opts.print_config:
            print(OmegaConf.to_yaml(cfg), flush=True)
    if not torch.cuda.is_available():
        print(f"no GPU: CUDA is not available here; composed {len(plan)} configs, trained nothing", flush=True)
        return 0

    print(f"GPU: {torch.cuda.get_device_name(0)}; MFU against {opts.peak / 1e12:.0f} TFLOP/s", flush=True)
    started, failures = time.perf_counter(), 0
    for run in plan:
        args, run_dir, estimated = composed[run.name]
        left = opts.budget - (time.perf_counter() - started)
        if left < 30:
            print(f"{run.name:<11} skipped: the --budget of {opts.budget:.0f} s is spent", flush=True)
            failures += 1
            continue
        code, seconds = train(args, run_dir, run.kill_after_step, timeout=left)
        if run.kill_after_step is not None:
            killed_at = code
            code, more = train([*args, "ckpt_path=last"], run_dir, None, timeout=max(left - seconds, 30))
            seconds += more
            steps = json.loads((run_dir / "run.json").read_text())["steps"] if code == 0 else None
            ok = killed_at == -signal.SIGKILL and code == 0 and steps == 10
            failures += not ok
            print(f"{run.name:<11} {'ok' if ok else 'FAILED'}: killed at step {run.kill_after_step} (exit {killed_at}), "
                  f"resumed to step {steps} (exit {code}) in {seconds:.0f} s; log {run_dir / 'train.out'}", flush=True)
            continue
        if code != 0:
            failures += 1
            print(f"{run.name:<11} FAILED (exit {code}) after {seconds:.0f} s: see {run_dir / 'train.out'}", flush=True)
            continue
        print(f"{report(run.name, run_dir, opts.peak, estimated)}  [{seconds:.0f} s]", flush=True)
    print(f"gpu check: {len(plan) - failures} of {len(plan)} runs ok in {time.perf_counter() - started:.0f} s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
