"""Acceptance 4 of issue 21: a multirun killed during job 2, re-run into its folder with ``resume_sweep=true``,
skips job 1, resumes job 2 from its last.ckpt in the same W&B run, runs job 3, and its summary lists all three."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from helpers import run_in_process, start_cli, step_losses, wait_for_file

from lm_lightning.tracking.records import read_metrics_csv
from lm_lightning.tracking.sweep_resume import earlier_result
from lm_lightning.training.last_checkpoint import checkpoint_step

# three jobs by length: job 2 (index 1) is long enough to be killed between its checkpoints
COMMON = ["experiment=tiny", "trainer.log_every_n_steps=1", "trainer.val_check_interval=1000", "sample.max_new_tokens=0",
          "callbacks.last_checkpoint.every_n_train_steps=10", "num_threads=1"]
LENGTHS = (10, 100, 10)




def _dirname(overrides: list[str]) -> str:
    """A job folder's name after its number: Hydra's override_dirname (experiment excluded, sorted)."""
    return ",".join(sorted(o for o in overrides if not o.startswith("experiment=")))


def _wandb_ids(job: Path) -> list[str]:
    return sorted(p.name.rsplit("-", 1)[1] for p in (job / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_a_killed_sweep_resumed_skips_finished_jobs_and_continues_the_interrupted_one(tmp_path, corpus_cache):
    cache, sweep = corpus_cache, tmp_path / "sweep"
    args = ["-m", *COMMON, f"trainer.max_steps={','.join(map(str, LENGTHS))}", f"hydra.sweep.dir={sweep}"]
    first, second, third = (sweep / f"{n}_{_dirname([*COMMON, f'trainer.max_steps={steps}'])}"
                            for n, steps in enumerate(LENGTHS))

    proc = start_cli("train", *args, cwd=tmp_path, cache=cache)
    wait_for_file(second / "checkpoints" / "last.ckpt.sha256", proc, timeout=180)
    time.sleep(0.1)  # between two checkpoints
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_from = checkpoint_step(second / "checkpoints" / "last.ckpt")
    assert 0 < resumed_from < LENGTHS[1] and not (second / "run.json").exists(), "killed during job 2"
    assert not third.exists()
    record_before, record_mtime = (first / "run.json").read_bytes(), (first / "run.json").stat().st_mtime_ns
    run_id = (second / "wandb_run_id").read_text()
    assert _wandb_ids(second) == [run_id]

    proc = run_in_process("train", *args, "resume_sweep=true", cwd=tmp_path, cache=cache)

    # job 1: not run again; its record untouched, one W&B session and one CSV log
    assert (first / "run.json").read_bytes() == record_before
    assert (first / "run.json").stat().st_mtime_ns == record_mtime
    assert len(_wandb_ids(first)) == 1 and len(list(first.glob("csv/version_*"))) == 1
    # job 2: continued from its last.ckpt in the same W&B run, with the losses of an uninterrupted run
    assert (second / "wandb_run_id").read_text() == run_id and _wandb_ids(second) == [run_id, run_id]
    reference = tmp_path / "reference"
    run_in_process("train", *COMMON, f"trainer.max_steps={LENGTHS[1]}", "logger=csv", f"hydra.run.dir={reference}",
                   cwd=tmp_path, cache=cache)
    expected, got = step_losses(reference), step_losses(second)
    steps = [s for s in expected if s >= resumed_from]
    assert len(steps) == LENGTHS[1] - resumed_from
    assert max(abs(got[s] - expected[s]) for s in steps) <= 1e-5
    resumed = dict(read_metrics_csv(second / "csv" / "version_1" / "metrics.csv")["train/loss"])
    assert min(resumed) == resumed_from, "the second session started at the checkpoint, not at step 0"
    records = [json.loads((job / "run.json").read_text()) for job in (first, second, third)]
    assert [(r["status"], r["steps"]) for r in records] == [("finished", n) for n in LENGTHS]
    # the summary lists all three, job 1 with the figures of its record
    assert "sweep summary: 3 of 3 jobs finished, 0 failed" in proc.stdout
    summary = json.loads((sweep / "summary.json").read_text())
    assert [(job["job"], job["outcome"]) for job in summary] == [(0, "ok"), (1, "ok"), (2, "ok")]
    assert [job["result"]["val_loss"] for job in summary] == [r["final"]["val/loss"] for r in records]


@pytest.mark.parametrize("files, finished", [
    ({}, False),                                                          # killed or crashed: it never returned
    ({"job_return.json": {"value": {"val_loss": 1.5}}, "run.json": {"status": "finished"}}, True),
    ({"job_return.json": {"value": {"val_loss": None}}, "run.json": {"status": "stopped by signal"}}, False),
    ({"job_return.json": {"value": 0.25}}, True),                        # a command that keeps no run record
    ({"run.json": {"status": "finished"}}, False),                       # killed between its record and its return
])
def test_a_job_counts_as_finished_when_it_returned_and_its_record_says_finished(tmp_path, files, finished):
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content))
    assert earlier_result(tmp_path) == (finished, files["job_return.json"]["value"] if finished else None)


def test_resume_sweep_on_a_single_run_says_how_a_single_run_resumes(tmp_path):
    proc = run_in_process("train", "experiment=tiny", "resume_sweep=true", f"paths.log_dir={tmp_path / 'out'}",
                          cwd=tmp_path, cache=tmp_path / "cache", check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "ckpt_path=last" in errors[0], proc.stderr[-2000:]
