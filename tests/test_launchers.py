"""The sweep summary under every launcher: a multirun prints a table of its jobs, writes ``<sweep>/summary.json``
and exits with status 1 when a job failed, whether the jobs run in this process (Hydra's basic launcher), in
joblib worker processes (``hydra/launcher=parallel``) or as submitit jobs (``hydra/launcher=local``: the SLURM
launcher's code, on this machine). The summary is made in the process that started the sweep, from the
``job_outcome.json`` each job leaves in its folder (``lm_lightning/tracking/sweep.py``).

The sweep: two tiny GPTs for 2 steps, the second with an unknown ``model.norm`` so that it fails. The commands
run in this process; under parallel and local the jobs run in processes of their own (slow)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest
from helpers import run_in_process

TINY = ["experiment=tiny", "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
        "scheduler.warmup_steps=1", "sample.max_new_tokens=0", "logger=csv"]
FAILING_SWEEP = [*TINY, "model.norm=layernorm,bogus"]


def sweep(launcher: str, root: Path, cache: Path, *args: str):
    """``lm-lightning train -m hydra/launcher=<launcher> <args>``: (the process's result, summary.json's jobs)."""
    proc = run_in_process("train", "-m", f"hydra/launcher={launcher}", *args, f"hydra.sweep.dir={root / 'sweep'}",
                          cwd=root, cache=cache, check=False)
    if launcher == "parallel":  # joblib keeps its worker processes for the next sweep: not past this test
        from joblib.externals.loky import get_reusable_executor

        get_reusable_executor().shutdown(wait=True)
    summary = root / "sweep" / "summary.json"
    return proc, json.loads(summary.read_text()) if summary.is_file() else None


@pytest.fixture(scope="module")
def basic(tmp_path_factory, corpus_cache):
    """The failing sweep under the basic launcher, whose results the other launchers must give too."""
    return sweep("basic", tmp_path_factory.mktemp("basic"), corpus_cache, *FAILING_SWEEP)


def assert_reports_the_failed_job(proc, jobs, launcher: str) -> None:
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "sweep summary: 1 of 2 jobs finished, 1 failed" in proc.stdout, f"{launcher}: {proc.stdout[-2000:]}"
    assert jobs is not None, f"{launcher}: no summary.json"
    assert [(job["job"], job["outcome"]) for job in jobs] == [(0, "ok"), (1, "failed")]
    assert "model.norm=bogus" in jobs[1]["overrides"] and "model.norm='bogus' is not known" in jobs[1]["detail"]
    finished = jobs[0]
    record = json.loads((Path(finished["dir"]) / "run.json").read_text())  # the row is the job's own record
    assert finished["result"]["val_loss"] == record["final"]["val/loss"] and finished["result"]["params"] == 27_968
    assert finished["detail"] == f"val/loss {record['final']['val/loss']:.4f}"
    table_row = next(line for line in proc.stdout.splitlines() if line.lstrip().startswith("gpt "))
    assert f"{record['final']['val/loss']:.4f}" in table_row.split() and "27,968" in table_row.split()


def test_basic_launcher_reports_a_failed_job_and_exits_1(basic):
    assert_reports_the_failed_job(*basic, "basic")


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["parallel", "local"])
def test_other_launchers_report_in_the_parent_and_give_the_basic_launchers_results(launcher, tmp_path, corpus_cache,
                                                                                   basic):
    proc, jobs = sweep(launcher, tmp_path, corpus_cache, *FAILING_SWEEP)
    assert_reports_the_failed_job(proc, jobs, launcher)
    assert jobs[0]["result"]["val_loss"] == pytest.approx(basic[1][0]["result"]["val_loss"], rel=1e-5)
    assert all(Path(job["dir"]).parent == tmp_path / "sweep" for job in jobs)
    if launcher == "parallel":  # n_jobs=-1: one job per core, each on cores // n_jobs = one thread
        assert [job["threads"] for job in jobs] == [1, 1]


def test_a_sweep_folder_used_again_reports_only_its_new_jobs(tmp_path, corpus_cache):
    sweep("basic", tmp_path, corpus_cache, *TINY, "model.n_layer=1")
    proc, jobs = sweep("basic", tmp_path, corpus_cache, *TINY, "model.n_layer=2")
    assert proc.returncode == 0 and "sweep summary: 1 of 1 jobs finished, 0 failed" in proc.stdout
    assert [job["overrides"].split()[-1] for job in jobs] == ["model.n_layer=2"]


def test_finetune_sweeps_report_and_exit_1_when_a_job_failed(tmp_path, corpus_cache, tiny_checkpoint):
    missing = tmp_path / "missing.ckpt"
    proc = run_in_process("finetune", "-m", f"ckpt_path={tiny_checkpoint},{missing}", "task.max_train_examples=16",
                          "batch_size=8", "trainer.max_steps=2", "trainer.val_check_interval=2",
                          "trainer.limit_val_batches=1", "warmup_steps=0", "logger=csv",
                          f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path, cache=corpus_cache, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "sweep summary: 1 of 2 jobs finished, 1 failed" in proc.stdout
    jobs = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    assert [job["outcome"] for job in jobs] == ["ok", "failed"]
    accuracy = json.loads((Path(jobs[0]["dir"]) / "run.json").read_text())["final"]["val/accuracy"]
    assert jobs[0]["detail"] == f"result {accuracy:.4f}"
    assert jobs[1]["detail"] == f"checkpoint not found: {missing} (pass ckpt_path=<an existing .ckpt file>)"


def test_two_sweeps_resolving_one_timestamped_folder_get_a_folder_each(tmp_path, corpus_cache):
    # sweeps started in the same second resolve ${now:%Y-%m-%d_%H-%M-%S} alike; a year stamp makes that certain
    stamped = f"hydra.sweep.dir={tmp_path}/sweeps/${{now:%Y}}"
    year = datetime.now().strftime("%Y")
    run_in_process("train", "-m", *TINY, "model.n_layer=1", stamped, cwd=tmp_path, cache=corpus_cache)
    second = run_in_process("train", "-m", *TINY, "model.n_layer=1", stamped, cwd=tmp_path, cache=corpus_cache)
    folders = sorted((tmp_path / "sweeps").iterdir())
    assert [folder.name for folder in folders] == [year, f"{year}_2"]
    assert f"this one writes to {folders[1]}" in second.stdout + second.stderr
    runs = []
    for folder in folders:  # each sweep's summary lists its own job, which ran in its own folder
        jobs = json.loads((folder / "summary.json").read_text())
        assert len(jobs) == 1 and Path(jobs[0]["dir"]).parent == folder
        runs.append(json.loads((Path(jobs[0]["dir"]) / "run.json").read_text()))
    assert runs[0]["output_dir"] != runs[1]["output_dir"] and runs[0]["group"] != runs[1]["group"]


def test_a_run_whose_timestamped_folder_another_run_holds_gets_a_folder_of_its_own(tmp_path, corpus_cache):
    # runs started in the same second resolve ${now:%Y-%m-%d_%H-%M-%S} alike; a year stamp makes that certain
    year = datetime.now().strftime("%Y")
    taken = tmp_path / "runs" / year
    taken.mkdir(parents=True)
    (taken / "theirs.txt").write_text("another run's file")
    second = run_in_process("train", *TINY, f"hydra.run.dir={tmp_path}/runs/${{now:%Y}}", cwd=tmp_path,
                            cache=corpus_cache)
    own = tmp_path / "runs" / f"{year}_2"
    assert f"this one writes to {own}" in second.stdout + second.stderr
    assert sorted(p.name for p in taken.iterdir()) == ["theirs.txt"]  # nothing written into the other run's folder
    record = json.loads((own / "run.json").read_text())
    assert record["output_dir"] == str(own) and record["status"] == "finished"
