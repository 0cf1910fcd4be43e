"""``lm-lightning scaling fit runs=[<folders>]``: fitted scaling laws from the run records of any sweep
(:mod:`lm_lightning.scaling.analysis`): a table, fits.csv/fits.json, PNG plots and a W&B run."""

from __future__ import annotations

from omegaconf import DictConfig

from lm_lightning.config.app import hydra_command
from lm_lightning.scaling.analysis import scaling_fit


@hydra_command("scaling_fit")
def main(cfg: DictConfig) -> None:
    scaling_fit(cfg)


if __name__ == "__main__":
    main()
