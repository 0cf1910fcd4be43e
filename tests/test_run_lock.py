"""One writer per run folder: a second job into a folder in use stops with one line naming the first's process,
and the first finishes with its own checkpoints and W&B id."""

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from helpers import run_cli, start_cli

from lm_lightning.errors import UserError
from lm_lightning.training import run_lock


def test_lock_is_exclusive_and_released(tmp_path, monkeypatch):
    for name in run_lock.RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert run_lock.acquire(tmp_path)
    assert not run_lock.acquire(tmp_path)  # this process holds it already: no second lock, no error
    holder = json.loads((tmp_path / ".lock").read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    # a second open file description conflicts as another process's would
    fd = run_lock._held.pop(tmp_path.resolve())
    try:
        with pytest.raises(UserError, match=rf"in use by process {os.getpid()} on {socket.gethostname()}, started"):
            run_lock.acquire(tmp_path)
    finally:
        run_lock._held[tmp_path.resolve()] = fd
    run_lock.release(tmp_path)
    monkeypatch.setenv("LOCAL_RANK", "1")  # a DDP rank other than 0 shares its job's folder without a lock
    assert not run_lock.acquire(tmp_path)
    monkeypatch.delenv("LOCAL_RANK")
    assert run_lock.acquire(tmp_path)  # released: the next job takes it
    run_lock.release(tmp_path)
    # taken ahead of its job (before Hydra writes the folder's config): the job then owns it and releases it
    assert not run_lock.acquire(tmp_path, for_job=True)
    assert run_lock.acquire(tmp_path) and not run_lock.acquire(tmp_path)
    run_lock.release(tmp_path)
    assert tmp_path.resolve() not in run_lock._held


@pytest.mark.bad_input
@pytest.mark.slow
def test_second_train_into_a_folder_in_use_exits_2(tmp_path, corpus_cache):
    run = tmp_path / "run"
    args = ["train", "experiment=tiny", "sample.max_new_tokens=0", "num_threads=1", f"hydra.run.dir={run}"]
    first = start_cli(*args, "trainer.max_steps=30", "callbacks.last_checkpoint.every_n_train_steps=10",
                      cwd=tmp_path, cache=corpus_cache)
    try:
        deadline = time.monotonic() + 300
        while not ((run / ".lock").is_file() and (run / "wandb_run_id").is_file()) and first.poll() is None:
            assert time.monotonic() < deadline, "the first run never took its folder"
            time.sleep(0.2)
        wandb_id = (run / "wandb_run_id").read_text()
        holder = json.loads((run / ".lock").read_text())
        hydra_files = {p.name: p.read_bytes() for p in (run / ".hydra").iterdir()}

        # the first is paused while the second runs, so the two surely overlap; a stopped process keeps its lock
        first.send_signal(signal.SIGSTOP)
        try:
            second = run_cli(*args, "trainer.max_steps=30", "optimizer.lr=0.002", cwd=tmp_path, cache=corpus_cache,
                             check=False)
        finally:
            first.send_signal(signal.SIGCONT)
        assert second.returncode == 2
        assert "Traceback" not in second.stderr
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        expected = (f"error: run folder {run.resolve()} is in use by process {holder['pid']} on {holder['host']}, "
                    f"started {holder['started']}: wait for it to finish, or give this run another folder "
                    f"(hydra.run.dir=...)")
        assert errors == [expected], second.stderr
        assert holder["pid"] == first.pid
        # refused before Hydra wrote its config: the first run's composed config and overrides are as they were
        assert {p.name: p.read_bytes() for p in (run / ".hydra").iterdir()} == hydra_files
        _, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err[-3000:]

    record = json.loads((run / "run.json").read_text())
    assert record["steps"] == 30 and record["status"] == "finished"
    checkpoints = sorted(path.name for path in (run / "checkpoints").glob("*.ckpt"))
    assert checkpoints == ["best.ckpt", "last.ckpt"]  # no last-v1.ckpt: the second wrote nothing
    # run.json names the files this run wrote
    assert {k: Path(v).resolve() for k, v in record["checkpoints"].items()} == {
        name: (run / "checkpoints" / f"{name}.ckpt").resolve() for name in ("best", "last")}
    assert (run / "wandb_run_id").read_text() == wandb_id
    wandb_runs = list((run / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1 and wandb_runs[0].name.endswith(wandb_id)
    assert record["wandb_dir"] == str(wandb_runs[0])
