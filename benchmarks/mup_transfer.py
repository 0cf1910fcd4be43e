"""Learning-rate transfer across widths on Gutenberg (issue 22, acceptance 2): a grid of peak learning rates (factors
of 2) x widths 64, 128, 256, 512 at fixed depth, context and tokens, under ``model.parametrization=standard`` and
``mup``; the final validation loss of every run, the best learning rate per width, and a plot of loss against
learning rate per width, one panel per parametrization.

Each run is ``lm-lightning train experiment=gutenberg_small model.n_embd=<w> model.parametrization=<p>
optimizer.lr=<lr> ...`` (2 blocks of 4 heads, context 32, 8 windows a step, untied head, as mup needs) in its own
process, one at a time, into ``<out>/<p>-w<w>-lr<lr>``; a run whose ``run.json`` exists is read, not rerun, so an
interrupted benchmark continues. Under mup the base width is 128 (conf/model/gpt.yaml), where both are the same.

    python benchmarks/mup_transfer.py --out /tmp/bench22/mup/transfer     # 48 runs, ~30 min, one thread each
    python benchmarks/mup_transfer.py --out /tmp/bench22/mup/transfer --plot docs/mup_transfer.png

Results: ``<out>/results.json``, ``<out>/table.md`` and the plot.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from train_runs import final_val_loss

WIDTHS = (64, 128, 256, 512)
LRS = (2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3)
PARAMETRIZATIONS = ("standard", "mup")
# short enough for a CPU: ~77k tokens, past the plateau at the unigram loss (~5.9 nats) that lasts ~150 steps
SHAPE = ["model.n_layer=2", "model.n_head=4", "model.block_size=32", "model.tie_embeddings=false", "data.batch_size=8"]


def train(out: Path, parametrization: str, width: int, lr: float, steps: int, threads: int) -> float:
    """The final validation loss (nats/token) of one run, training it unless its run.json exists."""
    run_dir = out / f"{parametrization}-w{width}-lr{lr:g}"
    overrides = ["experiment=gutenberg_small", *SHAPE, f"model.n_embd={width}",
                 f"model.parametrization={parametrization}", f"optimizer.lr={lr}", f"trainer.max_steps={steps}",
                 f"scheduler.warmup_steps={steps // 20}", f"trainer.val_check_interval={steps}",
                 f"callbacks.last_checkpoint.every_n_train_steps={steps}", "trainer.limit_val_batches=20",
                 "logger=csv", "sample.max_new_tokens=0", f"num_threads={threads}"]
    loss = final_val_loss(run_dir, overrides, cwd=out)
    print(f"{parametrization:8s} width {width:<4d} lr={lr:<7g} final val loss {loss:.4f}", flush=True)
    return loss


def table(grid: dict[str, dict[int, dict[float, float]]]) -> str:
    """Markdown: one row per parametrization and width, one column per learning rate, the best one named."""
    lines = ["| parametrization | width | " + " | ".join(f"lr {lr:g}" for lr in LRS) + " | best lr |",
             "|---|---|" + "---|" * (len(LRS) + 1)]
    for p, by_width in grid.items():
        for width, losses in by_width.items():
            best = min(losses, key=losses.get)
            cells = " | ".join(f"**{losses[lr]:.4f}**" if lr == best else f"{losses[lr]:.4f}" for lr in LRS if lr in losses)
            lines.append(f"| {p} | {width} | {cells} | {best:g} |")
    return "\n".join(lines)


def plot(grid: dict[str, dict[int, dict[float, float]]], path: Path) -> None:
    """Final validation loss against learning rate, one line per width, one panel per parametrization."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(grid), sharey=True, squeeze=False)[0]
    for ax, (p, by_width) in zip(axes, grid.items()):
        for width, losses in by_width.items():
            lrs = sorted(losses)
            line, = ax.plot(lrs, [losses[lr] for lr in lrs], marker="o", label=f"width {width}")
            best = min(losses, key=losses.get)
            ax.plot([best], [losses[best]], marker="*", markersize=14, color=line.get_color())
        ax.set(xscale="log", xlabel="peak learning rate", title=f"{p} (star: best lr)")
        ax.minorticks_off()
        ax.set_xticks(LRS, labels=[f"{lr:g}" for lr in LRS])
    axes[0].set_ylabel("final validation loss (nats/token)")
    axes[-1].legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder of the runs, results.json and table.md")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run (256 tokens each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (num_threads)")
    parser.add_argument("--plot", type=Path, default=None, help="the PNG (default: <out>/mup_transfer.png)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    grid: dict[str, dict[int, dict[float, float]]] = {p: {} for p in PARAMETRIZATIONS}
    for width in WIDTHS:  # the small widths first: an interrupted grid still compares whole rows
        for p in PARAMETRIZATIONS:
            grid[p][width] = {lr: train(args.out, p, width, lr, args.steps, args.threads) for lr in LRS}
            (args.out / "results.json").write_text(json.dumps({p: {w: {str(lr): v for lr, v in r.items()}
                                                                   for w, r in g.items()} for p, g in grid.items()}, indent=1))
    text = table(grid)
    (args.out / "table.md").write_text(text + "\n")
    plot(grid, args.plot or args.out / "mup_transfer.png")
    print(f"\n{text}\n\nbest lr per width: " + "; ".join(
        f"{p}: " + ", ".join(f"{w} -> {min(r, key=r.get):g}" for w, r in g.items()) for p, g in grid.items()), flush=True)


if __name__ == "__main__":
    main()
