"""The Gutenberg CPU speedrun: train an experiment, then score the whole validation split, timed as one job.

    python benchmarks/speedrun.py                                   # experiment=speedrun_gutenberg, one seed
    python benchmarks/speedrun.py --seeds 3 --baseline              # three seeds, and one of the baseline beside them
    python benchmarks/speedrun.py --experiment gutenberg_bpe8k --set trainer.max_steps=100   # any experiment, shortened

Each run is ``lm-lightning train experiment=<name> seed=<s>`` in its own process, timed whole-process (wall time,
CPU time and peak memory of the child from ``os.wait4``, as ``/usr/bin/time`` reports them), followed by a strided
evaluation of the final checkpoint over every token of the corpus's validation split (windows of the model's
context advancing by half of it, so each token is predicted with at least half a context), in this process and
timed too: the budget covers training plus evaluation. Bits-per-byte = summed nats / ln 2 / UTF-8 bytes of the
validation split, the figure ``val/bpb`` reports during training (document separators count zero bytes).

``--baseline`` runs, in turn with the record (record, baseline, record, baseline, ...: machines drift), the same
experiment with the optimizer, tokenizer and model shape of ``gutenberg_bpe8k`` (the 1.876 bits-per-byte starting
point), so the gain is measured side by side on one machine; ``--baseline-seeds`` (1 by default: each run takes half
an hour) says how many of the seeds the baseline runs too. ``--variant NAME='key=value ...'`` adds a named
variant, the record with those overrides on top, run in turn the same way: one row of the README's change log
measured beside the record (``--variant adamw='optimizer=adamw optimizer.lr=1e-3'``). Corpus preparation is not
timed: each variant's corpus is prepared (or found in the cache) before the first timed run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

#: what ``--baseline`` sets back to gutenberg_bpe8k's: optimizer, tokenizer and model shape, and the steps of that
#: shape that fit the same budget (gutenberg_bpe8k's 1,250)
BASELINE_OVERRIDES = ("optimizer=adamw", "optimizer.lr=1.0e-3", "tokenizer=bpe", "tokenizer.vocab_size=8192",
                      "model=gpt", "model.block_size=128", "model.n_layer=6", "model.n_head=8", "model.n_embd=256",
                      "data.batch_size=32", "trainer.max_steps=1250", "trainer.val_check_interval=625")


@dataclass
class Result:
    variant: str
    seed: int
    train_wall: float  # seconds, the train process from start to exit
    train_cpu: float  # user + system seconds of the train process and its children
    peak_rss_mb: float
    eval_wall: float
    tokens: int
    flops: float
    mfu: float | None
    bpb: float
    run_dir: Path

    @property
    def wall(self) -> float:
        return self.train_wall + self.eval_wall


def timed(command: list[str], log: Path) -> tuple[int, float, float, float]:
    """(exit status, wall seconds, CPU seconds, peak resident MB) of ``command`` run to its end."""
    start = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    return os.waitstatus_to_exitcode(status), wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def strided_bpb(run_dir: Path, stride_fraction: float) -> tuple[float, float]:
    """(bits-per-byte over the whole validation split, seconds) of the run's last checkpoint."""
    from lm_lightning.data.corpus import open_prepared
    from lm_lightning.evaluation.perplexity import score_stream
    from lm_lightning.training.loading import load_trained

    start = time.monotonic()
    record = json.loads((run_dir / "run.json").read_text())
    task, _ = load_trained(record["checkpoints"]["last"])
    corpus = open_prepared(Path(record["corpus_dir"]))
    window = int(record["config"]["model"]["block_size"])
    scores = score_stream(task.model, corpus.tokens("val"), window=window,
                          stride=max(1, int(window * stride_fraction)), accelerator="cpu")
    return scores.nats / math.log(2) / corpus.num_bytes("val"), time.monotonic() - start


def run_one(variant: str, overrides: list[str], seed: int, out: Path, stride_fraction: float) -> Result:
    run_dir = out / f"{variant}-seed{seed}"
    command = [sys.executable, "-m", "lm_lightning", "train", *overrides, f"seed={seed}", f"hydra.run.dir={run_dir}",
               "logger.wandb.mode=offline", "sample.max_new_tokens=0"]
    status, wall, cpu, rss = timed(command, out / f"{variant}-seed{seed}.log")
    if status != 0:
        sys.exit(f"error: {' '.join(command)} exited {status}; its output is in {out / f'{variant}-seed{seed}.log'}")
    bpb, eval_wall = strided_bpb(run_dir, stride_fraction)
    record = json.loads((run_dir / "run.json").read_text())
    return Result(variant, seed, wall, cpu, rss, eval_wall, int(record["tokens_trained"]),
                  float(record["training_flops"]), (record.get("throughput") or {}).get("mfu"), bpb, run_dir)


def prepare(overrides: list[str], out: Path, variant: str) -> None:
    """The variant's corpus in the cache before the clock starts (preparing is reported apart, not timed)."""
    command = [sys.executable, "-m", "lm_lightning", "train", *overrides, "debug=fdr", "sample.max_new_tokens=0",
               "logger=csv", f"hydra.run.dir={out / f'{variant}-prepare'}"]
    status, wall, _, _ = timed(command, out / f"{variant}-prepare.log")
    if status != 0:
        sys.exit(f"error: preparing the corpus for {variant} failed; its output is in {out / f'{variant}-prepare.log'}")
    print(f"{variant}: corpus ready ({wall:.0f} s, not counted)", flush=True)


def table(results: list[Result], budget_s: float) -> list[str]:
    lines = [f"{'run':<22} {'train s':>8} {'eval s':>7} {'total s':>8} {'CPU s':>8} {'peak MB':>8} {'tokens':>11} "
             f"{'FLOPs':>9} {'MFU':>6} {'val bpb':>8}"]
    for r in results:
        mfu = f"{r.mfu:.1%}" if r.mfu is not None else "n/a"
        over = "  over budget" if r.wall > budget_s else ""
        lines.append(f"{r.variant + f' seed {r.seed}':<22} {r.train_wall:>8.1f} {r.eval_wall:>7.1f} {r.wall:>8.1f} "
                     f"{r.train_cpu:>8.1f} {r.peak_rss_mb:>8.0f} {r.tokens:>11,} {r.flops:>9.3g} {mfu:>6} "
                     f"{r.bpb:>8.4f}{over}")
    for variant in dict.fromkeys(r.variant for r in results):
        bpbs = [r.bpb for r in results if r.variant == variant]
        walls = [r.wall for r in results if r.variant == variant]
        spread = f", spread {max(bpbs) - min(bpbs):.4f} (sd {statistics.stdev(bpbs):.4f})" if len(bpbs) > 1 else ""
        lines.append(f"{variant}: mean val bpb {statistics.mean(bpbs):.4f} over {len(bpbs)} seed(s){spread}; "
                     f"wall {min(walls):.0f}-{max(walls):.0f} s of a {budget_s:.0f} s budget")
    return lines


def run_order(seeds: int, variants: list[str], baseline_seeds: int) -> list[tuple[str, int]]:
    """(variant, seed) in the order they run: variants in turn at each seed; all but the record at the first
    ``baseline_seeds`` seeds only."""
    return [(name, seed) for seed in range(seeds) for name in variants if name == "record" or seed < baseline_seeds]


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``NAME=key=value key=value`` -> (NAME, its overrides); the name becomes part of run folder names."""
    name, _, overrides = text.partition("=")
    if not name.isidentifier() or name in ("record", "baseline") or not overrides.strip():
        raise argparse.ArgumentTypeError(
            f"--variant {text!r}: expected NAME='key=value ...' with NAME a word other than record and baseline, "
            "for example --variant adamw='optimizer=adamw optimizer.lr=1e-3'")
    return name, shlex.split(overrides)


def build_variants(record: list[str], baseline: bool, named: list[tuple[str, list[str]]]) -> dict[str, list[str]]:
    """Each variant's overrides: the record's, the baseline's (``--baseline``) and each named one on the record's."""
    names = [name for name, _ in named]
    if repeated := sorted({name for name in names if names.count(name) > 1}):
        raise ValueError(f"--variant {', '.join(repeated)} given more than once: name each variant once")
    return {"record": record, **({"baseline": [*record, *BASELINE_OVERRIDES]} if baseline else {}),
            **{name: [*record, *overrides] for name, overrides in named}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="speedrun_gutenberg", help="conf/experiment/<name>.yaml to run")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1, each a full run")
    parser.add_argument("--baseline", action="store_true", help="also run gutenberg_bpe8k's optimizer, tokenizer, shape")
    parser.add_argument("--baseline-seeds", type=int, default=1,
                        help="how many of the seeds the baseline and each --variant run")
    parser.add_argument("--variant", type=parse_variant, action="append", default=[], metavar="NAME='KEY=VALUE ...'",
                        help="another variant: the record with these overrides, run in turn with it")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an extra override for every run")
    parser.add_argument("--budget-minutes", type=float, default=30.0, help="the wall-time budget each run is held to")
    parser.add_argument("--stride-fraction", type=float, default=0.5, help="evaluation stride as a share of the context")
    parser.add_argument("--out", type=Path, default=Path("outputs/speedrun"), help="run folders and logs")
    args = parser.parse_args()

    try:
        variants = build_variants([f"experiment={args.experiment}", *args.set], args.baseline, args.variant)
    except ValueError as err:
        parser.error(str(err))
    args.out.mkdir(parents=True, exist_ok=True)
    for name, overrides in variants.items():
        prepare(overrides, args.out, name)
    results = []
    for name, seed in run_order(args.seeds, list(variants), args.baseline_seeds):  # in turn: record, baseline, ...
        results.append(run_one(name, variants[name], seed, args.out, args.stride_fraction))
        r = results[-1]
        print(f"{name} seed {seed}: val bpb {r.bpb:.4f}, {r.wall:.0f} s (train {r.train_wall:.0f} s, "
              f"eval {r.eval_wall:.0f} s), run folder {r.run_dir}", flush=True)
    lines = table(results, args.budget_minutes * 60)
    print("\n".join(lines))
    (args.out / "speedrun.json").write_text(json.dumps([{**vars(r), "run_dir": str(r.run_dir)} for r in results], indent=1))
    print(f"results: {args.out / 'speedrun.json'}")


if __name__ == "__main__":
    main()
