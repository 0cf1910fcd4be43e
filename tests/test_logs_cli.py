"""Logs that read well and a command line that explains itself: plain progress lines where stdout is not a terminal,
no sentencepiece internals, shell completion, each command's own --help page, and an experiment run by the wrong
command naming the right one."""

import io
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_in_process, step_losses

from lm_lightning.errors import UserError
from lm_lightning.tracking.records import read_metrics_csv

PROGRESS = re.compile(r"^step (\d+)/200 \| loss (\S+)(?: \| val/loss (\S+))? \| lr (\S+) \| ([\d,]+) tok/s \| ETA (\S+)$")
SENTENCEPIECE_LOG = ("trainer_interface.cc", "sentencepiece_trainer.cc", "trainer_spec {", "absl::InitializeLog")


def test_a_200_step_run_with_stdout_in_a_file_prints_about_20_plain_lines_with_the_logged_losses(tmp_path, corpus_cache):
    """stdout is not a terminal (here a StringIO, as a file or a SLURM log): a line every 10 steps and at each
    validation (every 15 steps in experiment=tiny), no carriage returns, the figures those of the CSV log."""
    run = tmp_path / "run"
    proc = run_in_process("train", "experiment=tiny", "trainer.max_steps=200", "logger=csv", "sample.max_new_tokens=0",
                          f"hydra.run.dir={run}", cwd=tmp_path, cache=corpus_cache)
    assert "\r" not in proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    parsed = [PROGRESS.match(line) for line in lines]
    assert all(parsed), lines
    steps = [int(found.group(1)) for found in parsed]
    # 10, 20, ..., 200 and the validations at 15, 45, 75, ... (those at 30, 60, ... share the line of their step)
    assert steps == sorted(set(range(10, 201, 10)) | set(range(15, 200, 15))) and len(lines) <= 30
    train_loss = step_losses(run)  # CSV step s - 1 holds what was logged during optimizer step s
    val_loss = dict(read_metrics_csv(run / "csv" / "version_0" / "metrics.csv")["val/loss"])
    for found, step in zip(parsed, steps):
        assert float(found.group(2)) == pytest.approx(train_loss[step - 1], abs=6e-5)
        if step % 15 == 0:
            assert float(found.group(3)) == pytest.approx(val_loss[step - 1], abs=6e-5)
        else:
            assert found.group(3) is None
        assert int(found.group(5).replace(",", "")) > 0
    assert float(parsed[0].group(4)) == pytest.approx(1e-3, rel=0.05)  # warmup over by step 10: the peak lr
    assert parsed[-1].group(6) == "0:00:00"


def test_the_progress_bar_is_tqdms_on_a_terminal_plain_elsewhere_and_rich_on_request(monkeypatch):
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    import lm_lightning.tracking.plain_progress as plain_progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdout", Terminal())
    assert type(plain_progress.progress_bar()) is TQDMProgressBar
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert type(plain_progress.progress_bar()) is plain_progress.PlainProgress
    assert plain_progress.progress_bar("plain", every_n_steps=7).every_n_steps == 7
    assert type(plain_progress.progress_bar("rich")) is RichProgressBar
    monkeypatch.setattr("lightning.pytorch.utilities.imports._RICH_AVAILABLE", False)
    with pytest.raises(UserError, match=r"kind=rich needs the rich package: pip install rich"):
        plain_progress.progress_bar("rich")
    with pytest.raises(UserError, match=r"kind='bars' is not valid: choose one of auto, tqdm, plain, rich"):
        plain_progress.progress_bar("bars")
    assert [plain_progress._round_interval(n) for n in (0.5, 1.5, 3, 10, 30, 101)] == [1, 2, 5, 10, 50, 200]


def test_prepare_prints_no_sentencepiece_internals_unless_asked(tmp_path, capfd):
    """sentencepiece's trainer logs from C++ straight to the stderr file descriptor: captured at the descriptors."""
    from lm_lightning.data.tokenizer import train_tokenizer

    proc = run_in_process("prepare", "data=tinyshakespeare", "tokenizer=char", "wandb_mode=disabled",
                          cwd=tmp_path, cache=tmp_path / "cache")
    written = capfd.readouterr()
    output = proc.stdout + proc.stderr + written.out + written.err
    assert "prepared corpus:" in proc.stdout
    assert not [marker for marker in SENTENCEPIECE_LOG if marker in output]
    # the same capture sees them when asked for: tokenizer.verbose=true
    train_tokenizer(["to be or not to be\n"], {"type": "char", "verbose": True}, tmp_path / "verbose" / "tokenizer")
    assert "trainer_interface.cc" in capfd.readouterr().err


def test_shell_completion_script_completes_commands_then_each_commands_keys(tmp_path, monkeypatch):
    script = run_in_process("train", "-sc", "install=bash", cwd=tmp_path, cache=tmp_path / "cache").stdout
    assert script.rstrip().endswith("complete -o nospace -o default -F hydra_bash_completion lm-lightning")
    # the same script from a command whose config requires values, and from no command at all
    assert run_in_process("evaluate", "-sc", "install=bash", cwd=tmp_path, cache=tmp_path / "cache").stdout == script
    assert run_in_process("-sc", "install=bash", cwd=tmp_path, cache=tmp_path / "cache").stdout == script

    def query(line: str) -> list[str]:
        monkeypatch.setenv("COMP_LINE", line)
        return run_in_process("-sc", "query=bash", cwd=tmp_path, cache=tmp_path / "cache").stdout.split()

    assert {"train", "prepare", "scaling", "evaluate"} <= set(query("lm-lightning ")) and "fit" not in query("lm-lightning ")
    assert query("lm-lightning scaling ") == ["fit", "coordcheck", "plan"]
    assert "model=gpt" in query("lm-lightning train model=")
    assert query("lm-lightning scaling fit n_boot") == ["n_bootstrap=", "n_bootstrap_chinchilla="]
    assert query("lm-lightning evaluate ckpt") == ["ckpt_path="]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_installed_bash_completion_completes_commands_and_keys_without_importing_torch(tmp_path):
    """The script as bash runs it: each key press calls `lm-lightning -sc query=bash` with the line typed so far;
    answered from the config alone (no torch, no Lightning: a fraction of a second)."""
    script = run_in_process("-sc", "install=bash", cwd=tmp_path, cache=tmp_path / "cache").stdout
    (tmp_path / "completion.sh").write_text(script)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def complete(line: str) -> list[str]:
        typed = f'COMP_LINE="{line}"; COMP_POINT=${{#COMP_LINE}}; words=($COMP_LINE); COMP_CWORD=$((${{#words[@]}} - 1))'
        proc = subprocess.run(["bash", "-c", f'source completion.sh; {typed}; hydra_bash_completion; '
                               'echo "${COMPREPLY[@]}"'], cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env)
        return proc.stdout.split()

    assert complete("lm-lightning sca") == ["scaling"]
    assert complete("lm-lightning train model=g") == ["model=gpt", "model=gru"]
    probe = ("import sys; sys.argv = ['lm-lightning', '-sc', 'query=bash']; from lm_lightning.cli import main; main(); "
             "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                          env={**env, "COMP_LINE": "lm-lightning train mod"})
    assert proc.stdout.split() == ["model.", "model=", "False"], proc.stderr


def test_each_commands_help_lists_its_own_groups_and_options_with_their_comments(tmp_path):
    page = run_in_process("train", "--help", cwd=tmp_path, cache=tmp_path / "cache").stdout
    assert page.startswith("usage: lm-lightning train [key=value ...] [group=option ...]")
    assert re.search(r"^  tokenizer=bpe +sentencepiece model trained on the train split", page, re.M)
    assert re.search(r"^ +options: bpe, byte, byte_bpe, char, hf, unigram, word, words$", page, re.M)
    assert re.search(r"^  sample\.temperature=0\.8 +softmax temperature; 0 = greedy$", page, re.M)
    assert re.search(r"^  tiny +A seconds-long run for smoke tests", page, re.M)
    # groups of other commands, Hydra's generic page and the composed config's dump are not on it
    assert not re.search(r"^  (peft|task|harness)=", page, re.M)
    assert "Powered by Hydra" not in page and "== Config ==" not in page
    assert not re.search(r"^  (sst2_head|dpo|quant_ptq) ", page, re.M)  # experiments of finetune, align, quantize
    assert not re.search(r"^  (hydra|command|defaults)\b", page, re.M)

    fit = run_in_process("scaling", "fit", "--help", cwd=tmp_path, cache=tmp_path / "cache").stdout
    assert re.search(r"^  n_bootstrap=1000 +bootstrap resamples for the 95% intervals", fit, re.M)
    assert re.search(r"^  tracker\.mode=auto +online when logged in", fit, re.M)
    assert "config groups" not in fit and "model=" not in fit and "experiments" not in fit
    group = run_in_process("scaling", "--help", cwd=tmp_path, cache=tmp_path / "cache").stdout
    assert group.startswith("usage: lm-lightning scaling <fit|coordcheck|plan>") and "  scaling plan " in group
    wrong = run_in_process("scaling", "fits", cwd=tmp_path, cache=tmp_path / "cache", check=False)
    assert wrong.returncode == 2
    assert wrong.stderr.splitlines()[-1] == "error: lm-lightning scaling fits is not a command: choose lm-lightning scaling <fit|coordcheck|plan>"


def test_an_align_experiment_run_by_train_ends_with_the_command_to_run(tmp_path):
    proc = run_in_process("train", "experiment=dpo", f"paths.log_dir={tmp_path / 'logs'}", cwd=tmp_path,
                          cache=tmp_path / "cache", check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["error: experiment=dpo is for lm-lightning align: run lm-lightning align experiment=dpo"]
    assert not (tmp_path / "logs").exists()


def test_saving_the_last_checkpoint_does_not_log_weights_only_false(tmp_path, corpus_cache, caplog):
    """The end-of-run ``last.ckpt`` (25 steps: not a multiple of its 100-step refresh) asks for the full, resumable
    state itself: Lightning's "`weights_only` was not set, defaulting to `False`" would read as unsafe loading."""
    lightning_log = logging.getLogger("lightning.pytorch")  # its own handler; it does not propagate to caplog's
    lightning_log.addHandler(caplog.handler)
    try:
        run_in_process("train", "experiment=tiny", "trainer.max_steps=25", "logger=csv", "sample.max_new_tokens=0",
                       f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, cache=corpus_cache)
    finally:
        lightning_log.removeHandler(caplog.handler)
    assert "`Trainer.fit` stopped: `max_steps=25` reached" in caplog.text
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file() and "weights_only" not in caplog.text
