"""The README's commands are tested: CI uses its install and test commands, and each
``lm-lightning`` line in it runs (shortened with extra overrides where it would train for minutes)."""

from __future__ import annotations

import re
import shlex

from helpers import REPO, SHARED_DATA, run_cli

README = (REPO / "README.md").read_text()
BASH_BLOCKS = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
COMMANDS = [line.strip() for block in BASH_BLOCKS for line in block.splitlines() if line.strip()]
# a long training line gets these appended (later overrides win), so the README line is composed and run as written
SHORTEN = ["trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=2",
           "scheduler.warmup_steps=1", "sample.max_new_tokens=8", "callbacks.last_checkpoint.every_n_train_steps=2"]


def test_ci_installs_and_tests_exactly_as_the_readme_says():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    install, run = COMMANDS[0], COMMANDS[1]
    assert install.startswith("pip install torch==2.13.0") and run == "lm-lightning train"
    assert install in ci
    test_command = COMMANDS[2]
    assert test_command == "pytest" and test_command in ci


def test_every_lm_lightning_command_in_the_readme_runs(tmp_path):
    # the README speaks from the repository root, with the shared corpora beside it at ../shared/data
    workdir = tmp_path / "repo"
    workdir.mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(SHARED_DATA)
    (workdir / "sweeps").symlink_to(REPO / "sweeps")
    lines = [c for c in COMMANDS if c.startswith("lm-lightning ")]
    assert len(lines) >= 8
    for line in lines:
        if "<time>" in line:  # the folder of the sweep the README ran just before
            latest = sorted((workdir / "outputs").glob("*/multiruns/*"))[-1]
            line = line.replace("outputs/scaling_cpu/multiruns/<time>", str(latest))
        args = shlex.split(line)[1:]
        if args[0] == "train" and "--cfg" not in args and not any(a.startswith("trainer.max_steps") for a in args):
            args += SHORTEN
        if args[0] == "finetune":  # 200 training sentences, 4 steps
            args += ["task.max_train_examples=200", "trainer.max_steps=4", "trainer.val_check_interval=4", "warmup_steps=1"]
            proc = run_cli(*args, cwd=workdir, cache=tmp_path / "cache")
            done = "answers to 3 held-back instructions:" if "task=sft" in args else "dev accuracy"
            assert done in proc.stdout and "trainable parameters" in proc.stdout, line
            continue
        if args[0] == "align" and "experiment=ppo" in args:  # 2 updates of 4 short responses
            args += ["ppo.updates=2", "ppo.batch_size=4", "ppo.minibatch_size=2", "ppo.max_new_tokens=4"]
        if args[0] == "distill":
            args += SHORTEN
        if "scaling_cpu" in args:  # 3 MB of Gutenberg instead of all of it: the sweep is composed and run as written
            args += ["data.corpus.source.max_bytes=3000000"]
        proc = run_cli(*args, cwd=workdir, cache=tmp_path / "cache")
        if args[0] == "train" and "--cfg" not in args and "-m" not in args:
            assert "final validation (" in proc.stdout and "W&B run folder:" in proc.stdout, line
        if "arch_objective_grid" in args:
            assert "0 failed; 66 incompatible pairs skipped" in proc.stdout and "  family " in proc.stdout
        if args[0] == "evaluate":
            assert "bits-per-byte" in proc.stdout
        if args[0] == "score":
            assert "zero-shot accuracy" in proc.stdout and "majority-class baseline" in proc.stdout
        if args[0] == "quantize":
            assert "int8 model:" in proc.stdout
        if args[0] == "export":
            assert "max |logit difference|" in proc.stdout and (workdir / "hf_model" / "model.safetensors").is_file()
        if args[0] == "generate":
            assert proc.stdout.count("--- sample") == 2
