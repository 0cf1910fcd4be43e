"""A run's provenance in its run.json (``lm_lightning/tracking/provenance.py``): the commit of the checkout the code
ran from and whether it was dirty, the package versions, host, devices, start and end times, and the final
throughput the ThroughputMonitor logged; and, with W&B offline, the exact ``wandb sync`` command in the banner.

One tiny run with the default logger (W&B, offline here, and CSV), in this process."""

from __future__ import annotations

import json
import os
import platform
import shlex
import socket
import subprocess
import sys
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from helpers import REPO, run_in_process

from lm_lightning.tracking.provenance import git_state
from lm_lightning.tracking.records import read_metrics_csv


class Run(NamedTuple):
    record: dict
    stdout: str
    before: datetime  # the test's clock around the run
    after: datetime


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus_cache) -> Run:
    root = tmp_path_factory.mktemp("provenance")
    before = datetime.now().astimezone().replace(microsecond=0)
    # a throughput window of 5 batches fills in the 12 steps: the record's figures are those of the last log row
    proc = run_in_process("train", "experiment=tiny", "trainer.max_steps=12", "sample.max_new_tokens=0",
                          "callbacks.throughput.window_size=5", "num_threads=1", cwd=root, cache=corpus_cache)
    after = datetime.now().astimezone()
    [record] = root.glob("outputs/tiny/runs/*/run.json")
    return Run(json.loads(record.read_text()), proc.stdout, before, after)


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout


def test_run_json_names_the_commit_of_the_checkout_the_code_ran_from(run):
    # the run's working folder is a temp folder outside any checkout: the commit is the package's
    assert run.record["provenance"]["git"] == {
        "commit": git("rev-parse", "HEAD").strip(),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no").strip()),
        "repository": str(REPO),
    }


def test_run_json_holds_the_versions_host_and_devices(run):
    provenance = run.record["provenance"]
    assert provenance["versions"] == {
        "python": platform.python_version(), "torch": metadata.version("torch"),
        "lightning": metadata.version("lightning"), "hydra-core": metadata.version("hydra-core"),
        "wandb": metadata.version("wandb"), "lm-lightning": metadata.version("lm-lightning"),
        "cuda": torch.version.cuda}
    assert provenance["versions"]["torch"] == torch.__version__
    assert provenance["host"] == socket.gethostname()
    gpu = torch.cuda.is_available()  # accelerator=auto trains on the GPU where there is one
    assert provenance["devices"] == {"accelerator": "cuda" if gpu else "cpu", "cpu": cpu_model_name(),
                                     "cpu_count": os.cpu_count(), "gpus": [torch.cuda.get_device_name(0)] if gpu else []}


def cpu_model_name() -> str:
    """The CPU's model as Linux names it (``platform.processor()`` elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return platform.processor() or platform.machine()
    return next(line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name"))


def test_run_json_holds_start_and_end_times_in_iso_8601(run):
    started, ended = (datetime.fromisoformat(run.record[key]) for key in ("started", "ended"))
    assert started.utcoffset() is not None and ended.utcoffset() is not None  # with the UTC offset
    assert run.before <= started <= ended <= run.after
    assert (ended - started).total_seconds() >= run.record["seconds"] - 1  # fit lies inside (whole seconds)


def test_run_json_holds_the_throughput_the_callback_logged_last(run):
    figures = run.record["throughput"]
    logged = read_metrics_csv(Path(run.record["csv_dir"]) / "metrics.csv")
    step, tokens_per_sec = logged["train/device/items_per_sec"][-1]
    assert step == 11  # the last step (counted from 0)
    assert figures["tokens_per_sec"] == pytest.approx(tokens_per_sec, rel=1e-9)  # one device: all of it
    assert figures["mfu"] == pytest.approx(logged["train/device/mfu"][-1][1], rel=1e-9)
    peak = figures["peak_flops_per_device"]  # this CPU's, measured when fit started
    assert figures["over_batches"] == 4 and 1e9 < peak < 1e14
    # MFU is the model's FLOPs at that rate over the peak
    assert figures["mfu"] == pytest.approx(tokens_per_sec * run.record["flops_per_token"] / peak, rel=1e-6)
    assert 0 < figures["training_seconds"] <= run.record["seconds"]


def test_offline_wandb_banner_prints_the_exact_sync_command(run):
    wandb_dir = Path(run.record["wandb_dir"])
    assert wandb_dir.name.startswith("offline-run-") and wandb_dir.parent == Path(run.record["output_dir"]) / "wandb"
    [line] = [line for line in run.stdout.splitlines() if "wandb sync" in line]
    assert line == f"W&B is offline: upload this run with `wandb sync {wandb_dir}`"
    # W&B's own command line takes it: with --dry-run it lists what it would upload (0.5 s, no network)
    program, command, *paths = shlex.split(line.split("`")[1])
    listed = subprocess.run([sys.executable, "-m", program, command, "--dry-run", *paths], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, check=True).stdout  # W&B writes to stderr
    assert "Would sync 1 run(s)" in listed
    assert f"{wandb_dir.name}/{next(wandb_dir.glob('run-*.wandb')).name}" in listed


def test_no_commit_outside_a_checkout_nor_for_a_package_git_does_not_track(tmp_path):
    package = tmp_path / "site-packages" / "lm_lightning"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    assert git_state(package) is None  # not in a repository at all
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text("site-packages/\n")  # a virtual environment inside some project
    assert git_state(package) is None
