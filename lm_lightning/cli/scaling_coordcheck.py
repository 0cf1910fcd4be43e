"""``lm-lightning scaling coordcheck [widths=[...] parametrizations=[standard,mup]]``: μP's coordinate check,
activation scales of every layer against width after a few steps (:mod:`lm_lightning.scaling.coordcheck`)."""

from __future__ import annotations

from omegaconf import DictConfig

from lm_lightning.config.app import hydra_command
from lm_lightning.scaling.coordcheck import scaling_coordcheck


@hydra_command("scaling_coordcheck")
def main(cfg: DictConfig) -> None:
    scaling_coordcheck(cfg)


if __name__ == "__main__":
    main()
