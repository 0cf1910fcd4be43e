"""``lm-lightning compare <run folders, multirun folders or globs>``: runs side by side, offline
(:mod:`lm_lightning.tracking.compare`): a table, compare.csv, overlaid curves and an HTML report.

    lm-lightning compare outputs/tiny/multiruns/2026-01-01_12-00-00 sort=final/val/loss
    lm-lightning compare 'outputs/tiny/runs/*' 'filter=optimizer.lr<0.01' filter=status==finished
"""

from __future__ import annotations

import glob
import os
import sys

from omegaconf import DictConfig

from lm_lightning.config.app import hydra_command
from lm_lightning.tracking.compare import compare

# Hydra's flags that take the next argument as their value (not a run folder)
VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir",
               "-cd", "--info", "--experimental-rerun", "--shell-completion", "-sc"}


def hydra_arguments(args: list[str]) -> list[str]:
    """The command line as Hydra overrides: bare paths and globs (a job folder's name holds ``=``: an existing
    path is a path) become ``runs=[...]``; each ``filter=<condition>`` is quoted (Hydra's grammar refuses an
    unquoted ``<`` or ``>``) and several are gathered into one list."""
    runs, filters, rest = [], [], []
    for i, arg in enumerate(args):
        if i and args[i - 1] in VALUE_FLAGS or arg.startswith("-"):
            rest.append(arg)
        elif arg.startswith("filter=") and not arg[len("filter="):].startswith(("[", "'", '"')):
            filters.append(arg[len("filter="):])
        elif "=" not in arg or os.path.exists(arg) or glob.glob(arg):
            runs.append(arg)
        else:
            rest.append(arg)
    if runs:
        rest.append(f"runs=[{','.join(map(_quoted, runs))}]")
    if filters:
        rest.append(f"filter=[{','.join(map(_quoted, filters))}]")
    return rest


def _quoted(text: str) -> str:
    return "'" + text.replace("'", "\\'") + "'"


@hydra_command("compare")
def app(cfg: DictConfig) -> None:
    compare(cfg)


def main() -> None:
    sys.argv = [sys.argv[0], *hydra_arguments(sys.argv[1:])]
    app()


if __name__ == "__main__":
    main()
