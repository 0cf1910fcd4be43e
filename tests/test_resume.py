"""Acceptance 4 of the foundation: resume from `ckpt_path=last` continues exactly, mid-epoch.
The runs are in this process; a resume in a fresh process after a kill is tests/test_reliability.py's."""

from __future__ import annotations

from helpers import run_in_process, step_losses

TINY = ["experiment=tiny", "logger=csv", "trainer.log_every_n_steps=1", "trainer.val_check_interval=50",
        "callbacks.last_checkpoint.every_n_train_steps=50", "scheduler.total_steps=200", "sample.max_new_tokens=0",
        "data.sampling=shuffled", "data.corpus.source.max_bytes=20000"]


def test_stopped_and_resumed_run_logs_the_same_losses_as_an_uninterrupted_one(tmp_path, corpus_cache):
    """One run in three legs continued with ``ckpt_path=last``: to step 30 (before the last-checkpoint callback's
    first period of 50: Lightning writes last.ckpt as the run ends), to 130 (not a multiple of the period), to 200."""
    cache = corpus_cache
    full, part = tmp_path / "full", tmp_path / "part"
    run_in_process("train", *TINY, "trainer.max_steps=200", f"hydra.run.dir={full}", cwd=tmp_path, cache=cache)
    reference, stops = step_losses(full), [30, 130, 200]
    assert sorted(reference) == list(range(200))
    for leg, stop in enumerate(stops):
        before = step_losses(part)
        run_in_process("train", *TINY, f"trainer.max_steps={stop}", f"hydra.run.dir={part}",
                       *(["ckpt_path=last"] if leg else []), cwd=tmp_path, cache=cache)
        resumed = step_losses(part)
        new = sorted(s for s in resumed if s not in before)
        assert new == list(range(stops[leg - 1] if leg else 0, stop)), (stop, new[:3], new[-3:])
    # 20 kB of text gives ~560 windows of 32 characters, ~70 batches of 8 per epoch: steps 30 and 130 are
    # mid-epoch, and the resumed legs cross into new epochs, so both orders are checked
    for step in range(30, 200):
        assert abs(resumed[step] - reference[step]) <= 1e-5, (step, resumed[step], reference[step])
