"""nanoGPT's CPU Shakespeare run and ``lm-lightning train experiment=shakespeare_char`` side by side, in turn.

    python benchmarks/side_by_side_nanogpt.py --nanogpt /tmp/nanoGPT                 # 3 pairs, model.position=learned
    python benchmarks/side_by_side_nanogpt.py --nanogpt /tmp/nanoGPT --pairs 5 --rope  # also the shipped (rope) experiment
    python benchmarks/side_by_side_nanogpt.py --nanogpt /tmp/nanoGPT --pairs 1 --max-iters 300   # a quick check

Machines are shared and differ by 2x or more from day to day (BASELINES.md), so the runs alternate
(nanoGPT, lm-lightning, nanoGPT, lm-lightning, ...) and what counts is the median ratio lm-lightning / nanoGPT
of each figure: whole-process wall time and CPU time (user + sys of the child process, from ``os.wait4``).
Each run's final validation loss is printed beside them: nanoGPT's last printed estimate (eval_iters=20
batches) and lm-lightning's from its ``run.json`` (the whole validation split).

The nanoGPT checkout gets ``data/shakespeare_char/{train.bin,val.bin,meta.pkl}`` written from the shared
Tiny Shakespeare as its ``prepare.py`` writes them (its prepare.py downloads, which fails here).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lm_lightning.evaluation.harness_data import shared_data_dir

REPO = Path(__file__).resolve().parents[1]
INPUT = shared_data_dir() / "tinyshakespeare/input.txt"  # $LM_LIGHTNING_DATA, else ../shared/data
# BASELINES.md's nanoGPT CPU command, with --log_interval=100 (less printing) as the side-by-side of 2026-12-06
NANOGPT_ARGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                "--log_interval=100", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                "--n_embd=128", "--dropout=0.0"]


TARGETS = {"lm-lightning learned": 0.9, "lm-lightning rope": 0.95}  # issue 19: median wall ratio to nanoGPT


@dataclass
class Run:
    wall: float  # whole process, s
    cpu: float  # user + sys of the child process, s
    val_loss: float


def prepare_nanogpt_data(checkout: Path, text_path: Path = INPUT) -> Path:
    """Writes what nanoGPT's data/shakespeare_char/prepare.py writes: the sorted characters as the
    vocabulary (stoi/itos), uint16 ids, the first 90% of characters for training."""
    if not text_path.is_file():
        sys.exit(f"Tiny Shakespeare is not at {text_path}: set LM_LIGHTNING_DATA to the shared data folder")
    out = checkout / "data/shakespeare_char"
    out.mkdir(parents=True, exist_ok=True)
    data = text_path.read_text()
    chars = sorted(set(data))
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}
    n = len(data)
    for name, part in (("train", data[: int(n * 0.9)]), ("val", data[int(n * 0.9):])):
        np.array([stoi[c] for c in part], dtype=np.uint16).tofile(out / f"{name}.bin")
    with open(out / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": itos, "stoi": stoi}, f)
    return out


def timed(command: list[str], cwd: Path, log: Path) -> tuple[float, float, str]:
    """Runs ``command``; returns its wall time, its CPU time (user + sys, its children included) and its output."""
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text()
    if process.returncode:
        sys.exit(f"{' '.join(command)} failed ({process.returncode}); its output is in {log}:\n{text[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime, text


def run_nanogpt(checkout: Path, max_iters: int, work: Path, index: int) -> Run:
    command = [sys.executable, "train.py", *NANOGPT_ARGS, f"--max_iters={max_iters}", f"--lr_decay_iters={max_iters}",
               f"--out_dir={work / f'nanogpt-{index}'}"]
    wall, cpu, text = timed(command, checkout, work / f"nanogpt-{index}.log")
    losses = re.findall(r"val loss ([0-9.]+)", text)
    return Run(wall, cpu, float(losses[-1]) if losses else float("nan"))


def run_lm_lightning(overrides: list[str], max_iters: int, work: Path, index: int, name: str) -> Run:
    run_dir = work / f"{name}-{index}"
    command = [sys.executable, "-m", "lm_lightning", "train", "experiment=shakespeare_char", *overrides,
               f"trainer.max_steps={max_iters}", f"hydra.run.dir={run_dir}"]
    if max_iters < 500:  # the experiment validates every 500 steps
        command.append(f"trainer.val_check_interval={max_iters}")
    wall, cpu, _ = timed(command, REPO, work / f"{name}-{index}.log")
    record = json.loads((run_dir / "run.json").read_text())
    return Run(wall, cpu, record["final"].get("val/loss", float("nan")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt", type=Path, required=True, help="a nanoGPT checkout (scratch folder)")
    parser.add_argument("--pairs", type=int, default=3, help="runs of each, alternating (at least 3 for a figure to quote)")
    parser.add_argument("--max-iters", type=int, default=2000, help="training steps of both (BASELINES.md: 2000); nanoGPT evaluates every 250 "
                        "steps, so its val loss is from the last multiple of 250")
    parser.add_argument("--rope", action="store_true", help="also run the shipped experiment (rotary positions)")
    parser.add_argument("--work", type=Path, default=None, help="folder for logs and runs (default: a temporary one)")
    args = parser.parse_args()

    prepare_nanogpt_data(args.nanogpt.resolve())
    work = args.work or Path(tempfile.mkdtemp(prefix="side_by_side_"))
    work.mkdir(parents=True, exist_ok=True)
    variants = {"lm-lightning learned": ["model.position=learned"]}
    if args.rope:
        variants["lm-lightning rope"] = []
    runs: dict[str, list[Run]] = {"nanoGPT": [], **{name: [] for name in variants}}
    print(f"{args.pairs} rounds of {', '.join(runs)}, {args.max_iters} iterations each; logs and runs in {work}")
    print(f"{'round':>5}  {'run':<22} {'wall s':>8} {'CPU s':>8} {'val loss':>9}", flush=True)
    for index in range(args.pairs):
        results = [("nanoGPT", run_nanogpt(args.nanogpt.resolve(), args.max_iters, work, index))]
        for name, overrides in variants.items():
            results.append((name, run_lm_lightning(overrides, args.max_iters, work, index, name.split()[-1])))
        for name, run in results:
            runs[name].append(run)
            print(f"{index + 1:>5}  {name:<22} {run.wall:8.1f} {run.cpu:8.1f} {run.val_loss:9.4f}", flush=True)

    print("\nmedian ratio to nanoGPT over the rounds (wall, CPU); median val loss")
    base = runs["nanoGPT"]
    print(f"  {'nanoGPT':<22} wall {statistics.median(r.wall for r in base):7.1f} s  "
          f"CPU {statistics.median(r.cpu for r in base):7.1f} s  val loss {statistics.median(r.val_loss for r in base):.4f}")
    for name in variants:
        ours = runs[name]
        wall = statistics.median(a.wall / b.wall for a, b in zip(ours, base))
        cpu = statistics.median(a.cpu / b.cpu for a, b in zip(ours, base))
        print(f"  {name:<22} wall {wall:.3f}x  CPU {cpu:.3f}x  val loss {statistics.median(r.val_loss for r in ours):.4f}"
              f"  (target wall <= {TARGETS[name]})")


if __name__ == "__main__":
    main()
