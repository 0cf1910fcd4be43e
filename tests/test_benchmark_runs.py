"""The benchmarks' shared run helper (benchmarks/train_runs.py): a finished run is read, not trained again; a run
stopped part-way (its process killed, the machine taken back) resumes from its last.ckpt instead of starting over."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import train_runs  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)


@pytest.fixture
def launched(monkeypatch):
    """The command lines train_runs would run; each "run" writes the run.json a finished run has."""
    commands = []

    def fake_run(command, **kwargs):
        commands.append(command)
        run_dir = next(a.split("=", 1)[1] for a in command if a.startswith("hydra.run.dir="))
        (Path(run_dir) / "run.json").write_text(json.dumps({"final": {"val/loss": 2.5}}))
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(train_runs.subprocess, "run", fake_run)
    return commands


def test_a_new_run_trains_a_stopped_one_resumes_and_a_finished_one_is_read(tmp_path, launched):
    fresh, stopped = tmp_path / "fresh", tmp_path / "stopped"
    fresh.mkdir()
    (stopped / "checkpoints").mkdir(parents=True)
    (stopped / "checkpoints" / "last.ckpt").write_bytes(b"a checkpoint")
    assert train_runs.final_val_loss(fresh, ["experiment=tiny"], cwd=tmp_path) == 2.5
    assert train_runs.final_val_loss(stopped, ["experiment=tiny"], cwd=tmp_path) == 2.5
    assert ["ckpt_path=last" in command for command in launched] == [False, True]
    assert train_runs.final_val_loss(stopped, ["experiment=tiny"], cwd=tmp_path) == 2.5  # read: nothing launched
    assert len(launched) == 2
