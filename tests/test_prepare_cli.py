"""``lm-lightning prepare`` prints the report, saves it next to the data and records it as an
offline W&B run; bad input ends with one ``error:`` line and exit status 2."""

import json

import pytest
from helpers import SHARED_DATA, run_in_process

SHAKESPEARE = SHARED_DATA / "tinyshakespeare" / "input.txt"


def _prepare(tmp_path, *overrides):
    return run_in_process("prepare", "data=text", f"data.corpus.source.path={SHAKESPEARE}",
                          "data.corpus.source.max_bytes=100000", "tokenizer.vocab_size=512",
                          f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}", *overrides,
                          cwd=tmp_path, cache=tmp_path / "cache", check=False)


def test_prepare_prints_saves_and_logs_the_report(tmp_path):
    done = _prepare(tmp_path, "wandb_mode=offline")
    assert done.returncode == 0, done.stderr
    report_path = next((tmp_path / "cache").glob("text-*/report.json"))
    report = json.loads(report_path.read_text())
    assert f"{report['input']['documents']:,} documents" in done.stdout
    assert "- exact dups" in done.stdout and "- near dups" in done.stdout
    assert f"{report['splits']['train']['tokens']:,} tokens" in done.stdout
    assert f"(report: {report_path})" in done.stdout
    run = next((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert f"W&B run: {run}" in done.stdout


@pytest.mark.bad_input
def test_prepare_bad_option_is_one_error_line(tmp_path):
    done = _prepare(tmp_path, "wandb_mode=disabled", "+data.corpus.dedup.treshold=0.5")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: unknown data.corpus.dedup option(s) treshold")
    assert not list((tmp_path / "cache").glob("text-*"))
