"""``lm-lightning scaling plan scaling.compute_budget=<FLOPs> [scaling.tokens_per_param=20 scaling.aspect_ratio=32]``:
the model shape and step count that spend a compute budget, as ``lm-lightning train`` would choose them."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from lm_lightning.errors import UserError
from lm_lightning.parallel.setup import world_size
from lm_lightning.config.app import hydra_command
from lm_lightning.scaling.budget import Plan, check_scaling_options, describe_plan, plan_budget


def scaling_plan(cfg: DictConfig) -> Plan:
    scaling = cfg.scaling
    check_scaling_options(scaling)
    if not scaling.compute_budget:
        raise UserError("scaling plan needs scaling.compute_budget=<training FLOPs>")
    tokens_per_step = (cfg.data.batch_size * cfg.model.block_size * cfg.trainer.accumulate_grad_batches
                       * world_size(cfg.trainer.devices, cfg.trainer.num_nodes))
    model_cfg = {**OmegaConf.to_container(cfg.model, resolve=True), "vocab_size": cfg.vocab_size}
    plan = plan_budget(model_cfg, float(scaling.compute_budget), tokens_per_step, scaling.aspect_ratio,
                       scaling.head_size, scaling.tokens_per_param)
    print(describe_plan(plan, float(scaling.compute_budget)), flush=True)
    return plan


@hydra_command("scaling_plan")
def main(cfg: DictConfig) -> None:
    scaling_plan(cfg)


if __name__ == "__main__":
    main()
