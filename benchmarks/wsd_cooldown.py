"""Cooldown branches against full warmup-cosine runs (issue 22, acceptance 4), on Gutenberg with the 1024-token BPE
of sweeps/scaling_cpu.yaml, context 64, 16 windows per step (1024 tokens), lr 1e-3:

1. the warmup-stable-decay ladder of sweeps/wsd_ladder.yaml (stable runs, then a 20% linear cooldown from each
   branch point, sweeps/wsd_ladder_branches.yaml) at the depths given;
2. separate warmup-cosine runs (to 10% of the peak, the project's default) of the same lengths at ``--depth``;
3. the table: final validation loss of each branch against the cosine run of its length, and both compute totals
   (the ladder's stable run plus its cooldowns against the sum of the cosine runs);
4. ``lm-lightning scaling fit`` of all branches: L(N), L(D), L(C) and L(N, D) with R².

    python benchmarks/wsd_cooldown.py --out /tmp/wsd [--depths 1,2,3,4,5] [--depth 2] [--seeds 1337] [--lr 3e-3]
        [--lengths 400,800,1200,1600,2000] [--cooldown 0.2] [--extra "model.block_size=32 data.batch_size=8"]

Every run is an ordinary ``lm-lightning train`` (nice 10, one thread, CSV logger). Not a test: it takes about
30-45 minutes on 2 shared cores. Finished runs are kept: rerunning skips the steps whose folders are complete.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LENGTHS = (400, 800, 1200, 1600, 2000)  # the branches' lengths in steps (sweeps/wsd_ladder_branches.yaml)


def lm_lightning(*args: str, cwd: Path) -> None:
    command = ["nice", "-n", "10", sys.executable, "-m", "lm_lightning", *args]
    print("$ lm-lightning " + " ".join(args), flush=True)
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def records(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.rglob("run.json"))]


def train_sweep(config: str, out: Path, *overrides: str) -> None:
    lm_lightning("train", "-m", "--config-dir", str(REPO / "sweeps"), "--config-name", config, "num_threads=1",
                 "logger=csv", f"paths.log_dir={out}", *overrides, cwd=out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench22/wsd/out"))
    parser.add_argument("--depths", default="2,3,4,5,6", help="ladder depths (width = 32 x depth)")
    parser.add_argument("--depth", type=int, default=2, help="the size compared with cosine runs (0: none)")
    parser.add_argument("--seeds", default="1337", help="comma-separated seeds of the ladder")
    parser.add_argument("--lr", type=float, default=None, help="peak lr of every run (default: the sweep's 1e-3)")
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="branch lengths, steps")
    parser.add_argument("--cooldown", type=float, default=0.2, help="cooldown share of each branch's length")
    parser.add_argument("--extra", default="", help="space-separated overrides for every run (e.g. model.block_size=32)")
    parser.add_argument("--cosine-min-lr-ratio", type=float, default=0.1,
                        help="the cosine runs' final lr as a share of the peak (0.1: the project's default; 0: as the branches)")
    parser.add_argument("--skip-ladder", action="store_true", help="only --depth: no other sizes, no fit")
    args = parser.parse_args()
    out = args.out.resolve()
    lengths = [int(t) for t in args.lengths.split(",")]
    starts = [t - round(args.cooldown * t) for t in lengths]
    common = ([f"optimizer.lr={args.lr}"] if args.lr else []) + args.extra.split()
    stable_args = [*common, f"trainer.max_steps={max(starts)}", f"callbacks.branch_points.steps=[{','.join(map(str, starts))}]"]
    branch_args = [*common, "branch=" + ",".join(f"{{step: {s}, end: {t}}}" for s, t in zip(starts, lengths))]
    out.mkdir(parents=True, exist_ok=True)
    ladder = out / "wsd_ladder"
    others = [] if args.skip_ladder else [d for d in args.depths.split(",") if d != str(args.depth)]
    for depths in ([str(args.depth)] if args.depth else [], others):  # the compared size first: its table is ready early
        if not depths:
            continue
        done = {(r["config"]["model"]["n_layer"], r["config"]["seed"]) for r in records(ladder / "stable")}
        todo = [d for d in depths if any((int(d), int(s)) not in done for s in args.seeds.split(","))]
        sweep = [f"model.n_layer={','.join(todo)}", f"seed={args.seeds}"]
        if todo:
            train_sweep("wsd_ladder", out, *sweep, *stable_args)
            train_sweep("wsd_ladder_branches", out, *sweep, *branch_args)
        if depths == [str(args.depth)]:
            floor = args.cosine_min_lr_ratio
            cosine = out / ("cosine" if floor == 0.1 else f"cosine_min{floor:g}")
            missing = sorted(set(lengths) - {r["steps"] for r in records(cosine)})  # a finished length is kept
            if missing:
                train_sweep("wsd_ladder", out, "scheduler=warmup_cosine", f"scheduler.min_lr_ratio={floor}",
                            "callbacks.branch_points=null",
                            f"model.n_layer={args.depth}", f"seed={args.seeds.split(',')[0]}",
                            f"trainer.max_steps={','.join(map(str, missing))}", f"hydra.sweep.dir={cosine}",
                            "hydra.sweep.subdir=T${trainer.max_steps}", *common)
            compare(ladder, cosine, args.depth, int(args.seeds.split(",")[0]))
    if not args.skip_ladder:
        lm_lightning("scaling", "fit", f"runs=[{ladder / 'branches'}]", "tracker=null", "holdout_largest=false",
                     f"output_dir={out / 'fit'}", cwd=out)
        fits = json.loads((out / "fit" / "fits.json").read_text())
        law = fits.get("L(N,D)")
        if law:
            print(f"L(N, D) over {law['n_points']} points: R² = {law['r2']:.4f}, E {law['E']:.3f}, "
                  f"alpha {law['alpha']:.3f}, beta {law['beta']:.3f}")
        seconds = sum(r.get("seconds") or 0 for r in records(ladder))
        print(f"ladder: {len(records(ladder / 'stable'))} stable runs + {len(records(ladder / 'branches'))} branches, "
              f"{seconds / 60:.1f} min of training (fit time, contended 2-core CPU)")


def compare(ladder: Path, cosine: Path, depth: int, seed: int) -> None:
    def mine(rs: list[dict]) -> list[dict]:
        return [r for r in rs if r["config"]["model"]["n_layer"] == depth and r["config"]["seed"] == seed]

    stable = mine(records(ladder / "stable"))[0]
    branches = {r["steps"]: r for r in mine(records(ladder / "branches"))}
    cosines = {r["steps"]: r for r in records(cosine)}
    per_step = stable["training_flops"] / stable["steps"]
    wsd_total = stable["training_flops"] + sum((r["steps"] - r["config"]["branch"]["step"]) * per_step
                                               for r in branches.values())
    cosine_total = sum(r["training_flops"] for r in cosines.values())
    print(f"\ndepth {depth} (N = {stable['parameters']['non_embedding']:,} non-embedding), seed {seed}")
    print(f"  {'steps':>6} {'tokens':>10} {'cosine loss':>12} {'branch loss':>12} {'difference':>11}")
    for steps in sorted(set(branches) & set(cosines)):
        c, b = cosines[steps]["final"]["val/loss"], branches[steps]["final"]["val/loss"]
        print(f"  {steps:>6} {branches[steps]['tokens_trained']:>10,} {c:>12.4f} {b:>12.4f} {(b - c) / c:>+10.2%}")
    print(f"  compute: WSD stable run + {len(branches)} cooldowns {wsd_total:.3g} FLOPs, {len(cosines)} cosine runs "
          f"{cosine_total:.3g} FLOPs (ratio {wsd_total / cosine_total:.2f})\n", flush=True)


if __name__ == "__main__":
    main()
