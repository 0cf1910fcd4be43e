"""The README's commands are tested: CI uses its install and test commands; every ``lm-lightning`` line
composes as written (the check each command runs first) and names files that exist; the lines that train
nothing run as written; and the first training line, on the built-in corpus, runs through the installed
console script in its own process (shortened with extra overrides: later overrides win).

The other lines run (shortened) in the tests of their commands, not again here:
  prepare data=tinyshakespeare tokenizer=char  conftest.py's corpus_cache fixture; test_prepare_cli.py
  train data=text data.corpus.source.path=...  test_cli.py::test_empty_corpus_is_refused_and_earlier_outputs_survive,
                                               test_continued_pretraining.py (data=text); its file is checked here
  train experiment=shakespeare_char|bert|ul2   test_zoo_cli.py::test_every_experiment_composes_and_runs_one_batch
  train -m ... arch_objective_grid             test_zoo_cli.py::test_the_readme_grid_trains_every_valid_pair_and_skips_the_rest
  train -m experiment=tiny model.n_layer=1,2   test_cli.py::test_multirun_gives_one_wandb_run_and_one_csv_log_per_job_in_one_group
  train -m ... tiny_depth                      test_zoo_cli.py grid tests (a sweep file's swept values)
  train -m ... scaling_cpu; scaling fit        test_scaling_budget.py::test_scaling_fit_reads_a_sweep_back_from_its_run_records
  scaling coordcheck; parametrization=mup      test_mup.py (the coordinate check through the command)
  train callbacks=wsd_stable; scheduler=wsd_branch; wsd_ladder sweeps   test_wsd.py (the two-step recipe end to end)
  scaling fit ... predict=[...]; prediction_ladder(_mup)   test_scaling_seeds.py (seeds averaged, predictions and intervals)
  train experiment=tiny ... ckpt_path=last     test_resume.py; test_reliability.py (resume after a kill, after a torn write)
  evaluate                                     test_cli.py::test_evaluate_reports_loss_perplexity_and_bits_per_byte
  evaluate ... stride=32                       test_evaluate.py (stride, stateful, the report, WikiText-2 on a slice)
  prepare data=hf|parquet                      test_data_sources.py::test_text_jsonl_parquet_and_hf_sources_prepare_identical_token_files
  train|prepare tokenizer=byte_bpe|words       test_hf_tokenizers.py
  evaluate harness; score; export (harness)    test_harness.py (the SST-2 and WikiText-2 tasks against score, evaluate and lm-eval's hf)
  train experiment=zaremba_small              test_streams.py (the recipe's settings, resume across an epoch, a short run)
  import                                       test_import_hf.py::test_import_command_then_continued_pretraining_from_the_imported_checkpoint
  generate ... top_p=0.9 num_samples=2         test_cli.py::test_generate_samples_from_a_checkpoint_with_and_without_cache
  score                                        test_zero_shot.py::test_score_command_prints_accuracy_beside_the_majority_baseline
  finetune (classification, peft=lora)         test_finetune.py::test_finetune_command_trains_a_head_and_reports_dev_accuracy
  finetune task=sft max_length=256             test_sft.py::test_sft_command_lowers_the_response_loss_and_answers_held_back_instructions
  train experiment=continued_pretraining       test_continued_pretraining.py
  export                                       test_export_hf.py::test_export_command_on_a_trained_checkpoint_end_to_end
  align experiment=ppo                         test_ppo.py::test_align_ppo_command_logs_every_update_saves_curves_and_a_policy
  distill ... experiment=tiny                  test_distill.py::test_distill_command_trains_a_student_from_a_teacher_checkpoint
  quantize ... data=tinyshakespeare            test_quantize.py::test_quantize_command_on_a_trained_checkpoint
  train ... strategy=fsdp2 trainer.devices=2   test_scaleout.py::test_two_processes_log_the_single_process_losses[fsdp2]
  the lm-lightning console script              test_cli.py::test_module_entry_points_and_the_console_script_are_the_same_app
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from helpers import REPO, SHARED_DATA, cli_env, run_in_process
from lm_lightning.cli import COMMANDS as SUBCOMMANDS
from lm_lightning.config.app import CONF_DIR
from lm_lightning.config.overrides import check_overrides

README = (REPO / "README.md").read_text()
BASH_BLOCKS = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
COMMANDS = [line.strip() for block in BASH_BLOCKS for line in block.splitlines() if line.strip()]
LINES = [c for c in COMMANDS if c.startswith("lm-lightning ")]
# a long training line gets these appended (later overrides win), so the README line is composed and run as written
SHORTEN = ["trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=2",
           "scheduler.warmup_steps=1", "sample.max_new_tokens=8", "callbacks.last_checkpoint.every_n_train_steps=2"]


def command_and_args(line: str) -> tuple[list[str], list[str]]:
    """(command words, arguments) of an ``lm-lightning`` line: ``scaling plan x=1`` -> (["scaling", "plan"], ["x=1"])."""
    words = shlex.split(line.replace("<time>", "2026-12-01_12-00-00"))[1:]  # <time>: the sweep the README ran before
    n = 2 if " ".join(words[:2]) in SUBCOMMANDS else 1
    return words[:n], words[n:]


def test_ci_installs_and_tests_exactly_as_the_readme_says():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    install, run = COMMANDS[0], COMMANDS[1]
    assert install.startswith("pip install torch==2.13.0") and run == "lm-lightning train"
    assert install in ci
    test_command = COMMANDS[2]
    assert test_command == "pytest" and test_command in ci


@pytest.mark.parametrize("line", LINES, ids=lambda line: line.removeprefix("lm-lightning ").replace("/", ":"))
def test_every_lm_lightning_line_composes_as_written_and_names_files_that_exist(line):
    command, args = command_and_args(line)
    if "--config-name" in args:  # a sweep file under sweeps/, over conf/ (the app's own folder)
        sweep = args[args.index("--config-name") + 1]
        overrides = [a for a in args if "=" in a and not a.startswith("-")]
        if "-m" in args:  # a sweep's job gets one value of each list: compose the first
            overrides = [a if "[" in a else a.split(",")[0] for a in overrides]
        with initialize_config_dir(config_dir=str(REPO / "sweeps"), version_base="1.3"):
            cfg = compose(config_name=sweep, overrides=[*overrides, f"hydra.searchpath=[file://{CONF_DIR}]"])
        assert cfg.experiment_name
    else:
        assert check_overrides("_".join(command), args) is None, line
    # the README speaks from the repository root, with the shared corpora beside it at ../shared/data
    for value in (a.split("=", 1)[1] for a in args if "=" in a and "../shared/data/" in a):
        assert (SHARED_DATA / value.split("../shared/data/", 1)[1]).is_file(), line


def test_the_readme_lines_that_train_nothing_run_as_written(tmp_path):
    """Printing a composed config, planning a compute budget and estimating memory: seconds, in this process."""
    assert len(LINES) >= 8  # the README's lm-lightning lines were found (each composes in the test above)
    lines = [line for line in LINES if "--cfg" in line or line.startswith(("lm-lightning scaling plan",
                                                                           "lm-lightning estimate"))]
    assert len(lines) == 5, lines
    for line in lines:
        command, args = command_and_args(line)
        fit = next((a.split("=", 1)[1] for a in args if a.startswith("scaling.fit=")), None)
        if fit:  # the ladder's fit the line reads: an L(N, D) as `scaling fit` writes it
            (tmp_path / fit).mkdir(parents=True, exist_ok=True)
            (tmp_path / fit / "fits.json").write_text(json.dumps(
                {"L(N,D)": {"E": 1.7, "A": 400.0, "B": 410.0, "alpha": 0.34, "beta": 0.28}}))
        if "scaling.time_budget" in line:  # speed measured on two windows, one timed step per depth
            args = [*args, "data.batch_size=2", "scaling.measure_steps=1"]
        out = run_in_process(*command, *args, cwd=tmp_path, cache=tmp_path / "cache").stdout
        if "--cfg" in args:
            assert "type: unigram" in out and "vocab_size: 2048" in out, line
        elif command == ["scaling", "plan"] and fit:
            assert "predicted loss" in out and "<- plan" in out and "plan: n_layer" in out, line
        elif command == ["scaling", "plan"]:
            assert "of the budget 1e+13" in out, line
        else:
            assert "optimizer states" in out and " GB" in out, line


@pytest.mark.slow
def test_the_first_training_line_runs_on_the_built_in_corpus_through_the_console_script(tmp_path):
    """`lm-lightning train` as a newcomer first runs it: the built-in corpus (the standard library's source,
    a BPE tokenizer trained on it), W&B offline; the README's next line, shortened to 4 steps."""
    line = next(c for c in LINES if c.startswith("lm-lightning train model.n_layer=2"))
    assert COMMANDS[1] == "lm-lightning train" and "data=" not in line and "experiment=" not in line
    script = Path(sys.executable).with_name("lm-lightning")  # the console script `pip install` put beside python
    proc = subprocess.run([str(script), *shlex.split(line)[1:], *SHORTEN], cwd=tmp_path,
                          env=cli_env(tmp_path / "cache"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "final validation (" in proc.stdout and "W&B run folder:" in proc.stdout, line
    # what the newcomer reads: each of Lightning's lines once (Hydra's handler; Lightning's own console would repeat
    # it), in the run's log file too, and no cloud-service tip or deprecation warning from Lightning's own code
    output = proc.stdout + proc.stderr
    assert output.count("GPU available: False, used: False") == 1 and "💡 Tip" not in output
    assert "LeafSpec" not in output
    log_file = next(tmp_path.glob("outputs/default/runs/*/train.log")).read_text()
    assert "GPU available: False, used: False" in log_file and "Seed set to" in log_file
