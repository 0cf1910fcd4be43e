"""Running the real command line from tests: `lm-lightning ...` in a subprocess, outputs in a temp folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lm_lightning.tracking.records import read_metrics_csv

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LM_LIGHTNING_DATA", REPO.parent / "shared" / "data"))


def cli_env(cache: Path) -> dict[str, str]:
    """The environment of a test subprocess: W&B offline, this corpus cache, tests/ importable."""
    return {
        **os.environ,
        "LM_LIGHTNING_CACHE": str(cache),
        "LM_LIGHTNING_DATA": str(SHARED_DATA),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "HYDRA_FULL_ERROR": "0",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    }


def run_cli(*args: str, cwd: Path, cache: Path, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs ``python -m lm_lightning <args>`` and waits for it; raises with its output when it fails."""
    proc = subprocess.run([sys.executable, "-m", "lm_lightning", *args], cwd=cwd, env=cli_env(cache),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"lm-lightning {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def start_cli(*args: str, cwd: Path, cache: Path) -> subprocess.Popen:
    """Starts ``python -m lm_lightning <args>`` without waiting (for signal and kill tests)."""
    return subprocess.Popen([sys.executable, "-m", "lm_lightning", *args], cwd=cwd, env=cli_env(cache),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


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

    data = next(run_dir.glob("wandb/offline-run-*/run-*.wandb")).read_bytes()
    marker = b"\n" + bytes([len(key)]) + key.encode() + b"\x82\x01"
    at = data.rfind(marker)
    if at < 0:
        raise KeyError(f"{key} not in the W&B summary of {run_dir}")
    i, length, shift = at + len(marker), 0, 0
    while True:  # varint
        byte = data[i]
        length |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if byte < 0x80:
            break
    return json.loads(data[i : i + length])


def command_of_experiment(name: str) -> str:
    """The command a ready experiment is for: its usage comment names it
    (``lm-lightning finetune experiment=sst2_head ...``); train when it names none."""
    import re

    text = (REPO / "lm_lightning" / "conf" / "experiment" / f"{name}.yaml").read_text()
    found = re.search(rf"lm-lightning (\w+)[^\n]*experiment={name}\b", text)
    return found.group(1) if found else "train"
