"""The command line as users meet it: multirun tracking, bad input, evaluate and generate on a checkpoint.
The commands run in this process (``run_in_process``); the module entry point runs in its own (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import SHARED_DATA, run_in_process, step_losses

QUICK = ["experiment=tiny", "trainer.max_steps=30", "sample.max_new_tokens=0"]


@pytest.fixture
def trained_run(tiny_run) -> Path:
    """One tiny tracked run shared by the evaluate/generate tests: the session's (QUICK, CSV log)."""
    return tiny_run


def test_multirun_gives_one_wandb_run_and_one_csv_log_per_job_in_one_group(tmp_path, corpus_cache):
    proc = run_in_process("train", "-m", *QUICK, "model.n_layer=1,2", "experiment_name=depths",
                          f"paths.log_dir={tmp_path / 'out'}", cwd=tmp_path, cache=corpus_cache)
    jobs = sorted(p for p in (tmp_path / "out" / "depths" / "multiruns").glob("*/*") if p.is_dir())
    assert len(jobs) == 2
    assert ["model.n_layer=1" in jobs[0].name, "model.n_layer=2" in jobs[1].name] == [True, True]
    run_ids, groups = set(), set()
    for job, n_layer in zip(jobs, (1, 2)):
        record = json.loads((job / "run.json").read_text())
        assert record["config"]["model"]["n_layer"] == n_layer
        assert record["steps"] == 30
        wandb_runs = list((job / "wandb").glob("offline-run-*"))
        assert len(wandb_runs) == 1, wandb_runs
        run_ids.add(wandb_runs[0].name.rsplit("-", 1)[1])
        assert (wandb_runs[0] / f"run-{wandb_runs[0].name.rsplit('-', 1)[1]}.wandb").stat().st_size > 0
        groups.add(record["group"])
        # the experiment name prefixes the run name, once: not again among the overrides
        assert record["run_name"] == f"depths-model.n_layer={n_layer},sample.max_new_tokens=0,trainer.max_steps=30"
        assert sorted(step_losses(job)) == list(range(30)), "each job has its own full metric history"
    assert len(run_ids) == 2
    assert len(groups) == 1 and None not in groups
    assert proc.returncode == 0


def test_evaluate_reports_loss_perplexity_and_bits_per_byte(trained_run, tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text((SHARED_DATA / "tinyshakespeare" / "input.txt").read_text()[-20000:])
    proc = run_in_process("evaluate", f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}", f"text_file={text}",
                          f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path, cache=tmp_path / "cache")
    line = next(l for l in proc.stdout.splitlines() if l.startswith(str(text)))
    loss = float(line.split("loss ")[1].split()[0])
    ppl = float(line.split("perplexity ")[1].split()[0])
    bpb = float(line.split("bits-per-byte ")[1].split()[0])
    assert ppl == pytest.approx(2.718281828 ** loss, rel=1e-3)
    # character tokens: one byte per token (ASCII), so bits/byte = nats/token / ln 2
    assert bpb == pytest.approx(loss / 0.693147, rel=1e-3)


def test_generate_samples_from_a_checkpoint_with_and_without_cache(trained_run, tmp_path):
    outs = []
    for cache in ("true", "false"):
        proc = run_in_process("generate", f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}", "prompt=ROMEO:",
                              "max_new_tokens=40", "temperature=0", f"use_cache={cache}",
                              f"hydra.run.dir={tmp_path / cache}", cwd=tmp_path, cache=tmp_path / "cache")
        outs.append(proc.stdout.split("--- sample 1 ---\n", 1)[1])
    assert outs[0].startswith("ROMEO:") and len(outs[0]) > len("ROMEO:")
    assert outs[0] == outs[1], "greedy decoding with the KV cache equals decoding without it"
    # the README's sampling line: nucleus sampling, two samples (tests/test_readme.py leaves it to this test)
    proc = run_in_process("generate", f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}", "prompt=ROMEO:",
                          "top_p=0.9", "num_samples=2", "max_new_tokens=20", f"hydra.run.dir={tmp_path / 'top_p'}",
                          cwd=tmp_path, cache=tmp_path / "cache")
    assert proc.stdout.count("--- sample") == 2


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "override, message",
    [
        ("data.corpus.source.path=/no/such/corpus.txt", "data file not found: /no/such/corpus.txt"),
        ("model.n_layers=2", "unknown config key 'model.n_layers'"),
        ("model=gpt9", "no config 'model/gpt9'"),
    ],
)
def test_bad_input_ends_with_one_error_line_and_a_nonzero_exit(tmp_path, override, message):
    proc = run_in_process("train", *QUICK, override, f"paths.log_dir={tmp_path / 'out'}", cwd=tmp_path,
                          cache=tmp_path / "cache", check=False)
    assert proc.returncode == 2
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "args, message",
    [
        (["evaluate"], "error: ckpt_path and text_file are required: lm-lightning evaluate "
                       "ckpt_path=<a .ckpt written by lm-lightning train> text_file=<the text to score>"),
        (["generate"], "error: ckpt_path is required: lm-lightning generate ckpt_path=<a .ckpt written by lm-lightning train>"),
        # ??? in an experiment overlay would keep train.yaml's null and silently train from scratch
        (["train", "experiment=continued_pretraining"],
         "error: init_from is required: lm-lightning train init_from=<the checkpoint to continue from>"),
    ],
)
def test_a_missing_required_value_is_named_with_its_meaning_before_anything_runs(tmp_path, args, message):
    proc = run_in_process(*args, cwd=tmp_path, cache=tmp_path / "cache", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [message]
    assert not (tmp_path / "outputs").exists()  # refused at composition: no run folder, nothing trained
    shown = run_in_process(*args, "--cfg", "job", cwd=tmp_path, cache=tmp_path / "cache")  # printing the config still works
    assert "???" in shown.stdout or "${required:}" in shown.stdout


@pytest.mark.bad_input
def test_empty_corpus_is_refused_and_earlier_outputs_survive(tmp_path, tiny_run):
    import shutil

    trained_run = tmp_path / "run"  # a copy: the session's run folder is read by other tests meanwhile
    shutil.copytree(tiny_run, trained_run)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    before = {p: p.stat().st_mtime_ns for p in trained_run.rglob("*") if p.is_file()}
    proc = run_in_process("train", *QUICK, "data=text", f"data.corpus.source.path={empty}",
                          f"hydra.run.dir={trained_run}", cwd=tmp_path, cache=tmp_path / "cache", check=False)
    assert proc.returncode == 2
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "corpus is empty" in errors[0] and str(empty) in errors[0]
    after = {p: p.stat().st_mtime_ns for p in before}
    changed = [p for p in before if before[p] != after[p] and ".hydra" not in p.parts and p.suffix != ".log"
               and p.name != ".lock"]  # the lock file names its holder: this run held the folder a moment
    assert not changed, f"a failed run touched earlier outputs: {changed}"


def test_tensorboard_logger_writes_event_files_beside_the_csv_log(tmp_path, corpus_cache):
    env_run = run_in_process("train", *QUICK, "logger=tensorboard", f"hydra.run.dir={tmp_path / 'tb'}", cwd=tmp_path,
                             cache=corpus_cache)
    assert list((tmp_path / "tb" / "tensorboard").rglob("events.out.tfevents.*"))
    assert (tmp_path / "tb" / "csv" / "version_0" / "metrics.csv").is_file()
    assert "W&B run folder:  (W&B off)" in env_run.stdout


@pytest.mark.slow
def test_module_entry_points_and_the_console_script_are_the_same_app(tmp_path):
    """`python -m lm_lightning.cli.train` is the same app as `lm-lightning train`, and the installed console
    script dispatches to it (the other tests call the dispatcher in their own process)."""
    import subprocess
    import sys

    from helpers import REPO

    proc = subprocess.run([sys.executable, "-m", "lm_lightning.cli.train", "experiment=tiny", "--cfg", "job"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "experiment_name: tiny" in proc.stdout
    script = Path(sys.executable).with_name("lm-lightning")
    console = subprocess.run([str(script), "train", "experiment=sst2_head"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=120)
    assert console.returncode == 2
    assert console.stderr.strip().splitlines() == [
        "error: experiment=sst2_head is for lm-lightning finetune: run lm-lightning finetune experiment=sst2_head"]


@pytest.mark.bad_input
def test_evaluate_and_generate_refuse_a_checkpoint_that_fails_its_checksum(trained_run, tmp_path):
    import shutil

    from lm_lightning.errors import UserError
    from lm_lightning.training.loading import load_trained

    copy = tmp_path / "last.ckpt"
    shutil.copy(trained_run / "checkpoints" / "last.ckpt", copy)
    shutil.copy(trained_run / "checkpoints" / "last.ckpt.sha256", tmp_path / "last.ckpt.sha256")
    load_trained(str(copy))  # intact: loads
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0x01
    copy.write_bytes(bytes(data))
    with pytest.raises(UserError, match="fails its SHA-256 check"):
        load_trained(str(copy))
