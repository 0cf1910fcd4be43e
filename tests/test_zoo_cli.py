"""Every ready experiment composes and runs one batch through its own command, a command refuses another
command's experiment, and the command line refuses incompatible pairs. The commands run in this process."""

from __future__ import annotations

import json

import pytest
from helpers import REPO, SHARED_DATA, command_of_experiment, run_in_process
from lm_lightning.config.overrides import check_overrides
from lm_lightning.models.capabilities import grid

EXPERIMENT_DIR = REPO / "lm_lightning" / "conf" / "experiment"
ALL_EXPERIMENTS = sorted(p.stem for p in EXPERIMENT_DIR.glob("*.yaml"))
GUTENBERG = [e for e in ALL_EXPERIMENTS if "override /data: gutenberg" in (EXPERIMENT_DIR / f"{e}.yaml").read_text()]
# the training experiments that run from the default config alone, on Tiny Shakespeare, as one multirun; the
# others (of other commands, from a checkpoint, on Gutenberg) each run one batch in the test after it
EXPERIMENTS = [e for e in ALL_EXPERIMENTS if command_of_experiment(e) == "train"
               and e not in ("continued_pretraining", "zaremba_small") and e not in GUTENBERG]
ONE_BATCH = ["trainer.max_steps=1", "scheduler.warmup_steps=0", "trainer.val_check_interval=1",
             "trainer.limit_val_batches=1", "data.batch_size=2", "data.val_batch_size=2", "sample.max_new_tokens=4",
             "logger=csv", "callbacks.last_checkpoint.every_n_train_steps=1"]
GUTENBERG_SLICE = "data.corpus.source.max_bytes=300000"  # the first 300 kB: a second to prepare (all of it: minutes)


def test_every_experiment_composes_and_runs_one_batch(tmp_path, corpus_cache):
    """One multirun over the Tiny Shakespeare training experiments: a config that stops composing fails here."""
    assert {"gpt", "bert", "t5", "bart", "prefix_lm", "ul2", "lstm", "gru", "ffn", "moe_gpt"} <= set(EXPERIMENTS)
    proc = run_in_process("train", "-m", f"experiment={','.join(EXPERIMENTS)}", *ONE_BATCH,
                          f"paths.log_dir={tmp_path / 'logs'}", cwd=tmp_path, cache=corpus_cache)
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


# The other experiments, one batch each through the command they name. Those of finetune, align and score
# adapt any GPT: they take the session's tiny checkpoint (their own data, tokenized with its tokenizer).
# distill, quant_ptq and quant_qat need a checkpoint of their own corpus and tokenizer (Gutenberg, a 1024-piece
# BPE): gutenberg_small's one-batch run, on the same 300 kB slice, is their teacher and their model.
SMALL_STEP = ["trainer.max_steps=1", "trainer.val_check_interval=1", "trainer.limit_val_batches=1", "logger=csv"]
FINETUNE = [*SMALL_STEP, "warmup_steps=0", "batch_size=2", "task.max_train_examples=8"]
ALIGN = [*SMALL_STEP, "scheduler.warmup_steps=0", "data.max_train_pairs=4", "data.batch_size=2",
         "data.val_batch_size=2", "data.max_prompt_tokens=16"]
QUANTIZE = [GUTENBERG_SLICE, "max_val_batches=1", "speed.repeats=1", "speed.batch_size=1", "speed.new_tokens=2",
            "logger=csv"]
ONE_BATCH_ARGS = {
    "continued_pretraining": [*ONE_BATCH, "init_from={tiny}"],
    "gutenberg_bpe8k": [*ONE_BATCH, GUTENBERG_SLICE],
    "gutenberg_small": [*ONE_BATCH, GUTENBERG_SLICE],
    "speedrun_gutenberg": [*ONE_BATCH, GUTENBERG_SLICE],
    "distill": [*ONE_BATCH, GUTENBERG_SLICE, "teacher_ckpt={gutenberg_small}"],
    "quant_ptq": [*QUANTIZE, "ckpt_path={gutenberg_small}"],
    "quant_qat": [*QUANTIZE, "trainer.max_steps=1", "scheduler.warmup_steps=0", "data.batch_size=2",
                  "ckpt_path={gutenberg_small}"],
    **{name: [*FINETUNE, "ckpt_path={tiny}"] for name in ("sst2_adapter", "sst2_head", "sst2_lora", "sst2_prompt")},
    "alpaca_sft": [*FINETUNE, "task.val_examples=2", "task.heldout_instructions=1", "task.generation.max_new_tokens=2",
                   "ckpt_path={tiny}"],
    **{name: [*ALIGN, "ckpt_path={tiny}"] for name in ("dpo", "kto", "reward_model")},
    "ppo": ["ppo.updates=1", "ppo.batch_size=2", "ppo.minibatch_size=2", "ppo.epochs=1", "ppo.max_new_tokens=2",
            "logger=csv", "ckpt_path={tiny}"],
    "zero_shot_sst2": ["max_examples=4", "ckpt_path={tiny}"],
    # a word-level corpus given by path; its step-decay schedule has no warm-up
    "zaremba_small": [*SMALL_STEP, "data.batch_size=2", "data.val_batch_size=2", "sample.max_new_tokens=4",
                      "callbacks.last_checkpoint.every_n_train_steps=1", "data.corpus.source.max_bytes=50000",
                      f"data.corpus.source.path={SHARED_DATA / 'wikitext-2' / 'valid.txt'}"],
}


@pytest.fixture(scope="module")
def gutenberg_small(tmp_path_factory) -> dict:
    """gutenberg_small's one-batch run: its output folder and the corpus cache of its Gutenberg slice."""
    root = tmp_path_factory.mktemp("gutenberg_small")
    proc = run_in_process("train", "experiment=gutenberg_small", *ONE_BATCH_ARGS["gutenberg_small"],
                          f"hydra.run.dir={root / 'run'}", cwd=root, cache=root / "cache")
    return {"run": root / "run", "cache": root / "cache", "stdout": proc.stdout}


def test_every_experiment_is_run_by_one_of_these_tests():
    assert sorted([*EXPERIMENTS, *ONE_BATCH_ARGS]) == ALL_EXPERIMENTS


@pytest.mark.parametrize("name", sorted(ONE_BATCH_ARGS))
def test_every_other_experiment_runs_one_batch_through_its_own_command(name, tmp_path, tiny_checkpoint, request):
    command = command_of_experiment(name)
    needs_gutenberg = any("{gutenberg_small}" in arg for arg in ONE_BATCH_ARGS[name])
    if name == "gutenberg_small":
        pretrained = request.getfixturevalue("gutenberg_small")
        out, cache, stdout = pretrained["run"], pretrained["cache"], pretrained["stdout"]
    else:
        cache = request.getfixturevalue("gutenberg_small")["cache"] if needs_gutenberg else tmp_path / "cache"
        gutenberg_ckpt = (request.getfixturevalue("gutenberg_small")["run"] / "checkpoints" / "last.ckpt"
                          if needs_gutenberg else None)
        args = [arg.format(tiny=tiny_checkpoint, gutenberg_small=gutenberg_ckpt) for arg in ONE_BATCH_ARGS[name]]
        out = tmp_path / "run"
        stdout = run_in_process(*command.split(), f"experiment={name}", *args, f"hydra.run.dir={out}", cwd=tmp_path,
                                cache=cache).stdout
    if command == "score":  # writes no run folder: one line of results
        assert "4 examples | zero-shot accuracy" in stdout.strip().splitlines()[-1]
        return
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["experiment_name"] == name and record["config"]["command"] == command
    if command == "quantize":
        assert record["method"] == {"quant_ptq": "ptq_dynamic", "quant_qat": "qat"}[name]
        assert record["results"]["fp32"]["val"]["val/loss"] > 0
    elif name == "ppo":
        assert record["updates"] == 1
    else:
        assert record["steps"] == 1


@pytest.mark.bad_input
@pytest.mark.parametrize("command, experiments, refused, owner", [
    ("train", "sst2_head", "sst2_head", "finetune"),
    ("train", "dpo", "dpo", "align"),  # trained a plain GPT and ignored the method before
    ("finetune", "sst2_head,dpo", "dpo", "align"),  # every job of a sweep
    ("align", "tiny", "tiny", "train"),
    ("score", "quant_ptq", "quant_ptq", "quantize"),
])
def test_an_experiment_of_another_command_is_refused_in_one_line_before_anything_runs(tmp_path, command, experiments,
                                                                                    refused, owner):
    proc = run_in_process(command, *(["-m"] if "," in experiments else []), f"experiment={experiments}",
                          "ckpt_path=model.ckpt", f"paths.log_dir={tmp_path / 'logs'}", cwd=tmp_path,
                          cache=tmp_path / "cache", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: experiment={refused} is for lm-lightning {owner}: run lm-lightning {owner} experiment={refused}"]
    assert not (tmp_path / "logs").exists()


def test_commands_built_on_trains_config_share_its_experiments():
    """distill and scaling plan compose train's config: train's experiments are theirs, and distill's is train's
    (the README trains the distillation student alone: `lm-lightning train experiment=distill`)."""
    assert check_overrides("distill", ["experiment=tiny", "teacher_ckpt=teacher.ckpt"]) is None
    assert check_overrides("scaling_plan", ["experiment=gutenberg_small"]) is None
    assert check_overrides("train", ["experiment=distill"]) is None
    assert check_overrides("distill", ["experiment=sst2_lora", "teacher_ckpt=teacher.ckpt"]) == (
        "experiment=sst2_lora is for lm-lightning finetune: run lm-lightning finetune experiment=sst2_lora")


@pytest.mark.slow
def test_the_readme_grid_trains_every_valid_pair_and_skips_the_rest(tmp_path, corpus_cache):
    """The README's grid line as written (every conf/model/ config with every conf/objective/ config), one step
    a pair: the summary counts every valid pair trained and every other pair skipped, and the table has a row
    for each trained pair (slow: twenty-odd jobs)."""
    proc = run_in_process("train", "-m", "--config-dir", str(REPO / "sweeps"), "--config-name", "arch_objective_grid",
                          "trainer.max_steps=1", "scheduler.warmup_steps=0", "trainer.val_check_interval=1",
                          "trainer.limit_val_batches=1", "data.batch_size=2", "data.val_batch_size=2", "logger=csv",
                          f"paths.log_dir={tmp_path / 'logs'}", cwd=tmp_path, cache=corpus_cache)
    cells = [trains for _, _, trains in grid()]  # every model config with every objective config
    n, skipped = cells.count(True), cells.count(False)
    assert f"sweep summary: {n} of {n} jobs finished, 0 failed; {skipped} incompatible pairs skipped" in proc.stdout
    table = proc.stdout[proc.stdout.index("  family "):].splitlines()  # one row a trained pair
    assert table[0].split() == ["family", "objective", "params", "loss@0", "val", "loss", "ppl", "bpb", "seconds"]
    rows = {tuple(line.split()[:-6]): line.split()[-6:] for line in table[1 : n + 1]}
    assert len(rows) == n and {("gpt", "causal_lm"), ("bert", "mlm"), ("bidirectional", "lstm", "mlm")} <= set(rows)
    assert rows[("gpt", "causal_lm")][4] != "-" and rows[("bert", "mlm")][4] == "-"  # bpb: causal and prefix LM only


@pytest.mark.bad_input
def test_an_incompatible_pair_is_refused_when_composed_naming_the_valid_objectives(tmp_path):
    proc = run_in_process("train", "model=t5", "objective=mlm", f"paths.log_dir={tmp_path / 'logs'}", cwd=tmp_path,
                          cache=tmp_path / "cache", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: objective=mlm cannot train model family t5: valid objectives for t5 are "
        "span_corruption, bart_denoising, ul2")
    assert not (tmp_path / "logs").exists()  # refused before anything was written
