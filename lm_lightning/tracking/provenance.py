"""Where a run came from and how fast it went, for its run record: the code's git commit, the package versions,
the host and devices, the wall-clock times, and the throughput the ThroughputMonitor measured."""

from __future__ import annotations

import os
import platform
import shlex
import socket
import subprocess
from datetime import datetime
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning as L
import torch

import lm_lightning
from lm_lightning.tracking.callbacks import ThroughputMonitor

PACKAGES = ("torch", "lightning", "hydra-core", "wandb", "lm-lightning")  # distributions whose versions are recorded
OFFLINE_RUN_PREFIX = "offline-run-"  # how W&B names an offline run's folder (an online one is run-...)


def now() -> str:
    """The local time with its UTC offset, ISO 8601 to the second: ``2026-12-06T06:51:55+00:00``."""
    return datetime.now().astimezone().isoformat(timespec="seconds")


def provenance(trainer: L.Trainer) -> dict[str, Any]:
    """The code, software and machine a run ran with: ``git`` (None outside a checkout), ``versions``, ``host``
    and ``devices`` (the CPU model, and the names of the CUDA devices this process trained on)."""
    return {"git": git_state(Path(lm_lightning.__file__).parent), "versions": versions(), "host": socket.gethostname(),
            "devices": devices(trainer)}


def git_state(package_dir: Path) -> dict[str, Any] | None:
    """The commit of the code that ran, and whether tracked files differ from it (``dirty``; untracked files do
    not count, as in W&B's git record). The checkout is the one the running package's own files are tracked in
    (an editable install), not the working folder: a run started from another project's folder records this
    code's commit. None when the package is not tracked by git (installed from a wheel, even into a virtual
    environment inside some checkout) or git is not installed."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(package_dir), *args], capture_output=True, text=True, timeout=30,
                              check=False)

    try:
        if git("ls-files", "--error-unmatch", "__init__.py").returncode != 0:
            return None
        commit, top = git("rev-parse", "HEAD", "--show-toplevel").stdout.splitlines()
        changes = git("status", "--porcelain", "--untracked-files=no").stdout
    except (OSError, ValueError, subprocess.SubprocessError):  # no git, no commit yet, a hung filesystem
        return None
    return {"commit": commit, "dirty": bool(changes.strip()), "repository": top}


def versions() -> dict[str, str | None]:
    """Python's version and each of ``PACKAGES``'s (None when not installed), and the CUDA torch was built for."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    found["cuda"] = torch.version.cuda
    return found


def devices(trainer: L.Trainer) -> dict[str, Any]:
    """``accelerator`` (cpu, cuda, mps), the ``cpu`` model and core count, the ``gpus`` this process trained on."""
    device = trainer.strategy.root_device
    gpus = [torch.cuda.get_device_name(index) for index in trainer.device_ids] if device.type == "cuda" else []
    return {"accelerator": device.type, "cpu": cpu_model(), "cpu_count": os.cpu_count(), "gpus": gpus}


@cache
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, where ``platform.processor()`` is empty)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def throughput(trainer: L.Trainer, flops_per_token: float) -> dict[str, Any] | None:
    """The final training throughput of this process's fit, from the ThroughputMonitor callback: tokens/s over
    all devices and MFU, over its last ``window_size`` micro-batches (the value its last log row holds) or over
    the whole fit when the run was shorter (``over_batches`` says which); validation time excluded.
    None without the callback (``callbacks.throughput=null``), off the main process, or before a training batch."""
    monitor = next((cb for cb in trainer.callbacks if isinstance(cb, ThroughputMonitor)), None)
    meter = getattr(monitor, "_throughput", None)  # Lightning's Throughput, made at the start of fit on rank 0
    try:
        metrics = meter.compute()
    except (AttributeError, IndexError):  # no callback, not rank 0, or no training batch yet
        return None
    peak = monitor.available_flops
    if "device/items_per_sec" in metrics:  # the window filled: the rolling figures the loggers got last
        device_tokens_per_sec, over = metrics["device/items_per_sec"], monitor.window_size - 1
        mfu = metrics.get("device/mfu")
    else:  # since the start of fit, when the training clock read 0 and no token was seen
        device_tokens_per_sec, over = metrics["lengths"] / metrics["time"], metrics["batches"]
        mfu = device_tokens_per_sec * flops_per_token / peak if peak else None
    return {
        "tokens_per_sec": device_tokens_per_sec * trainer.world_size,
        "mfu": mfu,
        "peak_flops_per_device": peak,
        "over_batches": over,
        "training_seconds": metrics["time"],
    }


def wandb_sync_command(wandb_dir: str | None) -> str | None:
    """``wandb sync <folder>`` for an offline W&B run's folder (quoted for a POSIX shell); None for an online
    run or with W&B off."""
    if not wandb_dir or not Path(wandb_dir).name.startswith(OFFLINE_RUN_PREFIX):
        return None
    return f"wandb sync {shlex.quote(wandb_dir)}"
