"""Fault injection: killed runs, interrupted checkpoint writes, signals, NaN batches, corrupted
files, bad configs and failing sweep jobs (issue 8). Runs that are killed or signalled run in their
own process (slow); the rest in this one."""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from helpers import run_cli, run_in_process, start_cli, step_losses, wait_for_file

from lm_lightning.errors import UserError
from lm_lightning.tracking.records import read_metrics_csv
from lm_lightning.training import checkpoint_io
from lm_lightning.training.checkpoint_io import checksum_ok, load_checkpoint_file, verify_checkpoint, write_checkpoint_file
from lm_lightning.training.last_checkpoint import checkpoint_step

TINY = ["experiment=tiny", "trainer.log_every_n_steps=1", "sample.max_new_tokens=0", "trainer.val_check_interval=1000"]




def _wandb_ids(run_dir: Path) -> set[str]:
    return {p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*")}


@pytest.mark.slow
def test_sigkill_between_checkpoints_then_resume_matches_an_uninterrupted_run(tmp_path, corpus_cache):
    # one thread everywhere: the uninterrupted reference runs in this process, the killed run in its own
    cache, common = corpus_cache, [*TINY, "trainer.max_steps=150", "scheduler.total_steps=150",
                                   "callbacks.last_checkpoint.every_n_train_steps=30", "num_threads=1"]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run_in_process("train", *common, f"hydra.run.dir={reference}", cwd=tmp_path, cache=cache)

    proc = start_cli("train", *common, f"hydra.run.dir={killed}", cwd=tmp_path, cache=cache)
    wait_for_file(killed / "checkpoints" / "last.ckpt.sha256", proc)
    time.sleep(random.uniform(0.05, 0.5))  # somewhere after the first checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed_from = checkpoint_step(killed / "checkpoints" / "last.ckpt")
    ids_before = _wandb_ids(killed)

    run_cli("train", *common, f"hydra.run.dir={killed}", "ckpt_path=last", cwd=tmp_path, cache=cache)
    expected, got = step_losses(reference), step_losses(killed)
    steps = [s for s in expected if s >= resumed_from]
    assert len(steps) == 150 - resumed_from and resumed_from < 150
    assert max(abs(got[s] - expected[s]) for s in steps) <= 1e-5
    assert ids_before and _wandb_ids(killed) == ids_before, "the resumed run continues the same W&B run id"
    assert len(list((killed / "wandb").glob("offline-run-*"))) == 2  # two sessions of one run


@pytest.mark.parametrize("killed_at", range(1, 6))
def test_a_kill_at_any_point_of_a_checkpoint_write_leaves_a_loadable_checkpoint(tmp_path, monkeypatch, killed_at):
    """Kill the write before its n-th file operation (rename or sidecar write): what is on disk
    then must be either the old or the new checkpoint, complete and passing its check."""
    path = tmp_path / "last.ckpt"
    old, new = b"old checkpoint" * 1000, b"new checkpoint" * 1200
    write_checkpoint_file(old, path)

    class Killed(BaseException):
        """Stands for SIGKILL: nothing after this point runs."""

    calls = {"n": 0}
    real_replace = checkpoint_io.os.replace

    def replace_or_die(src, dst):
        calls["n"] += 1
        if calls["n"] == killed_at:
            raise Killed
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint_io.os, "replace", replace_or_die)
    try:
        write_checkpoint_file(new, path)
        finished = True
    except Killed:
        finished = False
    monkeypatch.setattr(checkpoint_io.os, "replace", real_replace)
    verify_checkpoint(path)
    assert path.read_bytes() in (old, new)
    assert finished == (calls["n"] < killed_at)


def test_resume_after_an_interrupted_checkpoint_write(tmp_path, corpus_cache):
    """The on-disk state a kill mid-write leaves (a partial .tmp beside the good last.ckpt) resumes."""
    cache, run = corpus_cache, tmp_path / "run"
    common = [*TINY, "scheduler.total_steps=40", "callbacks.last_checkpoint.every_n_train_steps=10"]
    run_in_process("train", *common, "trainer.max_steps=20", f"hydra.run.dir={run}", cwd=tmp_path, cache=cache)
    last = run / "checkpoints" / "last.ckpt"
    (run / "checkpoints" / "last.ckpt.tmp").write_bytes(last.read_bytes()[:1000])
    run_in_process("train", *common, "trainer.max_steps=40", f"hydra.run.dir={run}", "ckpt_path=last", cwd=tmp_path,
                   cache=cache)
    assert checkpoint_step(last) == 40


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_zero_within_30_seconds(tmp_path, corpus_cache):
    run = tmp_path / "run"
    proc = start_cli("train", *TINY, "trainer.max_steps=100000", "callbacks.last_checkpoint.every_n_train_steps=20",
                     f"hydra.run.dir={run}", cwd=tmp_path, cache=corpus_cache)
    wait_for_file(run / "checkpoints" / "last.ckpt.sha256", proc)
    time.sleep(0.3)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert time.time() - sent < 30
    assert proc.returncode == 0, err[-3000:]
    step = checkpoint_step(run / "checkpoints" / "last.ckpt")
    assert step % 20 != 0 or step > 20, "last.ckpt was written at the signal, not only at the periodic save"
    assert checksum_ok(run / "checkpoints" / "last.ckpt")
    assert f"stopped by signal at step {step}" in out
    assert json.loads((run / "run.json").read_text())["status"] == "stopped by signal"


@pytest.mark.bad_input
@pytest.mark.slow
def test_ctrl_c_saves_last_prints_the_resume_line_and_the_resume_continues(tmp_path, corpus_cache):
    run = tmp_path / "run"
    common = [*TINY, "scheduler.total_steps=100000", "callbacks.last_checkpoint.every_n_train_steps=20",
              f"hydra.run.dir={run}"]
    proc = start_cli("train", *common, "trainer.max_steps=100000", cwd=tmp_path, cache=corpus_cache)
    wait_for_file(run / "checkpoints" / "last.ckpt.sha256", proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in out + err, err[-3000:]
    step = checkpoint_step(run / "checkpoints" / "last.ckpt")
    assert checksum_ok(run / "checkpoints" / "last.ckpt")
    hint = f"stopped by signal at step {step}: resume with the same command plus hydra.run.dir={run} ckpt_path=last"
    assert hint in out, out[-3000:]
    assert json.loads((run / "run.json").read_text())["status"] == "stopped by signal"
    run_in_process("train", *common, f"trainer.max_steps={step + 3}", "ckpt_path=last", cwd=tmp_path,
                   cache=corpus_cache)  # the hint's command, with a nearer end
    assert checkpoint_step(run / "checkpoints" / "last.ckpt") == step + 3
    # the steps after the interrupt are the uninterrupted run's: the state saved at Ctrl-C is the state of step N
    whole = tmp_path / "whole"
    run_in_process("train", *TINY, "scheduler.total_steps=100000", "callbacks.last_checkpoint.every_n_train_steps=20",
                   f"trainer.max_steps={step + 3}", f"hydra.run.dir={whole}", cwd=tmp_path, cache=corpus_cache)
    resumed, reference = step_losses(run), step_losses(whole)
    for s in range(step, step + 3):
        assert abs(resumed[s] - reference[s]) <= 1e-5, (s, resumed[s], reference[s])


@pytest.mark.slow
def test_ctrl_c_mid_step_finishes_the_step_so_the_resume_is_exact(tmp_path, corpus_cache):
    """Ctrl-C right after the optimizer's update, before Lightning counts the step: the step is finished and saved
    whole, so the resume goes on with the uninterrupted run's losses; a second Ctrl-C stops at once."""
    run, whole = tmp_path / "run", tmp_path / "whole"
    common = [*TINY, "scheduler.total_steps=100000", "callbacks.last_checkpoint.every_n_train_steps=20"]
    fault = ["+callbacks.fault._target_=faults.CtrlCAfterUpdate", "+callbacks.fault.step=7"]
    proc = run_cli("train", *common, *fault, "trainer.max_steps=100000", f"hydra.run.dir={run}", cwd=tmp_path,
                   cache=corpus_cache, check=False)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Ctrl-C: stopping at the end of this step" in proc.stdout + proc.stderr
    assert checkpoint_step(run / "checkpoints" / "last.ckpt") == 8  # step 7's update, counted: 8 steps done
    run_in_process("train", *common, "trainer.max_steps=11", "ckpt_path=last", f"hydra.run.dir={run}", cwd=tmp_path,
                   cache=corpus_cache)
    run_in_process("train", *common, "trainer.max_steps=11", f"hydra.run.dir={whole}", cwd=tmp_path,
                   cache=corpus_cache)
    resumed, reference = step_losses(run), step_losses(whole)
    for s in range(8, 11):
        assert abs(resumed[s] - reference[s]) <= 1e-5, (s, resumed[s], reference[s])
    twice = tmp_path / "twice"
    proc = run_cli("train", *common, *fault, "+callbacks.fault.presses=2", "trainer.max_steps=100000",
                   f"hydra.run.dir={twice}", cwd=tmp_path, cache=corpus_cache, check=False)
    assert proc.returncode == 130 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert f"resume with the same command plus hydra.run.dir={twice} ckpt_path=last" in proc.stdout


@pytest.mark.parametrize("mode", ["skip", "stop"])
def test_a_nan_batch_is_skipped_and_counted_or_stops_with_the_state_saved(tmp_path, corpus_cache, mode):
    run = tmp_path / "run"
    proc = run_in_process("train", *TINY, "trainer.max_steps=12", f"callbacks.nonfinite.mode={mode}",
                          "+callbacks.fault._target_=faults.NaNGradientAt", "+callbacks.fault.step=5",
                          f"hydra.run.dir={run}", cwd=tmp_path, cache=corpus_cache, check=False)
    if mode == "skip":
        assert proc.returncode == 0, proc.stderr[-3000:]
        record = json.loads((run / "run.json").read_text())
        assert record["steps"] == 12
        weights = load_checkpoint_file(run / "checkpoints" / "last.ckpt")["state_dict"]
        assert all(torch.isfinite(w).all() for w in weights.values())
        counts = dict(read_metrics_csv(run / "csv/version_0/metrics.csv")["train/skipped_steps"])
        assert counts[4] == 0 and counts[5] == 1 and counts[11] == 1, "the step-5 update skipped, and counted once"
    else:
        assert proc.returncode == 2
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "non-finite loss or gradient at step 5" in errors[0]
        saved = load_checkpoint_file(run / "checkpoints" / "nonfinite-step5.ckpt")
        assert saved["global_step"] == 5
        assert all(torch.isfinite(w).all() for w in saved["state_dict"].values())


def test_a_checkpoint_with_a_flipped_byte_is_refused_naming_it_and_the_previous_good_one(tmp_path):
    path = tmp_path / "last.ckpt"
    write_checkpoint_file(b"first version" * 100, path)
    write_checkpoint_file(b"second version" * 100, path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"last\.ckpt fails its SHA-256 check.*last\.ckpt\.prev"):
        verify_checkpoint(path)


@pytest.mark.bad_input
def test_resuming_from_a_corrupted_checkpoint_is_one_error_line(tmp_path, corpus_cache):
    cache, run = corpus_cache, tmp_path / "run"
    run_in_process("train", *TINY, "trainer.max_steps=10", f"hydra.run.dir={run}", cwd=tmp_path, cache=cache)
    last = run / "checkpoints" / "last.ckpt"
    data = bytearray(last.read_bytes())
    data[100] ^= 0x01
    last.write_bytes(bytes(data))
    proc = run_in_process("train", *TINY, "trainer.max_steps=20", f"hydra.run.dir={run}", "ckpt_path=last",
                          cwd=tmp_path, cache=cache, check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(last) in errors[0] and "SHA-256" in errors[0]


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "override, message",
    [
        ("model.n_head=3", "model.n_head=3 does not divide model.n_embd=32"),
        ("model.n_layer=0", "model.n_layer=0 must be a positive integer"),
        ("data.block_size=64", "data.block_size=64 is above model.block_size=32"),
        ("data.corpus.token_dtype=uint16 tokenizer=bpe tokenizer.vocab_size=70000",
         "tokenizer.vocab_size=70000 does not fit data.corpus.token_dtype=uint16"),
    ],
)
def test_bad_options_are_refused_at_compose_time_naming_the_option(tmp_path, override, message):
    proc = run_in_process("train", *TINY, *override.split(), f"paths.log_dir={tmp_path / 'out'}", cwd=tmp_path,
                          cache=tmp_path / "cache", check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "out").exists(), "refused before any output folder was made"


def test_a_failing_sweep_job_does_not_stop_the_others_and_the_sweep_reports_it(tmp_path, corpus_cache):
    proc = run_in_process("train", "-m", *TINY, "trainer.max_steps=10", "model.norm=layernorm,bogus,rmsnorm",
                          f"paths.log_dir={tmp_path / 'out'}", cwd=tmp_path, cache=corpus_cache, check=False)
    assert proc.returncode == 1
    assert "sweep summary: 2 of 3 jobs finished, 1 failed" in proc.stdout
    summary = json.loads(next((tmp_path / "out").rglob("summary.json")).read_text())
    assert [job["outcome"] for job in summary] == ["ok", "failed", "ok"]
    assert "model.norm='bogus'" in summary[1]["detail"]
    assert len(list((tmp_path / "out").rglob("run.json"))) == 2


def test_same_seed_gives_identical_losses_in_deterministic_mode(tmp_path, corpus_cache):
    """Needed: the same `seed` and `trainer.deterministic=true` (deterministic kernels); the data
    order is a function of the seed alone."""
    runs = []
    for name in ("a", "b"):
        run_in_process("train", *TINY, "trainer.max_steps=50", "trainer.deterministic=true", "seed=7",
                       f"hydra.run.dir={tmp_path / name}", cwd=tmp_path, cache=corpus_cache)
        runs.append(step_losses(tmp_path / name))
    assert len(runs[0]) == 50 and runs[0] == runs[1]


@pytest.mark.bad_input
@pytest.mark.parametrize("damage", ["truncate", "edit"])
def test_a_damaged_token_file_is_refused_naming_the_file(tmp_path, corpus_cache, damage):
    import shutil

    cache, run = tmp_path / "cache", tmp_path / "run"
    shutil.copytree(corpus_cache, cache)  # damaged below: a copy of the session's prepared corpus
    run_in_process("train", *TINY, "trainer.max_steps=10", f"hydra.run.dir={run}", cwd=tmp_path, cache=cache)
    # the corpus this run read (the session cache may hold several corpora, in no fixed order)
    train_bin = Path(json.loads((run / "run.json").read_text())["corpus_dir"]) / "train.bin"
    assert train_bin.is_relative_to(cache) and train_bin.is_file()
    data = bytearray(train_bin.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[1000] ^= 0x01
    train_bin.write_bytes(bytes(data))
    proc = run_in_process("train", *TINY, "trainer.max_steps=10", f"hydra.run.dir={tmp_path / 'again'}", cwd=tmp_path,
                          cache=cache, check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"token file {train_bin}" in errors[0], proc.stderr[-2000:]


def test_a_uint16_store_refuses_a_vocabulary_it_cannot_hold():
    import numpy as np

    from lm_lightning.data.corpus import _token_dtype

    assert _token_dtype("auto", 65536) is np.uint16 and _token_dtype("auto", 65537) is np.uint32
    assert _token_dtype("uint32", 100) is np.uint32
    with pytest.raises(UserError, match="more than data.corpus.token_dtype=uint16 holds"):
        _token_dtype("uint16", 70_000)


def test_a_checkpoint_folder_replaces_the_one_at_its_path_which_is_kept_as_prev(tmp_path):
    from lm_lightning.training.checkpoint_io import replace_folder

    path = tmp_path / "last.ckpt"
    for n in range(3):
        new = tmp_path / "last.ckpt.tmp"
        new.mkdir()
        (new / "meta.pt").write_text(str(n))
        replace_folder(new, path)
        assert (path / "meta.pt").read_text() == str(n) and not new.exists()
        if n:
            assert (tmp_path / "last.ckpt.prev" / "meta.pt").read_text() == str(n - 1)
    path.rename(tmp_path / "moved")  # a file checkpoint (with its sidecar) replaced by a folder: the sidecar goes
    path.write_bytes(b"PK")
    (tmp_path / "last.ckpt.sha256").write_text("{}")
    new.mkdir()
    replace_folder(new, path)
    assert path.is_dir() and (tmp_path / "last.ckpt.prev").is_file() and not (tmp_path / "last.ckpt.sha256").exists()
