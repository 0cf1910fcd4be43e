"""The job runner (``lm_lightning/training/job.py``) that train, distill, finetune, align and quantize share:
a job that fails at step 1 closes its W&B run as failed, and the next job of the same multirun starts a
run of its own; last.ckpt holds the final step whatever the last-checkpoint callback's period.

The commands run in this process (``helpers.run_in_process``; ``-m`` runs the jobs one after another, as
a sweep does); the failure is a callback the runner's Trainer gets in the first job only. W&B runs offline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import lightning as L
import pytest
import wandb
from helpers import run_in_process
from lightning.pytorch.callbacks import Callback

from lm_lightning.training.job import Job
from lm_lightning.training.last_checkpoint import checkpoint_step

FAILING_STEP = 1
TINY = ["experiment=tiny", "model.block_size=64", "scheduler.warmup_steps=1", "trainer.max_steps=3",
        "trainer.val_check_interval=3", "trainer.limit_val_batches=1", "sample.max_new_tokens=0", "num_threads=1"]


class FailAtStep(Callback):
    def __init__(self, raised: list[int]) -> None:
        self.raised = raised

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == FAILING_STEP:
            self.raised.append(trainer.global_step)
            raise RuntimeError(f"injected failure at step {FAILING_STEP}")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, corpus_cache) -> Path:
    """A 3-step tiny GPT with a 64-character context (align needs room for a prompt and its response)."""
    root = tmp_path_factory.mktemp("pretrained")
    run_in_process("train", *TINY, "logger=csv", f"hydra.run.dir={root / 'run'}", cwd=root, cache=corpus_cache)
    return root / "run" / "checkpoints" / "last.ckpt"


class Sweep(NamedTuple):
    jobs: list[Path]  # the job folders, in order
    raised: list[int]  # the steps the injected failure was raised at
    finished: list[tuple[str, int | None]]  # (W&B run id, exit code) of each run finished


@pytest.fixture
def failing_first_job(monkeypatch) -> Sweep:
    """The first Trainer the runner builds fails at step 1; W&B runs are recorded as they finish."""
    result = Sweep([], [], [])
    build_trainer, finish = Job.build_trainer, wandb.Run.finish

    def build_failing_first(job: Job, **arguments) -> L.Trainer:
        if not result.jobs:
            arguments["callbacks"] = [*(arguments.get("callbacks") or []), FailAtStep(result.raised)]
        result.jobs.append(job.output_dir)
        return build_trainer(job, **arguments)

    def record_finish(run: wandb.Run, exit_code: int | None = None) -> None:
        result.finished.append((run.id, exit_code))
        finish(run, exit_code=exit_code)

    monkeypatch.setattr(Job, "build_trainer", build_failing_first)
    monkeypatch.setattr(wandb.Run, "finish", record_finish)
    return result


def sweep(command: str, root: Path, cache: Path, *args: str) -> None:
    """``lm-lightning <command> -m <args> seed=1,2``: two jobs as one multirun, which ends with the sweep
    summary (every training command's config has it) and exit status 1 because the first job failed."""
    proc = run_in_process(command, "-m", *args, "seed=1,2", f"hydra.sweep.dir={root / 'sweep'}", cwd=root,
                          cache=cache, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    outcomes = json.loads((root / "sweep" / "summary.json").read_text())
    assert [job["outcome"] for job in outcomes] == ["failed", "ok"]
    assert f"injected failure at step {FAILING_STEP}" in outcomes[0]["detail"]


def assert_the_failed_job_closed_its_run_and_the_next_had_its_own(result: Sweep) -> None:
    assert result.raised == [FAILING_STEP] and len(result.jobs) == 2
    failed, next_job = result.jobs
    assert (next_job / "run.json").is_file() and not (failed / "run.json").exists()
    ids = []
    for job in result.jobs:
        runs = list((job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, f"{job.name}: {runs}"  # a run left open would take the next job's logs
        ids.append(runs[0].name.rsplit("-", 1)[1])
        assert ids[-1] == (job / "wandb_run_id").read_text().strip()
    assert ids[0] != ids[1]
    assert result.finished == [(ids[0], 1), (ids[1], None)]  # the failed job's run ended with exit code 1
    assert wandb.run is None


def test_train_failing_at_step_1_closes_its_wandb_run(tmp_path, corpus_cache, failing_first_job):
    sweep("train", tmp_path, corpus_cache, *TINY)
    assert_the_failed_job_closed_its_run_and_the_next_had_its_own(failing_first_job)


def test_distill_failing_at_step_1_closes_its_wandb_run(tmp_path, corpus_cache, pretrained, failing_first_job):
    sweep("distill", tmp_path, corpus_cache, *TINY, f"teacher_ckpt={pretrained}", "model.n_layer=1", "model.n_embd=16")
    assert_the_failed_job_closed_its_run_and_the_next_had_its_own(failing_first_job)
    record = json.loads((failing_first_job.jobs[1] / "run.json").read_text())
    assert record["teacher"]["checkpoint"] == str(pretrained)


def test_finetune_failing_at_step_1_closes_its_wandb_run(tmp_path, corpus_cache, pretrained, failing_first_job):
    sweep("finetune", tmp_path, corpus_cache, f"ckpt_path={pretrained}", "task.max_train_examples=32", "batch_size=8",
          "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=2", "warmup_steps=1",
          "num_threads=1")
    assert_the_failed_job_closed_its_run_and_the_next_had_its_own(failing_first_job)


def test_align_failing_at_step_1_closes_its_wandb_run(tmp_path, corpus_cache, pretrained, failing_first_job):
    sweep("align", tmp_path, corpus_cache, "experiment=dpo", f"ckpt_path={pretrained}", "trainer.max_steps=3",
          "trainer.val_check_interval=3", "scheduler.warmup_steps=1", "data.max_train_pairs=16",
          "data.val_fraction=0.02", "data.max_prompt_tokens=24", "num_threads=1")
    assert_the_failed_job_closed_its_run_and_the_next_had_its_own(failing_first_job)


def test_quantize_qat_failing_at_step_1_closes_its_wandb_run(tmp_path, corpus_cache, pretrained, failing_first_job):
    sweep("quantize", tmp_path, corpus_cache, f"ckpt_path={pretrained}", "method=qat", "data=tinyshakespeare",
          "tokenizer=char", "max_val_batches=1", "speed.repeats=1", "speed.new_tokens=0", "trainer.max_steps=3",
          "scheduler.warmup_steps=1")
    assert_the_failed_job_closed_its_run_and_the_next_had_its_own(failing_first_job)


@pytest.mark.parametrize(("every_n_steps", "steps_written"), [(2, [2, 3]), (3, [3])])
def test_last_ckpt_holds_the_final_step_and_is_not_written_twice(tmp_path, corpus_cache, every_n_steps, steps_written):
    """The last-checkpoint callback writes every n steps: a 3-step run with n=2 needs one more write at the
    end; with n=3 the callback's own write at step 3 is the final state."""
    run_in_process("train", *TINY, "logger=csv", f"callbacks.last_checkpoint.every_n_train_steps={every_n_steps}",
                   f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, cache=corpus_cache)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    previous = last.with_name("last.ckpt.prev")  # the file each write replaced (training/checkpoint_io.py)
    assert [checkpoint_step(path) for path in (previous, last) if path.exists()] == steps_written
