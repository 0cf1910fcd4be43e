"""``lm-lightning scaling plan scaling.compute_budget=<FLOPs> [scaling.tokens_per_param=20 scaling.aspect_ratio=32]``:
the model shape and step count that spend a compute budget, as ``lm-lightning train`` would choose them.

With ``scaling.fit=<fits.json>`` (from ``scaling fit`` over a ladder) the depth is the one of least predicted
loss at the budget, every depth tried shown in a table; ``scaling.time_budget=<seconds>`` instead of a FLOP
budget measures each depth's training speed on this machine (lm_lightning/scaling/planner.py)."""

from __future__ import annotations

import functools

from omegaconf import DictConfig, OmegaConf

from lm_lightning.errors import UserError
from lm_lightning.parallel.setup import world_size
from lm_lightning.config.app import hydra_command, set_threads
from lm_lightning.scaling.budget import Plan, check_scaling_options, describe_plan, plan_budget


def scaling_plan(cfg: DictConfig) -> Plan:
    scaling = cfg.scaling
    check_scaling_options(scaling)
    if not scaling.compute_budget and not scaling.time_budget:
        raise UserError("scaling plan needs scaling.compute_budget=<training FLOPs> (or, with scaling.fit, "
                        "scaling.time_budget=<seconds>)")
    tokens_per_step = (cfg.data.batch_size * cfg.model.block_size * cfg.trainer.accumulate_grad_batches
                       * world_size(cfg.trainer.devices, cfg.trainer.num_nodes))
    model_cfg = {**OmegaConf.to_container(cfg.model, resolve=True), "vocab_size": cfg.vocab_size}
    if scaling.fit:
        return _plan_from_fit(cfg, model_cfg, tokens_per_step)
    plan = plan_budget(model_cfg, float(scaling.compute_budget), tokens_per_step, scaling.aspect_ratio,
                       scaling.head_size, scaling.tokens_per_param)
    print(describe_plan(plan, float(scaling.compute_budget)), flush=True)
    return plan


def _plan_from_fit(cfg: DictConfig, model_cfg: dict, tokens_per_step: int) -> Plan:
    import hydra

    from lm_lightning.scaling.planner import describe_candidates, load_law, measure_tokens_per_second, plan_from_fit

    scaling = cfg.scaling
    law = load_law(scaling.fit)
    budget = float(scaling.compute_budget) if scaling.compute_budget else None
    seconds = float(scaling.time_budget) if scaling.time_budget else None
    speed = None
    if seconds:
        set_threads(cfg.get("num_threads"))
        speed = functools.partial(measure_tokens_per_second, optimizer_factory=hydra.utils.instantiate(cfg.optimizer),
                                  batch_size=cfg.data.batch_size * cfg.trainer.accumulate_grad_batches,
                                  steps=int(scaling.measure_steps))
    plan, candidates = plan_from_fit(model_cfg, law, tokens_per_step, scaling.aspect_ratio, scaling.head_size,
                                     budget=budget, seconds=seconds, tokens_per_second=speed)
    at = (f"{budget:.4g} training FLOPs" if budget
          else f"{seconds:,.0f} s of training at each depth's measured tokens/s")
    print(f"L(N, D) = {law['E']:.4g} + {law['A']:.4g}/N^{law['alpha']:.4f} + {law['B']:.4g}/D^{law['beta']:.4f} "
          f"from {scaling.fit}, at {at}:", flush=True)
    print(describe_candidates(candidates, plan), flush=True)
    print(f"plan: {describe_plan(plan, budget, seconds)}", flush=True)
    print(f"train it: lm-lightning train model.n_layer={plan.n_layer} model.n_embd={plan.n_embd} "
          f"model.n_head={plan.n_head} trainer.max_steps={plan.steps} (with this command's other options)", flush=True)
    return plan


@hydra_command("scaling_plan")
def main(cfg: DictConfig) -> None:
    scaling_plan(cfg)


if __name__ == "__main__":
    main()
