"""Issue 19: a multi-node job started by torchrun's rendezvous trains as the same job on one node, and its
run folder, run record and tracker run are made once per job: two torchrun agents on this machine act as two
nodes of one CPU process each (gloo), against Lightning's own 2-process DDP run."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch.utilities import rank_zero_only

from lm_lightning.tracking.wandb import wandb_logger

from helpers import TINY_SCALEOUT, cli_env, step_losses

# the session's DDP run (conftest.py ddp_run), with the default loggers (W&B offline and CSV): one run per job
TINY = [arg for arg in TINY_SCALEOUT if arg != "logger=csv"] + ["strategy=ddp", "trainer.max_steps=10"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], cwd: Path, cache: Path, log: Path) -> subprocess.Popen:
    """``command`` in its own process, its output to ``log`` (a file: a full pipe would stall a rank)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=cwd, env=cli_env(cache), stdout=out, stderr=subprocess.STDOUT)
    proc.log = log
    return proc


def torchrun_node(port: int, run_dir: Path, cwd: Path, cache: Path, log: Path) -> subprocess.Popen:
    """One node's agent, as the README's Scale-out section starts it (one process per node here)."""
    torchrun = Path(sys.executable).with_name("torchrun")  # the virtual environment's
    return start([str(torchrun), "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
                  f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=test-multinode",
                  "-m", "lm_lightning.cli.train", *TINY, "trainer.num_nodes=2", "trainer.devices=1",
                  f"hydra.run.dir={run_dir}"], cwd, cache, log)


def finished(proc: subprocess.Popen, what: str) -> str:
    proc.wait(timeout=300)
    out = proc.log.read_text()
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{out[-6000:]}"
    return out


@pytest.mark.slow
def test_two_torchrun_nodes_train_as_one_ddp_job_with_one_run(tmp_path, corpus_cache, ddp_run):
    nodes_cwd = tmp_path / "nodes"
    nodes_cwd.mkdir()
    run = nodes_cwd / "run"
    port = free_port()
    agents = [torchrun_node(port, run, nodes_cwd, corpus_cache, tmp_path / f"node{i}.log") for i in range(2)]
    outputs = [finished(agent, f"torchrun node {i}") for i, agent in enumerate(agents)]
    assert any("GLOBAL_RANK: 1, MEMBER: 2/2" in out for out in outputs)  # one job of two ranks, one per agent
    losses, expected = step_losses(run), step_losses(ddp_run)
    assert sorted(losses) == list(range(10)) and sorted(expected) == list(range(10))
    for step in range(10):
        assert abs(losses[step] - expected[step]) <= 1e-5, (step, losses[step], expected[step])

    # once per job: the one folder given (nothing time-stamped under outputs/), one record, one W&B run
    assert sorted(p.name for p in nodes_cwd.iterdir()) == ["run"]
    assert list(nodes_cwd.rglob("run.json")) == [run / "run.json"]
    assert len(list(run.glob("csv/version_*"))) == 1
    (wandb_run,) = run.glob("wandb/offline-run-*")
    assert wandb_run.name.endswith("-" + (run / "wandb_run_id").read_text().strip())  # the id rank 0 wrote


def test_only_global_rank_zero_keeps_the_wandb_run_id(tmp_path, monkeypatch):
    """Every rank builds the loggers in the shared run folder; only rank 0 creates the W&B run, so only it
    writes the id a resumed job continues (a rank writing its own would race rank 0's)."""
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    wandb_logger(mode="disabled", save_dir=str(tmp_path))
    assert not (tmp_path / "wandb_run_id").exists()
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    wandb_logger(mode="disabled", save_dir=str(tmp_path))
    kept = (tmp_path / "wandb_run_id").read_text()
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    wandb_logger(mode="disabled", save_dir=str(tmp_path))
    assert (tmp_path / "wandb_run_id").read_text() == kept and len(kept) == 8


def test_a_torchrun_rank_without_one_run_folder_is_refused_in_one_line(monkeypatch):
    """Each rank torchrun starts would otherwise time-stamp its own run folder (and run record, and W&B run)."""
    from lm_lightning.config.overrides import check_overrides

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    monkeypatch.setenv("WORLD_SIZE", "2")
    problem = check_overrides("train", ["experiment=tiny"])
    assert problem is not None and problem.startswith("this process is one of the ranks torchrun started")
    assert "hydra.run.dir=" in problem
    assert check_overrides("train", ["experiment=tiny", "hydra.run.dir=/tmp/one_folder"]) is None
    monkeypatch.setenv("WORLD_SIZE", "1")  # a one-process torchrun job has no other rank to disagree with
    assert check_overrides("train", ["experiment=tiny"]) is None
