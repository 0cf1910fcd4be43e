"""Bad inputs a user can type end in one ``error:`` line and exit status 2, with no traceback, before anything
already written (a run folder, the corpus cache) changes: numeric options of the wrong type, generation options out
of range, a binary evaluation file, a checkpoint of another model or none at all, and advice that composes."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from helpers import run_in_process

from lm_lightning.errors import UserError

pytestmark = pytest.mark.bad_input  # every test here: a user's mistake ends in one error line


def _hashes(*folders: Path) -> dict[str, str]:
    """Every file under ``folders`` by its content's SHA-256 (what a refused command must leave as it was). Skips
    ``.tmp-*`` folders: corpora that other test workers are preparing in the shared session cache meanwhile."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".tmp-") for part in p.relative_to(folder).parts)}


def _refused(*args: str, cwd: Path, cache: Path, unchanged: tuple[Path, ...] = (), says: str = "") -> str:
    """Runs ``lm-lightning <args>``; asserts exit 2, one ``error:`` line (containing ``says``), no traceback, and
    the files under ``unchanged`` byte-identical afterwards. Returns the error line."""
    before = _hashes(*unchanged)
    proc = run_in_process(*args, cwd=cwd, cache=cache, check=False)
    output = proc.stdout + proc.stderr
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, output[-3000:]
    assert len(errors) == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert says in errors[0], errors[0]
    after = _hashes(*unchanged)  # what was there is as it was (other workers may add corpora to the shared cache)
    assert {path: after.get(path) for path in before} == before
    return errors[0]


@pytest.mark.parametrize("override, message", [
    ("trainer.max_steps=abc", "trainer.max_steps must be an integer, got 'abc'"),
    ("optimizer.lr=abc", "optimizer.lr must be a number, got 'abc'"),
    ("trainer.gradient_clip_val=high", "trainer.gradient_clip_val must be a number, got 'high'"),
    ("data.batch_size=1.5", "data.batch_size must be an integer, got 1.5"),
    ("scheduler.warmup_steps=ten", "scheduler.warmup_steps must be an integer, got 'ten'"),
    ("model.n_layer=two", "model.n_layer must be an integer, got 'two'"),
    ("model.dropout=none", "model.dropout must be a number, got 'none'"),
    ("sample.temperature=-1", "sample.temperature=-1 is out of range"),
    ("sample.top_p=1.5", "sample.top_p=1.5 is out of range"),
    ("logger.wandb.mode=bogus", "logger.wandb.mode=bogus is not a W&B mode: choose one of auto, online, offline"),
])
def test_a_numeric_option_of_the_wrong_type_is_named_before_the_run_folder(tmp_path, corpus_cache, override, message):
    run = tmp_path / "run"
    _refused("train", "experiment=tiny", override, f"hydra.run.dir={run}", cwd=tmp_path, cache=corpus_cache,
             unchanged=(corpus_cache,), says=message)
    assert not run.exists()


@pytest.mark.parametrize("override, message", [
    ("trainer.val_check_interval=0", "trainer.val_check_interval=0 is out of range"),
    ("trainer.val_check_interval=0.5", "is a fraction of an epoch, but validation here counts steps"),
    ("trainer.limit_val_batches=-1", "trainer.limit_val_batches=-1 is out of range"),
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val=-1 is out of range"),  # would flip the gradients
    ("data.num_workers=-1", "data.num_workers=-1 is out of range"),
    ("data.val_batch_size=-2", "data.val_batch_size=-2 is out of range"),
    ("num_threads=-1", "num_threads=-1 is out of range"),
    ("optimizer.betas=[0.9]", "optimizer.betas=[0.9] must be two numbers in [0, 1)"),
    ("optimizer.weight_decay=-0.1", "optimizer.weight_decay=-0.1 is out of range"),
    ("scheduler.min_lr_ratio=2", "scheduler.min_lr_ratio=2 is out of range"),  # the decay would be a rise
    ("callbacks.last_checkpoint.every_n_train_steps=-1", "every_n_train_steps=-1 must be a whole number >= 0"),
    ("model.rope_base=0", "model.rope_base=0 must be a positive number"),  # NaN from the first step
    ("model.mlp_ratio=0", "model.mlp_ratio=0 must be a positive number"),
])
def test_a_value_out_of_its_range_is_named_before_the_run_folder(tmp_path, corpus_cache, override, message):
    """Values of the right type that Lightning, torch or the DataLoader would refuse deep in the run (a traceback) or,
    worse, accept: each named with the range it must be in, before the run folder exists."""
    run = tmp_path / "run"
    _refused("train", "experiment=tiny", "model.position=rope", override, f"hydra.run.dir={run}", cwd=tmp_path,
             cache=corpus_cache, unchanged=(corpus_cache,), says=message)
    assert not run.exists()


@pytest.mark.parametrize("command, override, message", [
    ("scaling plan", "scaling.compute_budget=abc", "scaling.compute_budget='abc' must be training FLOPs, a number > 0"),
    ("scaling plan", "scaling.tokens_per_param=0", "scaling.tokens_per_param=0 is out of range"),
    ("train", "scaling.aspect_ratio=-2", "scaling.aspect_ratio=-2 is out of range"),
])
def test_scaling_options_out_of_range_are_named(tmp_path, corpus_cache, command, override, message):
    run = tmp_path / "run"  # scaling plan writes nothing anywhere (its run folder is ".")
    where = ["experiment=tiny", f"hydra.run.dir={run}"] if command == "train" else ["scaling.compute_budget=1e13"]
    _refused(*command.split(), *where, "scaling.aspect_ratio=32", override, cwd=tmp_path, cache=corpus_cache,
             unchanged=(corpus_cache,), says=message)
    assert not run.exists()


def test_muon_momentum_out_of_range_is_named_before_the_run_folder(tmp_path, corpus_cache):
    run = tmp_path / "run"
    _refused("train", "experiment=tiny", "optimizer=muon", "optimizer.momentum=2", f"hydra.run.dir={run}", cwd=tmp_path,
             cache=corpus_cache, unchanged=(corpus_cache,), says="optimizer.momentum=2 is out of range")
    assert not run.exists()


def test_wandb_online_without_a_key_is_named_before_the_run_folder(tmp_path, corpus_cache, monkeypatch):
    monkeypatch.setattr("lm_lightning.tracking.wandb.wandb_credentials_present", lambda: False)
    run = tmp_path / "run"
    _refused("train", "experiment=tiny", "logger.wandb.mode=online", f"hydra.run.dir={run}", cwd=tmp_path,
             cache=corpus_cache, unchanged=(corpus_cache,), says="no W&B key was found: run `wandb login`")
    assert not run.exists()


@pytest.mark.parametrize("override, name", [
    ("temperature=-1", "temperature"), ("top_p=2", "top_p"), ("top_p=0", "top_p"), ("max_new_tokens=-5", "max_new_tokens"),
    ("num_samples=0", "num_samples"), ("beam_width=0", "beam_width"), ("top_k=-3", "top_k"), ("temperature=hot", "temperature"),
])
def test_generation_options_out_of_range_are_refused(tmp_path, corpus_cache, tiny_checkpoint, override, name):
    short = [] if "max_new" in override else ["max_new_tokens=2"]
    line = _refused("generate", f"ckpt_path={tiny_checkpoint}", *short, override,
                    f"hydra.run.dir={tmp_path / 'gen'}", cwd=tmp_path, cache=corpus_cache,
                    unchanged=(tiny_checkpoint.parent.parent,), says=f"{name}=")
    assert "must be" in line


def test_generation_at_the_edges_of_the_ranges_runs(tmp_path, corpus_cache, tiny_checkpoint):
    proc = run_in_process("generate", f"ckpt_path={tiny_checkpoint}", "temperature=0", "top_p=1", "max_new_tokens=0",
                          f"hydra.run.dir={tmp_path / 'gen'}", cwd=tmp_path, cache=corpus_cache)
    assert "--- sample 1 ---" in proc.stdout


def test_evaluating_a_binary_file_is_one_line(tmp_path, corpus_cache, tiny_checkpoint):
    binary = tmp_path / "ls"
    shutil.copyfile("/bin/ls", binary)
    _refused("evaluate", f"ckpt_path={tiny_checkpoint}", f"text_file={binary}", f"hydra.run.dir={tmp_path / 'ev'}",
             cwd=tmp_path, cache=corpus_cache, unchanged=(tiny_checkpoint.parent.parent,), says="not valid UTF-8")


def _saved_with(tmp_path: Path, checkpoint: Path, name: str, **model: object) -> Path:
    """A copy of ``checkpoint`` whose model hyper-parameters are changed by ``model`` (another family or size)."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    saved["hyper_parameters"]["model"].update(model)
    path = tmp_path / name
    torch.save(saved, path)
    return path


@pytest.mark.parametrize("overrides, says", [
    (("model.n_layer=3",), "n_layer: 2 != 3"),
    (("model.n_embd=64", "model.n_head=4"), "n_head: 2 != 4; n_embd: 32 != 64"),
])
def test_resuming_another_model_size_names_the_options_that_differ(tmp_path, corpus_cache, tiny_checkpoint, overrides, says):
    run = tmp_path / "run"
    _refused("train", "experiment=tiny", f"ckpt_path={tiny_checkpoint}", *overrides, f"hydra.run.dir={run}",
             cwd=tmp_path, cache=corpus_cache, unchanged=(tiny_checkpoint.parent.parent, corpus_cache), says=says)
    assert not run.exists()


def test_resuming_another_model_family_says_so(tmp_path, corpus_cache, tiny_checkpoint):
    other = _saved_with(tmp_path, tiny_checkpoint, "lstm.ckpt", family="lstm")
    _refused("train", "experiment=tiny", f"ckpt_path={other}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
             cache=corpus_cache, unchanged=(corpus_cache,), says="family: lstm != gpt")


def test_resuming_in_the_same_run_folder_with_another_size_leaves_it_as_it_was(tmp_path, corpus_cache, tiny_run):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    _refused("train", "experiment=tiny", "ckpt_path=last", "model.n_layer=4", f"hydra.run.dir={run}", cwd=tmp_path,
             cache=corpus_cache, unchanged=(run, corpus_cache), says="n_layer: 2 != 4")


@pytest.mark.parametrize("option", ["ckpt_path", "init_from"])
@pytest.mark.parametrize("content, says", [
    ("plain", "is not a Lightning checkpoint"),
    ("text", ""),  # refused by the safe loader (checkpoint_io), in its own words
    ("empty", "is not a checkpoint this platform can read safely"),
])
def test_a_file_that_is_no_lightning_checkpoint_is_one_line(tmp_path, corpus_cache, option, content, says):
    path = tmp_path / "model.ckpt"
    if content == "plain":
        torch.save({"weight": torch.zeros(2)}, path)
    else:
        path.write_text("not a checkpoint\n" if content == "text" else "")
    run = tmp_path / "run"
    _refused("train", "experiment=tiny", f"{option}={path}", f"hydra.run.dir={run}", cwd=tmp_path, cache=corpus_cache,
             unchanged=(corpus_cache,), says=f"{option}={path} {says}".strip())
    assert not run.exists()


def test_a_checkpoint_of_a_family_the_objective_cannot_train_is_refused_for_init_from(tmp_path, corpus_cache, tiny_checkpoint):
    run = tmp_path / "run"
    _refused("train", "experiment=tiny", f"init_from={tiny_checkpoint}", "objective=mlm", "model=bert",
             f"hydra.run.dir={run}", cwd=tmp_path, cache=corpus_cache, unchanged=(corpus_cache,),
             says=f"objective=mlm cannot train model family gpt: valid objectives for gpt are causal_lm "
                  f"(init_from={tiny_checkpoint} holds a gpt model")
    assert not run.exists()


def test_the_bad_jsonl_advice_composes_and_works(tmp_path):
    import re

    corpus = tmp_path / "bad.jsonl"
    corpus.write_text("".join(f'{{"text": "document number {i} about the sea and the ships"}}\n' for i in range(40))
                      + "{not json\n")
    cache = tmp_path / "cache"
    args = ("prepare", "data=jsonl", f"data.corpus.source.path={corpus}", "tokenizer=char", "wandb_mode=disabled",
            "data.corpus.dedup.near=false")
    line = _refused(*args, f"hydra.run.dir={tmp_path / 'p1'}", cwd=tmp_path, cache=cache, says="line 41 is not valid JSON")
    advice = re.findall(r"set (\S+=\S+)", line)
    assert advice == ["++data.corpus.source.skip_bad_records=true"], line
    proc = run_in_process(*args, *advice, f"hydra.run.dir={tmp_path / 'p2'}", cwd=tmp_path, cache=cache)
    assert "prepared corpus:" in proc.stdout


def test_the_corpus_own_num_proc_is_the_default_of_prepare():
    from hydra import compose, initialize_config_dir

    from lm_lightning.config.app import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        assert compose(config_name="prepare", overrides=["data=gutenberg", "data.corpus.num_proc=1"]).num_proc == 1
        assert compose(config_name="prepare", overrides=["data=gutenberg", "num_proc=8"]).num_proc == 8
        assert compose(config_name="prepare", overrides=["data=tinyshakespeare"]).num_proc == 2


def test_a_text_of_lines_longer_than_sentencepiece_takes_still_trains_a_tokenizer(tmp_path):
    corpus = tmp_path / "long.txt"
    corpus.write_text("".join(f"{i} " + "the sea and the ships é " * 1500 + "\n" for i in range(4)))  # 37,500 bytes a line
    proc = run_in_process("prepare", "data=text", f"data.corpus.source.path={corpus}", "tokenizer=bpe",
                          "data.corpus.source.document_split=lines:1",
                          "tokenizer.vocab_size=290", "wandb_mode=disabled", f"hydra.run.dir={tmp_path / 'p'}",
                          cwd=tmp_path, cache=tmp_path / "cache")
    assert "prepared corpus:" in proc.stdout


@pytest.mark.parametrize("overrides, says", [
    (("model.parametrization=mup", "model.tie_embeddings=false", "optimizer=sgd"),
     "model.parametrization=mup scales learning rates for Adam-type optimizers (adamw, adam, muon), not torch.optim.SGD"),
    (("model.parametrization=mup",), "model.parametrization=mup needs model.tie_embeddings=false"),
])
def test_mup_with_what_it_cannot_scale_is_refused_before_the_run_folder(tmp_path, corpus_cache, overrides, says):
    run = tmp_path / "run"
    _refused("train", "experiment=tiny", *overrides, f"hydra.run.dir={run}", cwd=tmp_path, cache=corpus_cache,
             unchanged=(corpus_cache,), says=says)
    assert not run.exists()


def test_a_negative_training_row_limit_is_refused_not_sliced(tmp_path, corpus_cache, tiny_checkpoint):
    """``task.max_train_examples=-1`` sliced all but one row ([:-1]) and trained on them; it is a count or null."""
    _refused("finetune", f"ckpt_path={tiny_checkpoint}", "task.max_train_examples=-1", f"hydra.run.dir={tmp_path / 'ft'}",
             cwd=tmp_path, cache=corpus_cache, unchanged=(corpus_cache,), says="task.max_train_examples=-1 must be")


def test_a_config_file_that_is_not_yaml_is_one_line_with_its_place(tmp_path, corpus_cache):
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "broken.yaml").write_text("defaults:\n  - train\n  - _self_\nmodel: [unclosed\n")
    _refused("train", "--config-dir", str(configs), "--config-name", "broken", cwd=tmp_path, cache=corpus_cache,
             says=f"config file {configs / 'broken.yaml'} is not valid YAML: expected ',' or ']'")
    _refused("train", "--config-dir", str(tmp_path / "nowhere"), "--config-name", "broken", cwd=tmp_path,
             cache=corpus_cache, says="not found: pass --config-dir <an existing folder of configs>")


@pytest.mark.parametrize("where", ["hydra.run.dir", "hydra.sweep.dir"])
def test_an_output_folder_that_cannot_be_created_is_one_line(tmp_path, corpus_cache, where):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    _refused("train", *(["-m"] if "sweep" in where else []), "experiment=tiny", f"{where}={blocker / 'run'}",
             cwd=tmp_path, cache=corpus_cache, unchanged=(corpus_cache,),
             says=f"cannot create the output folder {blocker / 'run'}: Not a directory")
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("options, says", [
    ({"top_k": 2.5}, "sample.top_k=2.5 must be a whole number >= 0"),  # the wrong kind: no "out of range"
    ({"top_k": True}, "sample.top_k=True must be a whole number >= 0"),  # a bool is not a count
    ({"temperature": "hot"}, "sample.temperature='hot' must be a number >= 0"),
    ({"top_p": 0}, r"sample.top_p=0 is out of range: it must be a number in \(0, 1\]"),
], ids=["float-for-int", "bool", "string", "zero"])
def test_sampling_and_scaling_numbers_share_one_check_and_its_wording(options, says):
    from lm_lightning.generation.sampling import check_sampling_options
    from lm_lightning.scaling.budget import check_scaling_options

    with pytest.raises(UserError, match=f"^{says}"):
        check_sampling_options(options, "sample.")
    check_sampling_options({**options, **{k: None for k in options}}, "sample.")  # null: off
    with pytest.raises(UserError, match="^scaling.head_size=2.5 must be a whole number > 0"):
        check_scaling_options({"head_size": 2.5})
    with pytest.raises(UserError, match="^scaling.head_size=0 is out of range: it must be a whole number > 0"):
        check_scaling_options({"head_size": 0})
