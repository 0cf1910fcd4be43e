"""``lm-lightning train``: compose a config, prepare the corpus, fit, evaluate, sample, summarise.

    lm-lightning train experiment=shakespeare_char
    lm-lightning train -m model.n_layer=1,2 trainer.max_steps=30
"""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig

from lm_lightning.config.app import hydra_command
from lm_lightning.errors import UserError
from lm_lightning.tracking.sweep import sweep_row


def train(cfg: DictConfig, **options: Any) -> dict[str, Any]:
    """One training job, the run record back (lm_lightning/training/run.py, imported here: Lightning and the model
    zoo load only once the config has composed, so a mistaken option is reported in a fraction of a second)."""
    from lm_lightning.training.run import train as run_training

    return run_training(cfg, **options)


@hydra_command("train")
def main(cfg: DictConfig) -> float | dict[str, Any]:
    """The sweep table's row; with ``optimized_metric`` set (``hparams_search=``), that final metric as a float,
    the objective a sweeper such as Optuna minimises (the table's row then comes from the job's run.json)."""
    record = train(cfg)
    if not (metric := cfg.get("optimized_metric")):
        return sweep_row(record)
    final = record["final"]
    if not final:  # stopped by a signal before the final validation: a failed trial for the sweeper
        return math.nan
    if metric not in final:
        raise UserError(f"optimized_metric={metric} is not a final metric of this run; choose one of {sorted(final)}")
    return float(final[metric])


if __name__ == "__main__":
    main()
