"""Every ready experiment composes and trains, and the command line refuses incompatible pairs."""

from __future__ import annotations

import json

from helpers import REPO, command_of_experiment, run_cli

ALL_EXPERIMENTS = sorted(p.stem for p in (REPO / "lm_lightning" / "conf" / "experiment").glob("*.yaml"))
# training experiments that run from the default config alone: not those of other commands (finetune, align, ...),
# not continued pretraining (it needs a checkpoint: tests/test_continued_pretraining.py), and not those on the
# whole Gutenberg corpus (minutes to prepare; they compose in tests/test_configs.py)
EXPERIMENTS = [e for e in ALL_EXPERIMENTS if command_of_experiment(e) == "train" and e != "continued_pretraining"
               and "override /data: gutenberg" not in (REPO / "lm_lightning" / "conf" / "experiment" / f"{e}.yaml").read_text()]
ONE_BATCH = ["trainer.max_steps=1", "scheduler.warmup_steps=0", "trainer.val_check_interval=1",
             "trainer.limit_val_batches=1", "data.batch_size=2", "data.val_batch_size=2", "sample.max_new_tokens=4",
             "logger=csv", "callbacks.last_checkpoint.every_n_train_steps=1"]


def test_every_experiment_composes_and_runs_one_batch(tmp_path):
    """One multirun over every file in conf/experiment/: a config that stops composing fails here."""
    assert {"gpt", "bert", "t5", "bart", "prefix_lm", "ul2", "lstm", "gru", "ffn", "moe_gpt"} <= set(EXPERIMENTS)
    proc = run_cli("train", "-m", f"experiment={','.join(EXPERIMENTS)}", *ONE_BATCH,
                   f"paths.log_dir={tmp_path / 'logs'}", cwd=tmp_path, cache=tmp_path / "cache", timeout=900)
    n = len(EXPERIMENTS)
    assert f"sweep summary: {n} of {n} jobs finished, 0 failed" in proc.stdout
    summary = next((tmp_path / "logs").glob("*/multiruns/*/summary.json"))
    jobs = json.loads(summary.read_text())
    assert [j["outcome"] for j in jobs] == ["ok"] * n
    rows = {j["overrides"].split()[0].removeprefix("experiment="): j["result"] for j in jobs}
    assert rows["bert"]["family"] == "bert" and rows["bert"]["objective"] == "mlm_nsp"
    assert rows["ul2"]["family"] == "t5" and rows["ul2"]["objective"] == "ul2"
    assert rows["bert"]["bpb"] is None and rows["gpt"]["bpb"] > 0  # bits-per-byte only where the text is predicted
    for name, row in rows.items():
        assert row["val_loss"] > 0 and row["params"] > 0, name


def test_grid_sweep_trains_the_valid_pairs_skips_the_rest_and_prints_one_table(tmp_path):
    proc = run_cli("train", "-m", "--config-dir", str(REPO / "sweeps"), "--config-name", "arch_objective_grid",
                   "model=gpt,bert,bilstm", "objective=causal_lm,mlm", "trainer.max_steps=2", "scheduler.warmup_steps=0",
                   "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "logger=csv",
                   f"paths.log_dir={tmp_path / 'logs'}", cwd=tmp_path, cache=tmp_path / "cache")
    assert "sweep summary: 3 of 3 jobs finished, 0 failed; 3 incompatible pairs skipped" in proc.stdout
    table = proc.stdout[proc.stdout.index("  family "):].splitlines()
    assert table[0].split() == ["family", "objective", "params", "loss@0", "val", "loss", "ppl", "bpb", "seconds"]
    rows = {tuple(line.split()[:-6]): line.split()[-6:] for line in table[1:4]}
    assert set(rows) == {("gpt", "causal_lm"), ("bert", "mlm"), ("bidirectional", "lstm", "mlm")}
    assert rows[("gpt", "causal_lm")][4] != "-" and rows[("bert", "mlm")][4] == "-"  # bpb


def test_an_incompatible_pair_is_refused_when_composed_naming_the_valid_objectives(tmp_path):
    proc = run_cli("train", "model=t5", "objective=mlm", f"paths.log_dir={tmp_path / 'logs'}", cwd=tmp_path,
                   cache=tmp_path / "cache", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: objective=mlm cannot train model family t5: valid objectives for t5 are "
        "span_corruption, bart_denoising, ul2")
    assert not (tmp_path / "logs").exists()  # refused before anything was written
