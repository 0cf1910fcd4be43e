"""Values Hydra's grammar cannot read unquoted: a multirun job folder's path (``=`` and ``,``) and non-ASCII text are
quoted for it; what still cannot be read is one ``error:`` line saying how to quote it; the checkpoint an error or
Ctrl-C leaves is named so that it passes back as ``ckpt_path=<it>`` as it is."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import run_in_process
from test_bad_inputs import _refused

from lm_lightning.config.overrides import _parse, quote_values

pytestmark = pytest.mark.bad_input  # every test here: a user's mistake ends in one error line


def test_a_job_folder_path_and_non_ascii_text_pass_unquoted(tmp_path, corpus_cache, tiny_checkpoint):
    job = tmp_path / "multiruns" / "t" / "0_model.n_layer=1,trainer.max_steps=3" / "checkpoints"
    job.mkdir(parents=True)
    for path in tiny_checkpoint.parent.glob("last.ckpt*"):  # the checkpoint and its .sha256 sidecar
        shutil.copyfile(path, job / path.name)
    proc = run_in_process("generate", f"ckpt_path={job / 'last.ckpt'}", "prompt=Été 日本", "max_new_tokens=2",
                          f"hydra.run.dir={tmp_path / 'gen'}", cwd=tmp_path, cache=corpus_cache)
    assert "--- sample 1 ---" in proc.stdout
    assert "Été 日本" in proc.stdout


def test_a_sweep_and_plain_values_stay_as_typed():
    args = ["-m", "model.n_layer=1,2", "sample.prompt=abc", "--cfg", "job", "+x=y", "trainer.max_steps=3"]
    assert quote_values(args) == args
    assert quote_values(["sample.prompt=Été"]) == ["sample.prompt='Été'"]


def test_a_path_that_cannot_be_read_says_how_to_quote_it(tmp_path, corpus_cache):
    line = _refused("generate", f"ckpt_path={tmp_path}/no=such/last.ckpt", f"hydra.run.dir={tmp_path / 'gen'}",
                    cwd=tmp_path, cache=corpus_cache, says="quote the value")
    assert f"""'ckpt_path="{tmp_path}/no=such/last.ckpt"'""" in line
    assert not (tmp_path / "gen").exists()


def test_an_empty_argument_is_one_line(tmp_path, corpus_cache):
    _refused("train", "", cwd=tmp_path, cache=corpus_cache, unchanged=(corpus_cache,), says="an empty argument")
    _refused("train", "experiment=tiny", "", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, cache=corpus_cache,
             says="an empty argument")
    assert not (tmp_path / "run").exists()


def test_the_checkpoint_an_interruption_leaves_passes_back_unquoted(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from lm_lightning.config.app import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=tiny", f"paths.output_dir={tmp_path}"],
                      return_hydra_config=False)
    callback = instantiate(cfg.callbacks.last_checkpoint)
    assert callback.save_on_exception
    written = callback.format_checkpoint_name({"epoch": torch.tensor(0), "step": torch.tensor(12)})
    assert written == str(tmp_path / "checkpoints" / "interrupted-step12.ckpt")
    args = [f"ckpt_path={written}"]
    assert _parse("train", args) == (None, args)  # parses as typed: one value, no sweep
    in_job = tmp_path / "multiruns" / "0_model.n_layer=1,trainer.max_steps=3" / "interrupted-step12.ckpt"
    in_job.parent.mkdir(parents=True)
    in_job.touch()
    assert _parse("train", quote_values([f"ckpt_path={in_job}"])) == (None, [f"ckpt_path='{in_job}'"])
