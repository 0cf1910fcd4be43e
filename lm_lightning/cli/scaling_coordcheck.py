"""``lm-lightning scaling coordcheck [widths=[...] parametrizations=[standard,mup]]``: μP's coordinate check,
activation scales of every layer against width after a few steps (:mod:`lm_lightning.scaling.coordcheck`)."""

from __future__ import annotations

from omegaconf import DictConfig

from lm_lightning.config.app import hydra_command, set_threads
from lm_lightning.scaling.coordcheck import scaling_coordcheck


@hydra_command("scaling_coordcheck")
def main(cfg: DictConfig) -> None:
    set_threads(cfg.get("num_threads"))  # it trains models: the same CPU settings as train
    scaling_coordcheck(cfg)


if __name__ == "__main__":
    main()
