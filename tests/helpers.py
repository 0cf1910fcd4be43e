"""Running the real command line from tests, outputs in a temp folder: ``run_in_process`` runs
``lm-lightning ...`` as a Hydra app in this process (the test suite's default: no interpreter start-up);
``run_cli`` and ``start_cli`` run it in a subprocess, for what needs its own process (signals, kills,
several ranks, the console script); ``run_command`` composes a config and calls a command's function."""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lm_lightning.tracking.records import read_metrics_csv

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LM_LIGHTNING_DATA", REPO.parent / "shared" / "data"))


def cli_env(cache: Path) -> dict[str, str]:
    """The environment of a test subprocess: W&B offline, this corpus cache, tests/ importable; and its own
    W&B service, as a user's process has (not the one a run in this process started: WANDB_SERVICE)."""
    return {
        **{name: value for name, value in os.environ.items() if name != "WANDB_SERVICE"},
        "LM_LIGHTNING_CACHE": str(cache),
        "LM_LIGHTNING_DATA": str(SHARED_DATA),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "HYDRA_FULL_ERROR": "0",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    }


# 10 steps of a 2-layer, 32-wide GPT on a global batch of 8 windows × 32 characters (256 tokens), one thread per
# process: the run the multi-process tests (tests/test_scaleout.py, tests/test_multinode.py) compare
TINY_SCALEOUT = ["experiment=tiny", "logger=csv", "trainer.accelerator=cpu", "trainer.log_every_n_steps=1",
                 "trainer.val_check_interval=100", "trainer.limit_val_batches=1", "callbacks.throughput=null",
                 "callbacks.last_checkpoint.every_n_train_steps=5", "scheduler.total_steps=10", "sample.max_new_tokens=0",
                 "data.corpus.source.max_bytes=20000", "global_batch_tokens=256", "num_threads=1"]


def run_cli(*args: str, cwd: Path, cache: Path, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs ``python -m lm_lightning <args>`` and waits for it; raises with its output when it fails."""
    proc = subprocess.run([sys.executable, "-m", "lm_lightning", *args], cwd=cwd, env=cli_env(cache),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"lm-lightning {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def run_in_process(*args: str, cwd: Path, cache: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Runs ``lm-lightning <args>`` in this process, as the console script does: the override check, the
    Hydra app (run folder, logging, ``-m`` sweeps), the ``error:`` line and exit status. Returns what a
    subprocess would: exit status, stdout and stderr (Python-level output; C++ libraries write to the fds)."""
    from lm_lightning import cli

    out, err = io.StringIO(), io.StringIO()
    returncode = 0
    with _command_line_state(cwd, cache), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        sys.argv = ["lm-lightning", *args]
        try:
            cli.main()
        except SystemExit as exited:
            returncode = exited.code if isinstance(exited.code, int) else (0 if exited.code is None else 1)
    proc = subprocess.CompletedProcess(["lm-lightning", *args], returncode, out.getvalue(), err.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"lm-lightning {' '.join(args)} failed ({proc.returncode}) in this process:\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def run_command(config_name: str, *overrides: str, run_dir: Path, cache: Path) -> Any:
    """Composes ``conf/<config_name>.yaml`` with ``overrides`` and calls the command's function
    (``lm_lightning.cli.<config_name>.<config_name>(cfg)``, e.g. ``train(cfg)``) with ``run_dir`` as
    Hydra's output folder; returns what it returns (train: the run record). No Hydra app runs: no
    override check, no Hydra log file, no ``.hydra`` folder."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from lm_lightning.config.app import CONF_DIR

    with _command_line_state(run_dir.parent, cache):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        HydraConfig.instance().set_config(cfg)
        job_cfg = copy.deepcopy(cfg)
        with open_dict(job_cfg):
            del job_cfg["hydra"]
        command = getattr(importlib.import_module(f"lm_lightning.cli.{config_name}"), config_name)
        return command(job_cfg)


@contextlib.contextmanager
def _command_line_state(cwd: Path, cache: Path) -> Iterator[None]:
    """A command's surroundings in this process: the environment of ``cli_env``, the working folder; and
    afterwards the process as it was: arguments, ``__main__``'s spec (the dispatcher points it at the
    command module), logging (Hydra configures the root logger), Hydra's global state, torch's thread
    count and deterministic mode, and the seed variables Lightning exports."""
    import torch
    from hydra.core.global_hydra import GlobalHydra

    variables = {"LM_LIGHTNING_CACHE": str(cache), "LM_LIGHTNING_DATA": str(SHARED_DATA), "WANDB_MODE": "offline",
                 "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0", "PL_GLOBAL_SEED": None, "PL_SEED_WORKERS": None}
    saved_env = {name: os.environ.get(name) for name in variables}
    argv, folder, main_spec = sys.argv, os.getcwd(), getattr(sys.modules["__main__"], "__spec__", None)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    os.environ.update({name: value for name, value in variables.items() if value is not None})
    cwd.mkdir(parents=True, exist_ok=True)
    os.chdir(cwd)
    try:
        yield
    finally:
        sys.argv = argv
        os.chdir(folder)
        sys.modules["__main__"].__spec__ = main_spec
        GlobalHydra.instance().clear()
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()  # the job's log file
        root.handlers[:] = handlers
        root.setLevel(level)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def start_cli(*args: str, cwd: Path, cache: Path) -> subprocess.Popen:
    """Starts ``python -m lm_lightning <args>`` without waiting (for signal and kill tests)."""
    return subprocess.Popen([sys.executable, "-m", "lm_lightning", *args], cwd=cwd, env=cli_env(cache),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_ctrl_c_as_in_a_terminal)


def _ctrl_c_as_in_a_terminal() -> None:
    """A shell started in the background (nohup, ``&``, some CI runners) ignores SIGINT, and its children inherit
    that; the command under test gets Ctrl-C as in a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def step_losses(run_dir: Path) -> dict[int, float]:
    """train/loss by step from every CSV log of a run folder (a resumed run adds a version_N)."""
    losses: dict[int, float] = {}
    for metrics in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        losses.update(dict(read_metrics_csv(metrics).get("train/loss", [])))
    return losses


def offline_wandb_summary(run_dir: Path, key: str):
    """The last value W&B recorded for summary ``key`` in an offline run's ``run-*.wandb`` file.

    wandb 0.31 writes offline runs only as protobuf records; a summary item is the key (field 1)
    followed by its JSON value (field 16, tag bytes 0x82 0x01, a varint length, the JSON text).
    """
    import json

    marker = b"\n" + bytes([len(key)]) + key.encode() + b"\x82\x01"
    deadline = time.time() + 30  # W&B's service writes the file's last records just after run.finish() returns
    while (at := (data := next(run_dir.glob("wandb/offline-run-*/run-*.wandb")).read_bytes()).rfind(marker)) < 0:
        if time.time() > deadline:
            raise KeyError(f"{key} not in the W&B summary of {run_dir}")
        time.sleep(0.2)
    i, length, shift = at + len(marker), 0, 0
    while True:  # varint
        byte = data[i]
        length |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if byte < 0x80:
            break
    return json.loads(data[i : i + length])


def command_of_experiment(name: str) -> str:
    """The command a ready experiment is for: its ``command`` key (``command: finetune``)."""
    from omegaconf import OmegaConf

    return OmegaConf.load(REPO / "lm_lightning" / "conf" / "experiment" / f"{name}.yaml").command


def wait_for_file(path: Path, proc, timeout: float = 120) -> None:
    """Waits until ``path`` exists while the process ``proc`` (a Popen with stderr piped) still runs."""
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the process ended before {path} appeared:\n{proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def cache_entries(cache: Path) -> list[str]:
    """The corpus cache's entries and unfinished builds (``.tmp-*``), by name: everything but its bookkeeping."""
    from lm_lightning.data.corpus import BOOKKEEPING

    return sorted(p.name for p in cache.iterdir() if p.name not in BOOKKEEPING) if cache.exists() else []
