"""SST-2 adaptation of one pre-trained checkpoint: full fine-tuning against the same architecture
trained from scratch, and LoRA, bottleneck adapters and a soft prompt; one table of trainable
parameters, dev accuracy and checkpoint sizes. Each row is one ``lm-lightning finetune`` run of a
ready experiment (conf/experiment/sst2_*.yaml), so every figure can be reproduced from the CLI.

    lm-lightning train experiment=gutenberg_bpe8k            # the pre-trained model (~18 min on 2 CPU cores)
    python benchmarks/sst2_adaptation.py --ckpt outputs/gutenberg_bpe8k/runs/<time>/checkpoints/best.ckpt

With ``--jobs 2`` two runs share the machine, one torch thread each (on 2 cores about as fast in
total as one after the other with two threads). ``--report`` prints the table of an earlier
``--out`` folder without training.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = {  # label -> overrides of `lm-lightning finetune`
    "full": ["experiment=sst2_head"],
    "scratch": ["experiment=sst2_head", "init=scratch"],
    "lora": ["experiment=sst2_lora"],
    "adapter": ["experiment=sst2_adapter"],
    "prompt": ["experiment=sst2_prompt"],
}


def run(label: str, ckpt: Path, out: Path, threads: int, extra: list[str]) -> float:
    """One fine-tuning run in ``out/label``; its wall seconds."""
    args = [sys.executable, "-m", "lm_lightning", "finetune", *RUNS[label], f"ckpt_path={ckpt.resolve()}",
            f"num_threads={threads}", f"hydra.run.dir={(out / label).resolve()}", *extra]
    start = time.perf_counter()
    with open(out / f"{label}.log", "w") as log:
        proc = subprocess.run(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    print(f"{label}: {'done' if proc.returncode == 0 else f'FAILED ({proc.returncode}), see ' + str(out / f'{label}.log')}"
          f" in {seconds / 60:.1f} min", flush=True)
    if proc.returncode == 0:
        (out / label / "wall_seconds.txt").write_text(f"{seconds:.1f}\n")
    return seconds


def table(out: Path) -> str:
    """A Markdown table of every finished run in ``out``."""
    rows, accuracy = [], {}
    for label in RUNS:
        record_file = out / label / "run.json"
        if not record_file.exists():
            continue
        r = json.loads(record_file.read_text())
        p, final = r["parameters"], r["final"]
        accuracy[label] = final["val/accuracy"]
        checkpoints = out / label / "checkpoints"  # the run's own folder, wherever it was moved
        full_mb = (checkpoints / Path(r["checkpoint"]).name).stat().st_size / 1e6
        adapter_mb = (checkpoints / Path(r["adapter_checkpoint"]).name).stat().st_size / 1e6 if r.get("adapter_checkpoint") else None
        adapter = f"{adapter_mb:.3f} MB ({adapter_mb / full_mb:.2%})" if adapter_mb is not None else "-"
        wall = out / label / "wall_seconds.txt"
        minutes = f"{float(wall.read_text()) / 60:.1f}" if wall.exists() else "-"
        rows.append(f"| {label} | {r['init']} | {r['peft'] or 'all'} | {p['trainable']:,} | {p['trainable'] / p['total']:.2%} "
                    f"| {final['val/accuracy']:.4f} | {final['val/loss']:.4f} | {r['majority_baseline']:.4f} | {r['steps']} "
                    f"| {full_mb:.1f} MB | {adapter} | {minutes} |")
    head = ["| run | init | trains | trainable | share | dev accuracy | dev loss | majority | steps | checkpoint | adapter-only | minutes |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    notes = []
    if "full" in accuracy and "scratch" in accuracy:
        notes.append(f"pre-training adds {100 * (accuracy['full'] - accuracy['scratch']):+.1f} points over scratch")
    if "full" in accuracy and "lora" in accuracy:
        notes.append(f"LoRA is {100 * (accuracy['lora'] - accuracy['full']):+.1f} points from full fine-tuning")
    return "\n".join(head + rows + ([""] + notes if notes else []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, help="the pre-trained checkpoint")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "sst2_adaptation", help="runs and summary.md")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"which of {', '.join(RUNS)}")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--report", action="store_true", help="only print the table of --out")
    parser.add_argument("overrides", nargs="*", help="more finetune overrides for every run, e.g. trainer.max_steps=500")
    a = parser.parse_args()
    if not a.report:
        if a.ckpt is None or not a.ckpt.is_file():
            parser.error(f"--ckpt {a.ckpt}: no such checkpoint (train one: lm-lightning train experiment=gutenberg_bpe8k)")
        labels = [label for label in a.runs.split(",") if label]
        if unknown := [label for label in labels if label not in RUNS]:
            parser.error(f"--runs: unknown {', '.join(unknown)}; choose from {', '.join(RUNS)}")
        a.out.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(a.jobs) as pool:
            list(pool.map(lambda label: run(label, a.ckpt, a.out, a.threads, a.overrides), labels))
    summary = table(a.out)
    (a.out / "summary.md").write_text(summary + "\n")
    print(summary)
    print(f"runs and summary.md: {a.out}")


if __name__ == "__main__":
    main()
