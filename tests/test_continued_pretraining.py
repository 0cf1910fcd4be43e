"""Continued pretraining (``init_from``): the run takes the checkpoint's architecture, tokenizer and
weights, tokenizes the new corpus with that tokenizer, and learns on from there."""

from __future__ import annotations

import json

import torch

from helpers import SHARED_DATA, run_in_process
from lm_lightning.training.loading import load_trained


def test_continued_pretraining_starts_from_the_checkpoint_on_a_new_corpus(tmp_path, tiny_checkpoint):
    cache = tmp_path / "cache"  # the new corpus, tokenized with the checkpoint's tokenizer
    ckpt = tiny_checkpoint
    corpus = tmp_path / "new.txt"  # another corpus: the first 60 kB of WikiText-2 validation text
    corpus.write_text((SHARED_DATA / "wikitext-2" / "valid.txt").read_text()[:60000])
    common = ["experiment=continued_pretraining", f"init_from={ckpt}", "data=text", f"data.corpus.source.path={corpus}",
              "data.batch_size=4", "trainer.max_steps=3", "scheduler.warmup_steps=1", "trainer.val_check_interval=3",
              "trainer.limit_val_batches=2", "sample.max_new_tokens=0", "logger=csv"]
    frozen = tmp_path / "frozen"  # a vanishing learning rate: the weights must come out as they went in
    proc = run_in_process("train", *common, "optimizer.lr=1e-12", f"hydra.run.dir={frozen}", cwd=tmp_path, cache=cache)
    assert f"continued from {ckpt}" in proc.stdout
    before, tokenizer = load_trained(str(ckpt))
    after, new_tokenizer = load_trained(str(frozen / "checkpoints" / "last.ckpt"))
    assert after.tokenizer_model == before.tokenizer_model  # the checkpoint's tokenizer, not a new one
    assert after.hparams.model == before.hparams.model  # the tiny experiment's 2 x 32 GPT, not the default model
    for name, value in before.model.state_dict().items():
        torch.testing.assert_close(after.model.state_dict()[name], value, msg=name)

    moving = tmp_path / "moving"
    run_in_process("train", *common, f"hydra.run.dir={moving}", cwd=tmp_path, cache=cache)
    moved, _ = load_trained(str(moving / "checkpoints" / "last.ckpt"))
    assert not torch.equal(moved.model.wte.weight, before.model.wte.weight)
    record = json.loads((moving / "run.json").read_text())
    assert record["steps"] == 3 and record["config"]["init_from"] == str(ckpt)

    wrong = run_in_process("train", *common, "objective=mlm", f"hydra.run.dir={tmp_path / 'wrong'}", cwd=tmp_path,
                           cache=cache, check=False)
    assert wrong.returncode == 2
    assert wrong.stderr.strip().splitlines()[-1].startswith("error: objective=mlm cannot train model family gpt")
