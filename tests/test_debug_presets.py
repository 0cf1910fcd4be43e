"""The ``debug=`` presets (conf/debug/, lightning-hydra-template's debug configs) on ``experiment=tiny``, each run
through ``lm-lightning train`` in this process: what each one is for happens, and the end-of-run record and banner
cope with it (a fast dev run saves no checkpoint and logs nothing)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from helpers import run_in_process, step_losses
from hydra import compose, initialize_config_dir

from lm_lightning.config.app import CONF_DIR

PRESETS = sorted(path.stem for path in (Path(CONF_DIR) / "debug").glob("*.yaml"))


def debug_run(preset: str, tmp_path: Path, cache: Path, *overrides: str) -> tuple[Path, dict, str]:
    """Runs ``lm-lightning train experiment=tiny debug=<preset>``; its run folder, run.json and stdout."""
    proc = run_in_process("train", "experiment=tiny", f"debug={preset}", "num_threads=1", *overrides,
                          cwd=tmp_path, cache=cache)
    [record_path] = (tmp_path / "outputs" / "debug" / "tiny" / "runs").glob("*/run.json")  # apart from real runs
    return record_path.parent, json.loads(record_path.read_text()), proc.stdout


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_over_an_experiment_csv_only_and_a_command_line_logger_wins(preset):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=tiny", f"debug={preset}"], return_hydra_config=True)
        chosen = compose(config_name="train", overrides=["experiment=tiny", f"debug={preset}", "logger=wandb"])
    assert list(cfg.logger) == ["csv"]  # no tracker run to clean up
    assert cfg.hydra.run.dir.startswith(f"{cfg.paths.log_dir}/debug/tiny/runs/")
    assert cfg.experiment_name == "tiny" and cfg.model.n_layer == 2  # the experiment still applies
    assert set(chosen.logger) == {"wandb", "csv"}


def test_fdr_runs_one_step_and_one_validation_batch_and_saves_nothing(tmp_path, corpus_cache):
    run, record, stdout = debug_run("fdr", tmp_path, corpus_cache)
    assert record["steps"] == 1 and record["tokens_trained"] == 8 * 32  # one batch of 8 windows of 32
    assert record["status"] == "finished"
    assert 3.5 < record["final"]["val/loss"] < 4.5  # ~ln(65) of an untrained model on 65 characters
    assert record["checkpoints"] == {"best": "", "last": ""}
    assert not list(run.rglob("*.ckpt"))
    assert record["csv_dir"] is None and record["loss_plot"] is None  # Lightning logs nothing in a fast dev run
    assert record["throughput"]["over_batches"] == 1 and record["throughput"]["tokens_per_sec"] > 0
    assert "last checkpoint: (none)" in stdout and "CSV log:         (none)" in stdout
    assert record["config"]["trainer"]["fast_dev_run"] is True


def test_overfit_memorises_its_few_batches(tmp_path, corpus_cache):
    # a higher lr for fewer steps: the preset's 300 steps at the tiny experiment's lr reach ~1.0 nats, in ~6 s
    run, record, _ = debug_run("overfit", tmp_path, corpus_cache, "trainer.max_steps=60", "optimizer.lr=1e-2")
    losses = step_losses(run)
    assert record["steps"] == 60 and len(losses) == 60
    assert losses[0] > 4.0
    memorised = sum(losses[step] for step in range(50, 60)) / 10
    # a normal tiny run at this lr is at ~3.1 after 60 steps, train and validation alike: only the same 3 batches
    # over and over get this low, and what is learnt does not carry over to the validation text
    assert memorised < 1.6
    assert record["final"]["val/loss"] > memorised + 2
    assert not (run / "checkpoints" / "best.ckpt").exists()


def test_limit_runs_short_epochs_each_ended_by_a_validation(tmp_path, corpus_cache):
    _, record, _ = debug_run("limit", tmp_path, corpus_cache)
    assert record["steps"] == 30
    with open(Path(record["csv_dir"]) / "metrics.csv", newline="") as f:
        validations = [(int(row["epoch"]), int(row["step"])) for row in csv.DictReader(f) if row.get("val/loss")]
    assert validations == [(0, 9), (1, 19), (2, 29)]  # at the end of each epoch of 10 batches
    assert Path(record["checkpoints"]["best"]).is_file() and Path(record["checkpoints"]["last"]).is_file()


def test_profiler_writes_pytorch_traces_and_an_operator_table_into_the_run_folder(tmp_path, corpus_cache):
    # one validation, at 15; every row of the table (the preset's 30 rows are ranked by CPU time, which for this tiny
    # model puts Lightning's hooks above the matmuls, and their order shifts with the machine's load)
    run, record, _ = debug_run("profiler", tmp_path, corpus_cache, "trainer.max_steps=15", "trainer.profiler.row_limit=-1")
    [trace] = (run / "profiler").glob("fit-pytorch-*training_step*.pt.trace.json")
    events = json.loads(trace.read_text())["traceEvents"]
    steps = {event["name"] for event in events if re.fullmatch(r"ProfilerStep#\d+", event.get("name", ""))}
    assert steps == {"ProfilerStep#2", "ProfilerStep#3", "ProfilerStep#4"}  # 1 skipped, 1 warm-up, 3 recorded
    assert any(event.get("name") == "aten::mm" for event in events)  # the operators
    assert any("training_step" in event.get("name", "") for event in events)  # and Lightning's hooks
    assert len(list((run / "profiler").glob("fit-pytorch-*validation_step*.pt.trace.json"))) == 1
    table = (run / "profiler" / "fit-pytorch.txt").read_text()
    assert "aten::mm" in table and "MmBackward0" in table  # the operators of every recorded step:
    assert "run_training_batch" in table and "SingleDeviceStrategy.validati" in table  # training and validation
    assert record["steps"] == 15


def test_profiler_simple_times_each_lightning_hook(tmp_path, corpus_cache):
    run, record, _ = debug_run("profiler_simple", tmp_path, corpus_cache, "trainer.max_steps=10")
    report = (run / "profiler" / "fit-simple.txt").read_text()
    row = next(line for line in report.splitlines() if line.startswith("|  run_training_batch "))
    assert [cell.strip() for cell in row.split("|")][3] == "10"  # one call per step
    assert record["steps"] == 10
