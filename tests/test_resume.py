"""Acceptance 4 of the foundation: resume from `ckpt_path=last` continues exactly, mid-epoch.
The runs are in this process; a resume in a fresh process after a kill is tests/test_reliability.py's."""

from __future__ import annotations

from helpers import run_in_process, step_losses

TINY = ["experiment=tiny", "logger=csv", "trainer.log_every_n_steps=1", "trainer.val_check_interval=50",
        "callbacks.last_checkpoint.every_n_train_steps=50", "scheduler.total_steps=200", "sample.max_new_tokens=0",
        "data.sampling=shuffled", "data.corpus.source.max_bytes=20000"]


def test_stopped_and_resumed_run_logs_the_same_losses_as_an_uninterrupted_one(tmp_path, corpus_cache):
    cache = corpus_cache
    full, part = tmp_path / "full", tmp_path / "part"
    run_in_process("train", *TINY, "trainer.max_steps=200", f"hydra.run.dir={full}", cwd=tmp_path, cache=cache)
    run_in_process("train", *TINY, "trainer.max_steps=100", f"hydra.run.dir={part}", cwd=tmp_path, cache=cache)
    first = step_losses(part)
    run_in_process("train", *TINY, "trainer.max_steps=200", f"hydra.run.dir={part}", "ckpt_path=last", cwd=tmp_path,
                   cache=cache)

    reference, resumed = step_losses(full), step_losses(part)
    after = [s for s in reference if s >= 100]
    assert len(after) == 100, f"expected 100 logged steps from 100 on, got {len(after)}"
    # 20 kB of text gives ~560 windows of 32 characters, ~70 batches of 8 per epoch: step 100 is
    # mid-epoch, and the resumed part crosses into a new epoch, so both orders are checked
    assert max(first) < 100 <= min(s for s in resumed if s not in first)
    for step in after:
        assert abs(resumed[step] - reference[step]) <= 1e-5, (step, resumed[step], reference[step])
