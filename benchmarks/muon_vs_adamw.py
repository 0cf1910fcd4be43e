"""Muon against AdamW at equal steps (issue 22, acceptance 3): ``experiment=shakespeare_char`` and
``experiment=gutenberg_small``, each optimizer at several peak learning rates, the final validation loss of every
run; then the best learning rate of each optimizer on shakespeare_char again with more seeds (mean, spread).

Each run is ``lm-lightning train experiment=<e> optimizer=<adamw|muon> optimizer.lr=<lr> seed=<s>`` in its own
process (``--jobs`` at a time, default one), into ``<out>/<e>/<optimizer>-lr<lr>-seed<s>-<steps>steps``; a run whose ``run.json`` already exists is
read, not rerun, and one stopped part-way resumes from its last.ckpt, so an interrupted benchmark continues. Both optimizers share everything else: the AdamW half of
``optimizer=muon`` uses ``optimizer=adamw``'s betas, eps and weight decay; only the hidden matrices differ.

    python benchmarks/muon_vs_adamw.py --out /tmp/bench22/muon                      # the experiments' full lengths
    python benchmarks/muon_vs_adamw.py --out /tmp/bench22/muon --steps gutenberg_small=300 --threads 1
    python benchmarks/muon_vs_adamw.py --out /tmp/bench22/muon --jobs 2    # two one-thread runs at once (2 cores)

``--steps e=N`` shortens an experiment to N steps (its warmup scaled by the same factor, one evaluation at the
end); the table says which lengths ran. Results: ``<out>/results.json`` and ``<out>/table.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from omegaconf import OmegaConf
from train_runs import final_val_loss

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = ("shakespeare_char", "gutenberg_small")
# factors of 2 around AdamW's 1e-3 (the experiments' and optimizer=adamw's); with match_rms_adamw Muon's update
# has AdamW's RMS, so the same grid serves both
LRS = {"adamw": (1e-3, 2e-3, 4e-3), "muon": (1e-3, 2e-3, 4e-3)}


def full_steps(experiment: str) -> tuple[int, int]:
    """(max_steps, warmup_steps) of the experiment as configured."""
    cfg = OmegaConf.load(REPO / "lm_lightning" / "conf" / "experiment" / f"{experiment}.yaml")
    return int(cfg.trainer.max_steps), int(cfg.scheduler.warmup_steps)


def train(out: Path, experiment: str, optimizer: str, lr: float, seed: int, steps: int, threads: int) -> float:
    """The final validation loss (nats/token) of one run, training it unless its run.json exists."""
    run_dir = out / experiment / f"{optimizer}-lr{lr:g}-seed{seed}-{steps}steps"
    max_steps, warmup = full_steps(experiment)
    overrides = [f"experiment={experiment}", f"optimizer={optimizer}", f"optimizer.lr={lr}", f"seed={seed}",
                 "logger=csv", "sample.max_new_tokens=0", f"num_threads={threads}"]
    if steps != max_steps:  # shortened: warmup in proportion, one evaluation at the end
        overrides += [f"trainer.max_steps={steps}", f"scheduler.warmup_steps={max(1, warmup * steps // max_steps)}",
                      f"trainer.val_check_interval={steps}", f"callbacks.last_checkpoint.every_n_train_steps={steps}"]
    loss = final_val_loss(run_dir, overrides, cwd=out)
    print(f"{experiment:17s} {optimizer:6s} lr={lr:<7g} seed={seed:<5d} final val loss {loss:.4f}", flush=True)
    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder of the runs, results.json and table.md")
    parser.add_argument("--steps", nargs="*", default=[], help="experiment=N: shorten that experiment to N steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1, 2], help="seeds of the spread (first: grid)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (num_threads)")
    parser.add_argument("--lrs", nargs="*", default=[], help="optimizer=lr,lr,...: that optimizer's grid")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (each its own process of --threads threads)")
    args = parser.parse_args()
    for choice in args.lrs:
        optimizer, values = choice.split("=")
        LRS[optimizer] = tuple(float(v) for v in values.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    steps = {e: full_steps(e)[0] for e in EXPERIMENTS} | {k: int(v) for k, v in (s.split("=") for s in args.steps)}

    pool = ThreadPoolExecutor(args.jobs)  # each run is a child process: threads only wait for them

    def lr_grid(e: str) -> dict[str, dict[float, float]]:
        runs = {o: {lr: pool.submit(train, args.out, e, o, lr, args.seeds[0], steps[e], args.threads) for lr in lrs}
                for o, lrs in LRS.items()}
        return {o: {lr: run.result() for lr, run in by_lr.items()} for o, by_lr in runs.items()}

    # shakespeare_char's grid and seed spread first: the cheaper runs, and the spread needs only that grid
    grid = {"shakespeare_char": lr_grid("shakespeare_char")}
    best = {"shakespeare_char": {o: min(v, key=v.get) for o, v in grid["shakespeare_char"].items()}}
    seeded = {o: [pool.submit(train, args.out, "shakespeare_char", o, best["shakespeare_char"][o], s,
                              steps["shakespeare_char"], args.threads) for s in args.seeds] for o in LRS}
    spread = {o: [run.result() for run in runs] for o, runs in seeded.items()}
    for e in EXPERIMENTS[1:]:
        grid[e] = lr_grid(e)
        best[e] = {o: min(v, key=v.get) for o, v in grid[e].items()}

    every_lr = sorted({lr for lrs in LRS.values() for lr in lrs})
    lines = ["| experiment | steps | optimizer | " + " | ".join(f"lr {lr:g}" for lr in every_lr) + " | best |",
             "|---|---|---|" + "---|" * (len(every_lr) + 1)]
    for e in EXPERIMENTS:
        for o in LRS:
            lines.append(f"| {e} | {steps[e]} | {o} | " + " | ".join(
                f"{grid[e][o][lr]:.4f}" if lr in grid[e][o] else "" for lr in every_lr)
                + f" | {grid[e][o][best[e][o]]:.4f} (lr {best[e][o]:g}) |")
    lines += ["", f"shakespeare_char at each optimizer's best lr, seeds {args.seeds} ({steps['shakespeare_char']} steps):",
              "", "| optimizer | lr | losses | mean | std | min-max |", "|---|---|---|---|---|---|"]
    for o in LRS:
        losses = spread[o]
        lines.append(f"| {o} | {best['shakespeare_char'][o]:g} | {', '.join(f'{x:.4f}' for x in losses)} | "
                     f"{statistics.mean(losses):.4f} | {statistics.stdev(losses):.4f} | {min(losses):.4f}-{max(losses):.4f} |")
    table = "\n".join(lines)
    print("\n" + table)
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "results.json").write_text(json.dumps(
        {"steps": steps, "seeds": args.seeds, "grid": {e: {o: {f"{lr:g}": v for lr, v in grid[e][o].items()}
                                                           for o in LRS} for e in EXPERIMENTS},
         "best_lr": best, "seed_spread_shakespeare_char": spread}, indent=1))


if __name__ == "__main__":
    main()
