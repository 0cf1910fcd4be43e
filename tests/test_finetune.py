"""Classification fine-tuning: pooling ignores padding, the command trains a head on SST-2 and reports
dev accuracy beside the majority class, and an architecture without features is refused clearly."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from helpers import run_in_process
from lm_lightning.adaptation.classification import ClassificationTask, SequenceClassifier
from lm_lightning.errors import UserError
from lm_lightning.training.checkpoint_io import load_checkpoint_file
from test_zoo import build, model_config

V = 40


@pytest.mark.parametrize("name", ["gpt", "prefix_lm", "bert"])
def test_the_pooled_class_logits_do_not_depend_on_padding(name):
    classifier = SequenceClassifier(build(name, V + 106), n_classes=3).eval()
    ids = torch.randint(4, V, (2, 7))
    padded = torch.cat([ids, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    lengths = torch.tensor([7, 7])
    torch.testing.assert_close(classifier(padded, lengths), classifier(ids, lengths), atol=1e-5, rtol=0)
    if name == "bert":
        return  # bidirectional: every real token informs every position, so there is no shorter prefix to compare
    shorter = classifier(ids, torch.tensor([4, 7]))  # causal: the first row pools its 4th token, which saw 4 tokens
    torch.testing.assert_close(shorter[0], classifier(ids[:1, :4], torch.tensor([4]))[0], atol=1e-5, rtol=0)


def test_the_auxiliary_language_model_loss_is_the_next_token_loss_of_the_real_tokens():
    """GPT-1's fine-tuning objective: ``with_lm_loss`` gives the same class logits as ``forward`` and the
    mean next-token cross-entropy over real tokens only, computed here one unpadded sequence at a time."""
    torch.manual_seed(0)
    classifier = SequenceClassifier(build("gpt", V + 106), n_classes=2, pool="mean").eval()
    ids = torch.randint(4, V, (2, 9))
    lengths = torch.tensor([9, 5])
    logits, lm_loss = classifier.with_lm_loss(ids, lengths)
    torch.testing.assert_close(logits, classifier(ids, lengths), atol=1e-6, rtol=0)
    backbone = classifier.backbone
    by_hand = sum(F.cross_entropy(backbone(ids[b : b + 1, :n])[0, :-1], ids[b, 1:n], reduction="sum")
                  for b, n in enumerate(lengths.tolist())) / (8 + 4)
    torch.testing.assert_close(lm_loss, by_hand, atol=1e-5, rtol=0)
    padded = ids.clone()
    padded[1, 5:] = 0  # what follows a sequence's end is not scored
    torch.testing.assert_close(classifier.with_lm_loss(padded, lengths)[1], lm_loss, atol=1e-6, rtol=0)
    with pytest.raises(UserError, match="task.lm_weight needs a left-to-right language model"):
        ClassificationTask({**model_config("bert"), "vocab_size": V + 106}, n_classes=2, lm_weight=0.5)


def test_a_model_without_features_cannot_take_a_classification_head():
    with pytest.raises(UserError, match="cannot take a classification head"):
        SequenceClassifier(build("t5", V + 106), n_classes=2)


def test_finetune_command_trains_a_head_and_reports_dev_accuracy(tmp_path, tiny_checkpoint, corpus_cache):
    ckpt = tiny_checkpoint
    ft_dir = tmp_path / "ft"
    proc = run_in_process("finetune", f"ckpt_path={ckpt}", "task.max_train_examples=256", "trainer.max_steps=12",
                          "trainer.val_check_interval=12", "warmup_steps=2", "backbone_dropout=0.1",
                          "task.lm_weight=0.5", "ema.decay=0.9", "logger=csv", f"hydra.run.dir={ft_dir}", cwd=tmp_path,
                          cache=tmp_path / "cache")
    assert "dev accuracy" in proc.stdout and "majority class 0.5092" in proc.stdout
    assert "trainable parameters" in proc.stdout  # as the README's finetune lines show
    record = json.loads((ft_dir / "run.json").read_text())
    assert record["steps"] == 12 and 0.0 <= record["final"]["val/accuracy"] <= 1.0
    assert record["parameters"]["trainable"] == record["parameters"]["total"]
    finetuned = load_checkpoint_file(ft_dir / "checkpoints" / "finetuned.ckpt")
    assert finetuned["hyper_parameters"]["model"]["dropout"] == 0.1  # backbone_dropout replaced the checkpoint's 0.0
    assert finetuned["hyper_parameters"]["lm_weight"] == 0.5
    assert any("StartedEMA" in key for key in finetuned["callbacks"])
    assert "averaging_state" in finetuned  # ema.decay saved the average
    for method in ("lora", "adapter", "prompt"):
        out = tmp_path / method
        run_in_process("finetune", f"ckpt_path={ckpt}", "task.max_train_examples=128", "trainer.max_steps=4",
                       "trainer.val_check_interval=4", "warmup_steps=1", "logger=csv", f"peft={method}",
                       *(["peft.targets=[wte,c_attn,attn.c_proj,c_fc]"] if method == "lora" else []),
                       f"hydra.run.dir={out}", cwd=tmp_path, cache=tmp_path / "cache")
        params = json.loads((out / "run.json").read_text())["parameters"]
        assert params["trainable"] < 0.2 * params["total"], method  # the tiny model: head + method's parameters only
    adapter, full = tmp_path / "lora" / "checkpoints" / "lora_adapter.pt", tmp_path / "lora" / "checkpoints" / "finetuned.ckpt"
    assert adapter.stat().st_size < 0.5 * full.stat().st_size
    saved = load_checkpoint_file(adapter)  # verified against its SHA-256, read with weights_only=True
    assert saved["lora"] and saved["pretrained"] == str(ckpt) and saved["peft"]["rank"] == 8
    data = bytearray(adapter.read_bytes())
    data[len(data) // 2] ^= 1
    adapter.write_bytes(bytes(data))
    with pytest.raises(UserError, match="SHA-256"):
        load_checkpoint_file(adapter)
    no_layer = run_in_process("finetune", f"ckpt_path={ckpt}", "peft=lora", "peft.targets=[q_proj]", "logger=csv",
                              f"hydra.run.dir={tmp_path / 'nolayer'}", cwd=tmp_path, cache=tmp_path / "cache",
                              check=False)
    assert no_layer.returncode == 2 and "q_proj" in no_layer.stderr.strip().splitlines()[-1]
    t5_dir = tmp_path / "t5"
    run_in_process("train", "experiment=t5", "trainer.max_steps=2", "scheduler.warmup_steps=1", "logger=csv",
                   "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "sample.max_new_tokens=0",
                   f"hydra.run.dir={t5_dir}", cwd=tmp_path, cache=corpus_cache)
    bad = run_in_process("finetune", f"ckpt_path={t5_dir / 'checkpoints' / 'last.ckpt'}", "task.max_train_examples=64",
                         "logger=csv", f"hydra.run.dir={tmp_path / 'bad'}", cwd=tmp_path, cache=tmp_path / "cache",
                         check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: a t5 checkpoint cannot be fine-tuned for task=classification")


@pytest.mark.slow
def test_sst2_adaptation_benchmark_runs_the_ready_experiments_and_tabulates_their_records(tmp_path, tiny_checkpoint):
    """The benchmark script starts an lm-lightning process per run (two at a time)."""
    import subprocess
    import sys

    from helpers import REPO, cli_env

    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "sst2_adaptation.py"),
                           "--ckpt", str(tiny_checkpoint), "--out", str(out),
                           "--runs", "full,scratch,lora", "--jobs", "2", "task.max_train_examples=64",
                           "trainer.max_steps=3", "trainer.val_check_interval=3", "warmup_steps=1", "logger=csv"],
                          env=cli_env(tmp_path / "cache"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {line.split("|")[1].strip(): line for line in (out / "summary.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| run")}
    assert sorted(rows) == ["full", "lora", "scratch"]
    for label, line in rows.items():
        record = json.loads((out / label / "run.json").read_text())
        assert f"| {record['final']['val/accuracy']:.4f} |" in line
        assert f"| {record['parameters']['trainable']:,} |" in line
    inits = {label: json.loads((out / label / "run.json").read_text())["init"] for label in rows}
    assert inits == {"full": "pretrained", "scratch": "scratch", "lora": "pretrained"}
    assert json.loads((out / "lora" / "run.json").read_text())["peft"] == "lora"
    assert "MB (" in rows["lora"] and rows["full"].rstrip().split("|")[-3].strip() == "-"  # only LoRA saves an adapter
    assert "points over scratch" in proc.stdout and "points from full fine-tuning" in proc.stdout


def _boring_run(tmp_path, *callbacks):
    """6 steps of Lightning's BoringModel, validated every 2; its validation losses and final weights."""
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    class Recorded(BoringModel):
        def on_validation_epoch_start(self):
            self.val_losses.append(0.0)

        def validation_step(self, batch, batch_idx):
            loss = self.step(batch)
            self.val_losses[-1] += float(loss)
            return loss

    torch.manual_seed(0)
    model = Recorded()
    model.val_losses = []
    L.Trainer(max_steps=6, val_check_interval=2, limit_val_batches=2, num_sanity_val_steps=0, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              callbacks=list(callbacks), default_root_dir=tmp_path).fit(model)
    return model.val_losses, [p.detach().clone() for p in model.parameters()]


def test_ema_stands_in_for_the_weights_only_once_it_has_started(tmp_path):
    from lm_lightning.training.ema import StartedEMA

    plain_losses, plain_weights = _boring_run(tmp_path)
    # never started (start step beyond the run): validation and the final weights are the live ones
    late_losses, late_weights = _boring_run(tmp_path, StartedEMA(decay=0.5, update_starting_at_step=100))
    assert late_losses == plain_losses
    for late, plain in zip(late_weights, plain_weights):
        torch.testing.assert_close(late, plain, atol=0, rtol=0)
    # started at step 2: the first validation is the live weights, the later ones and the end are averaged
    ema_losses, ema_weights = _boring_run(tmp_path, StartedEMA(decay=0.5, update_starting_at_step=2))
    assert ema_losses[0] == plain_losses[0] and ema_losses[1:] != plain_losses[1:]
    assert not torch.equal(ema_weights[0], plain_weights[0])
