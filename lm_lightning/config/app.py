"""What every command shares: the config folder, Hydra resolvers, the error contract, logger and callback groups."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lm_lightning.config.numbers import check_numbers
from lm_lightning.errors import IncompatiblePair, UserError
from lm_lightning.tracking.sweep import JobFailure, JobSkipped
from lm_lightning.tracking.sweep_resume import run_job

log = logging.getLogger("lm_lightning")

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")  # installed with the package (lm_lightning/conf)
REPO_DIR = str(Path(CONF_DIR).parents[1])  # the source checkout of an editable install: ${repo_dir:}/../shared/data


def _required_value_not_given() -> Any:
    raise UserError("a value the experiment marks ${required:} was not given: set it on the command line")


def _register_resolvers() -> None:
    """``${repo_dir:}``; ``${required:}``, an experiment's value the user must give; and
    ``${run_name:<experiment>}`` / ``${sweep_group:<experiment>}`` for tracker configs."""
    if not OmegaConf.has_resolver("repo_dir"):
        OmegaConf.register_new_resolver("repo_dir", lambda: REPO_DIR)
    if not OmegaConf.has_resolver("required"):
        OmegaConf.register_new_resolver("required", _required_value_not_given)
    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", lambda experiment: run_identity(experiment)[0])
        OmegaConf.register_new_resolver("sweep_group", lambda experiment: run_identity(experiment)[1])


_register_resolvers()


def hydra_command(config_name: str) -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """Turns ``fn(cfg)`` into a Hydra app over ``conf/<config_name>.yaml``.

    A :class:`UserError` ends the command with one line ``error: <message>`` and exit status 2,
    not a traceback; in a multirun the failing job is reported and the sweep goes on;
    re-run with ``resume_sweep=true`` a multirun skips its finished jobs and resumes the interrupted ones
    (lm_lightning/tracking/sweep_resume.py).
    """

    def decorate(fn: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        @functools.wraps(fn)
        def task(cfg: DictConfig) -> Any:
            multirun = HydraConfig.get().mode == RunMode.MULTIRUN
            try:
                from lm_lightning.config.overrides import missing_values_problem  # overrides imports this module

                if problem := missing_values_problem(cfg, config_name):
                    raise UserError(problem)
                # a sweep job keeps what it returns, so a re-run with resume_sweep=true can skip or resume it
                return run_job(fn, cfg, config_name, multirun)
            except Exception as err:
                if user_error := _user_error(err):
                    print(f"error: {user_error}", file=sys.stderr, flush=True)
                    if multirun:
                        # a grid over families x objectives skips the pairs that cannot train together
                        kind = JobSkipped if isinstance(user_error, IncompatiblePair) else JobFailure
                        return kind(str(user_error))
                    sys.exit(2)
                if not multirun:
                    raise
                # a crashed job is logged in full and reported; the sweep goes on with the next job
                log.exception("job failed")
                return JobFailure(f"{type(err).__name__}: {err}")

        app = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)(task)

        @functools.wraps(fn)
        def entry() -> Any:
            from lm_lightning.config.overrides import check_before_composing, composition_problem

            problem = check_before_composing(config_name, sys.argv[1:]) or _launcher_problem(sys.argv[1:])
            if problem is None:
                # Hydra raises instead of printing its many-line report, so a composition error becomes one line
                # here and the config is composed once, by Hydra (not first by a check and then again)
                os.environ["HYDRA_FULL_ERROR"] = "1"
                try:
                    return app()
                except Exception as err:
                    if not (problem := composition_problem(err, config_name)):
                        raise
            print(f"error: {problem}", file=sys.stderr, flush=True)
            sys.exit(2)

        return entry

    return decorate


# the launcher configs of conf/hydra/launcher, and the Hydra plugin module each needs
_LAUNCHER_PLUGINS = {"parallel": "hydra_plugins.hydra_joblib_launcher", "local": "hydra_plugins.hydra_submitit_launcher",
                     "slurm": "hydra_plugins.hydra_submitit_launcher"}


def _launcher_problem(args: list[str]) -> str | None:
    """One line for a sweep whose launcher cannot start here: its plugin is not installed (Hydra's own report
    is many lines), or hydra/launcher=slurm where no SLURM command exists (submitit fails inside the sweep)."""
    if not {"-m", "--multirun"} & set(args):
        return None  # without -m no launcher runs
    launcher = next((a.split("=", 1)[1] for a in args if a.startswith("hydra/launcher=")), None)
    if launcher not in _LAUNCHER_PLUGINS:
        return None
    import importlib.util
    import shutil

    if importlib.util.find_spec(_LAUNCHER_PLUGINS[launcher]) is None:
        return f'hydra/launcher={launcher} needs its Hydra plugin, which is not installed: pip install -e ".[launchers]"'
    if launcher == "slurm" and shutil.which("sbatch") is None:
        return ("hydra/launcher=slurm but SLURM's sbatch is not on PATH: submit from a SLURM login node, or sweep on "
                "this machine with hydra/launcher=local (or parallel)")
    return None


def _user_error(err: BaseException) -> UserError | None:
    """The UserError behind ``err``, also when Hydra's instantiate wrapped it."""
    while err is not None:
        if isinstance(err, UserError):
            return err
        err = err.__cause__ or err.__context__
    return None


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiates every entry with a ``_target_`` in a group such as ``logger`` or ``callbacks``; null entries are off."""
    if not group:
        return []
    return [hydra.utils.instantiate(node) for node in group.values() if isinstance(node, DictConfig) and "_target_" in node]


def run_identity(experiment: str) -> tuple[str, str | None]:
    """(run name, sweep group) for trackers: named from the job's overrides, grouped by the multirun sweep."""
    hc = HydraConfig.get()
    overrides = hc.job.override_dirname
    name = f"{experiment}-{overrides}" if overrides else experiment
    if hc.mode != RunMode.MULTIRUN:
        return name, None
    return name, f"{experiment}-{Path(hc.sweep.dir).name}"


def plain(cfg: Any) -> Any:
    """DictConfig → plain containers, resolved."""
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def check_threads(num_threads: int | None) -> None:
    """``num_threads``: null, or a whole number >= 0 (0 or null: torch's default)."""
    check_numbers({"num_threads": num_threads},
                  {"num_threads": (int, lambda v: v >= 0, "a whole number >= 0 (0 or null: torch's default)")})


def set_threads(num_threads: int | None) -> None:
    """The CPU settings of every command that runs torch: ``num_threads`` intra-op threads, and freed memory kept
    for reuse (parallel/allocator.py); and its terminal output without the dependencies' noise (``quiet_noise``)."""
    from lm_lightning.parallel.allocator import keep_freed_memory  # here: lm_lightning.parallel loads torch

    check_threads(num_threads)
    keep_freed_memory()
    quiet_noise()
    if num_threads:
        import torch  # here, not at the top: a command refused before it runs never loads torch

        torch.set_num_threads(num_threads)


def quiet_noise() -> None:
    """Lines a user can do nothing about, off the terminal: the ``lightning`` package adds a console handler of its
    own when imported, so under Hydra (whose handlers on the root logger show every record and write it to the run's
    log file) each Lightning line showed twice: Lightning's handler goes. Lightning's tips for its cloud services
    (litlogger, litmodels) and a deprecation warning Lightning's own code raises under this torch are dropped."""
    import warnings

    lightning = logging.getLogger("lightning")
    if logging.getLogger().handlers:
        for handler in [h for h in lightning.handlers if type(h) is logging.StreamHandler]:
            lightning.removeHandler(handler)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_no_cloud_tips)  # a filter is added once
    warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)


def _no_cloud_tips(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("💡 Tip:")
