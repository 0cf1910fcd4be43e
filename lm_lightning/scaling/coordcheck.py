"""μP's coordinate check (Yang et al. 2021, "Tensor Programs V", Fig. 5): train a few steps at several widths and
see how the typical size of every layer's output moves with the width.

Under a parametrization whose learning rates transfer, each layer's mean absolute activation stays flat as the
width grows; under the standard one, with one learning rate for all widths, the updates of wide matrices add up
and the activations (the output logits first) grow with the width. The check records, at every step, the mean
absolute value of the token embedding's output, each block's attention and feed-forward outputs (what they add to
the residual stream) and the final logits; ``scaling coordcheck`` writes them as a CSV, a table and a PNG.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lm_lightning.config.app import plain, set_threads
from lm_lightning.errors import UserError
from lm_lightning.models.gpt import GPT
from lm_lightning.tasks.param_groups import apply_lr_scales, parameter_groups

log = logging.getLogger("lm_lightning")


@dataclass(frozen=True)
class Coordinate:
    """One layer's mean absolute activation (over batch, positions and features) at one step of one run."""

    parametrization: str
    width: int  # n_embd
    step: int  # optimizer steps taken before this forward pass (0: at initialisation)
    layer: str  # embedding | block<i>.attn | block<i>.mlp | logits
    mean_abs: float


def activation_probes(model: GPT) -> dict[str, nn.Module]:
    """The modules whose outputs the check measures, by layer name, in forward order."""
    probes: dict[str, nn.Module] = {"embedding": model.wte}
    for i, block in enumerate(model.h):
        probes[f"block{i}.attn"] = block.attn
        probes[f"block{i}.mlp"] = block.mlp
    probes["logits"] = model  # the model's own output: the head with μP's output multiplier
    return probes


def train_and_probe(model: GPT, batches: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer,
                    steps: int) -> dict[int, dict[str, float]]:
    """Mean absolute activation of every probe at steps 0..``steps``: a forward pass of next-token prediction on
    ``batches[t]`` (windows (B, T + 1) of token ids) after t optimizer steps."""
    seen: dict[str, float] = {}
    hooks = [module.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out.detach().abs().mean().item()))
             for name, module in activation_probes(model).items()]
    record = {}
    try:
        for step in range(steps + 1):
            batch = batches[step % len(batches)]
            logits = model(batch[:, :-1])
            record[step] = dict(seen)
            if step == steps:
                break
            loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        for hook in hooks:
            hook.remove()
    return record


def coordinate_check(build: Callable[[int, str], GPT], widths: Iterable[int], parametrizations: Iterable[str],
                     batches: Sequence[torch.Tensor], optimizer_factory: Callable[..., torch.optim.Optimizer],
                     steps: int = 3, seeds: Sequence[int] = (0,)) -> list[Coordinate]:
    """Every (parametrization, width): ``build(width, parametrization)`` from each of ``seeds``, its optimizer from
    ``optimizer_factory(params=groups)`` with the parametrization's per-role learning rates, ``steps`` steps on
    the same ``batches``; each activation averaged over the seeds (one model's differ from the mean by
    O(1/sqrt(width)), which at small widths hides the trend the check looks for)."""
    weight_decay = getattr(optimizer_factory, "keywords", {}).get("weight_decay", 0.0)
    rows = []
    for parametrization in parametrizations:
        for width in widths:
            total: dict[tuple[int, str], float] = {}
            for seed in seeds:
                torch.manual_seed(seed)
                model = build(width, parametrization)
                optimizer = optimizer_factory(params=parameter_groups(model, weight_decay))
                apply_lr_scales(optimizer)
                for step, layers in train_and_probe(model, batches, optimizer, steps).items():
                    for layer, value in layers.items():
                        total[step, layer] = total.get((step, layer), 0.0) + value / len(seeds)
            rows += [Coordinate(parametrization, width, step, layer, value) for (step, layer), value in total.items()]
    return rows


def growth(rows: Sequence[Coordinate], parametrization: str, layer: str, step: int) -> float:
    """How many times larger ``layer``'s activation is at the largest width than at the smallest one."""
    by_width = {r.width: r.mean_abs for r in rows if (r.parametrization, r.layer, r.step) == (parametrization, layer, step)}
    return by_width[max(by_width)] / by_width[min(by_width)]


def table(rows: Sequence[Coordinate], step: int) -> str:
    """Mean absolute activations at ``step``: one line per parametrization and layer, one column per width,
    and the growth from the smallest width to the largest."""
    widths = sorted({r.width for r in rows})
    value = {(r.parametrization, r.layer, r.width): r.mean_abs for r in rows if r.step == step}
    lines = [f"mean |activation| after {step} steps"
             f"\n{'parametrization':<16}{'layer':<14}" + "".join(f"{'width ' + str(w):>12}" for w in widths)
             + f"{'growth':>9}"]
    for parametrization in dict.fromkeys(r.parametrization for r in rows):
        for layer in dict.fromkeys(r.layer for r in rows):
            cells = "".join(f"{value[parametrization, layer, w]:>12.4g}" for w in widths)
            lines.append(f"{parametrization:<16}{layer:<14}{cells}{growth(rows, parametrization, layer, step):>8.2f}x")
    return "\n".join(lines)


def plot(rows: Sequence[Coordinate], step: int, path: str | Path) -> Path:
    """Activation scale of every layer against width at ``step``, log-log, one panel per parametrization."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    parametrizations = list(dict.fromkeys(r.parametrization for r in rows))
    figure = Figure(figsize=(5 * len(parametrizations), 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(parametrizations), sharey=True, squeeze=False)[0]
    for ax, parametrization in zip(axes, parametrizations):
        for layer in dict.fromkeys(r.layer for r in rows):
            points = sorted((r.width, r.mean_abs) for r in rows
                            if (r.parametrization, r.layer, r.step) == (parametrization, layer, step))
            ax.plot(*zip(*points), marker="o", label=layer)
        ax.set(xscale="log", yscale="log", xlabel="width (n_embd)", title=f"{parametrization}, after {step} steps")
        ax.minorticks_off()  # log axes' minor labels (6x10^1, 2x10^2) would crowd the widths
        ax.set_xticks(sorted({r.width for r in rows}), labels=[str(w) for w in sorted({r.width for r in rows})])
    axes[0].set_ylabel("mean |activation|")
    axes[-1].legend(fontsize=7)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def scaling_coordcheck(cfg: DictConfig) -> list[Coordinate]:
    """``lm-lightning scaling coordcheck``: the check on batches of the configured corpus; writes
    coordcheck.csv and coordcheck.png to ``output_dir``, prints the table, logs the plot to W&B when asked."""
    set_threads(cfg.get("num_threads"))
    model_cfg = plain(cfg.model)
    if model_cfg.get("family") not in GPT.families:
        raise UserError(f"scaling coordcheck needs a transformer with model.parametrization: model=gpt or prefix_lm, "
                        f"not a model of family {model_cfg.get('family')!r}")
    if cfg.steps < 1 or not cfg.widths:
        raise UserError("scaling coordcheck needs steps >= 1 and at least one width in widths=[...]")
    datamodule = hydra.utils.instantiate(cfg.data, tokenizer=plain(cfg.tokenizer))
    vocab_size = datamodule.corpus.tokenizer().vocab_size
    loader = iter(datamodule.train_dataloader())
    batches = [next(loader) for _ in range(cfg.steps + 1)]  # a fresh batch for every forward pass

    def build(width: int, parametrization: str) -> GPT:
        return hydra.utils.instantiate(model_cfg, vocab_size=vocab_size, n_embd=width, parametrization=parametrization)

    rows = coordinate_check(build, list(cfg.widths), list(cfg.parametrizations), batches,
                            hydra.utils.instantiate(cfg.optimizer), cfg.steps, list(cfg.seeds))
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "coordcheck.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    png = plot(rows, cfg.steps, out_dir / "coordcheck.png")
    print(f"{table(rows, cfg.steps)}\n\ncsv:   {out_dir / 'coordcheck.csv'}\nplot:  {png}", flush=True)
    if cfg.tracker:
        _log_to_wandb(cfg, png, out_dir)
    return rows


def _log_to_wandb(cfg: DictConfig, png: Path, out_dir: Path) -> None:
    import wandb

    from lm_lightning.tracking.wandb import resolve_mode

    config: Any = OmegaConf.to_container(cfg, resolve=True)
    run = wandb.init(project=cfg.tracker.project, group=cfg.tracker.group, name="scaling-coordcheck",
                     job_type="scaling_coordcheck", dir=str(out_dir), mode=resolve_mode(cfg.tracker.mode), config=config)
    run.log({"scaling/coordcheck": wandb.Image(str(png))})
    run.finish()
    print(f"W&B run folder: {Path(run.dir).parent}", flush=True)
