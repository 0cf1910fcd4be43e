"""Recurrent training the paper's way (Zaremba et al. 2014) as a specification: contiguous streams cut into
lanes and read window after window, the hidden state carried across batches (exactly what one long forward
computes), reset at document starts when asked, saved in the checkpoint so a resume is exact across an
epoch boundary; stateful validation; the zaremba_small recipe, setting by setting."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import run_in_process, step_losses
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lm_lightning.config.app import CONF_DIR
from lm_lightning.data.prepared_corpus import PreparedCorpus
from lm_lightning.data.streams import StreamSampler, TokenStreams
from lm_lightning.models.recurrent import build_recurrent
from lm_lightning.training.loading import load_trained

# --- the streams ----------------------------------------------------------------------------


def test_lanes_are_contiguous_and_every_token_after_a_lanes_first_is_predicted_once():
    tokens = np.arange(103)
    streams = TokenStreams(tokens, lanes=4, block_size=5, full_windows=True)
    assert streams.lane_length == 25 and len(streams) == 4  # (25 - 1) // 5 windows; the 3-token tail dropped
    windows = [streams[i] for i in range(len(streams))]
    assert windows[0].tolist()[1] == [25, 26, 27, 28, 29, 30]  # lane 1 starts at 25, window of 5 + 1
    for before, after in itertools.pairwise(windows):
        assert torch.equal(before[:, -1], after[:, 0])  # the last target is the next window's first input
    targets = torch.cat([w[:, 1:] for w in windows], dim=1)
    assert torch.equal(targets, torch.arange(100).view(4, 25)[:, 1:21])  # full windows only, in order

    evaluation = TokenStreams(tokens, lanes=4, block_size=5, full_windows=False)
    assert len(evaluation) == 5 and evaluation[4].shape == (4, 5)  # the tail of each lane: 4 inputs
    scored = torch.cat([evaluation[i][:, 1:] for i in range(5)], dim=1)
    assert torch.equal(scored, torch.arange(100).view(4, 25)[:, 1:])


def test_ranks_read_interleaved_lanes_that_together_are_the_single_process_batch():
    tokens = np.arange(240)
    whole = TokenStreams(tokens, lanes=4, block_size=3)
    ranks = [TokenStreams(tokens, lanes=2, block_size=3, rank=r, world_size=2) for r in (0, 1)]
    for window in (0, 7):
        assert torch.equal(ranks[0][window], whole[window][0::2])
        assert torch.equal(ranks[1][window], whole[window][1::2])


def test_resets_mark_each_document_start_in_its_lane_and_window():
    starts = np.array([0, 7, 12, 31, 33])
    streams = TokenStreams(np.arange(40), lanes=2, block_size=4, document_starts=starts)  # lanes 0..19, 20..39
    masks = {w: streams.resets(w) for w in range(len(streams))}
    assert masks[0][0].tolist() == [True, False, False, False] and not masks[0][1].any()
    assert masks[1][0].tolist() == [False, False, False, True]  # 7 = lane 0, window 1 (4..7), input 3
    assert masks[3][0].tolist() == [True, False, False, False]  # 12
    assert masks[2][1].tolist() == [False, False, False, True]  # 31 = lane 1 position 11
    assert masks[3][1].tolist() == [False, True, False, False]  # 33
    assert TokenStreams(np.arange(40), 2, 4).resets(0) is None  # documents not asked for


def test_the_sampler_reads_in_order_and_skips_only_once_after_a_resume():
    sampler = StreamSampler(6)
    sampler.skip = 4
    assert list(sampler) == [4, 5] and list(sampler) == [0, 1, 2, 3, 4, 5] and len(sampler) == 6


# --- the carried state ----------------------------------------------------------------------


@pytest.mark.parametrize("family", ["lstm", "gru", "rnn"])
def test_windows_with_the_carried_state_equal_one_forward_over_the_whole_lane(family):
    torch.manual_seed(0)
    model = build_recurrent(family, vocab_size=17, block_size=4, n_layer=2, n_embd=8).eval()
    idx = torch.randint(0, 17, (3, 22))
    caches = model.new_caches(3, torch.empty(0))
    pieces = [model(idx[:, s:s + 4], caches) for s in range(0, 22, 4)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), model(idx), atol=1e-6, rtol=0)


def test_a_reset_reads_the_rest_of_that_lane_from_a_zero_state_and_leaves_the_others():
    torch.manual_seed(0)
    model = build_recurrent("lstm", vocab_size=17, block_size=8, n_layer=2, n_embd=8).eval()
    idx = torch.randint(0, 17, (2, 8))
    resets = torch.zeros(2, 8, dtype=torch.bool)
    resets[0, 5] = True
    logits = model(idx, model.new_caches(2, torch.empty(0)), resets=resets)
    torch.testing.assert_close(logits[0, 5:], model(idx[:1, 5:])[0], atol=1e-6, rtol=0)  # a fresh start at 5
    torch.testing.assert_close(logits[0, :5], model(idx[:1, :5])[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits[1], model(idx[1:])[0], atol=1e-6, rtol=0)  # lane 1 untouched


# --- training, resume and validation through `lm-lightning train` ---------------------------

# 2,000 characters of Tiny Shakespeare: 1,800 train in 4 lanes of 450, 28 windows of 16 per epoch
STREAMS = ["data=tinyshakespeare", "tokenizer=char", "model=lstm", "logger=csv", "trainer.log_every_n_steps=1", "sample.max_new_tokens=0",
           "data.corpus.source.max_bytes=2000", "model.n_embd=16", "model.n_layer=1", "model.block_size=16",
           "data.batch_size=4", "data.val_batch_size=1", "data.sampling=streams", "optimizer=sgd", "optimizer.lr=0.5",
           "scheduler=step_decay", "scheduler.scheduler.milestones=[1]", "trainer.val_check_interval=15",
           "trainer.limit_val_batches=1.0", "callbacks.last_checkpoint.every_n_train_steps=4", "num_threads=1"]
EPOCH = 28


def test_a_run_stopped_mid_epoch_and_at_an_epoch_end_resumes_with_the_uninterrupted_losses(tmp_path, corpus_cache):
    full, part = tmp_path / "full", tmp_path / "part"
    run_in_process("train", *STREAMS, "trainer.max_steps=40", f"hydra.run.dir={full}", cwd=tmp_path, cache=corpus_cache)
    for stop in (20, EPOCH, 40):  # mid-epoch 0; the end of epoch 0; on into epoch 1
        resume = ["ckpt_path=last"] if stop != 20 else []
        run_in_process("train", *STREAMS, f"trainer.max_steps={stop}", f"hydra.run.dir={part}", *resume,
                       cwd=tmp_path, cache=corpus_cache)
    reference, resumed = step_losses(full), step_losses(part)
    assert sorted(resumed) == sorted(reference) == list(range(40))
    for step in range(20, 40):
        assert abs(resumed[step] - reference[step]) <= 1e-5, (step, resumed[step], reference[step])

    # validation reads the whole val split as one stream, the state carried: a hand-written loop agrees
    record = json.loads((full / "run.json").read_text())
    model = load_trained(full / "checkpoints" / "last.ckpt")[0].model.eval()
    corpus_dir = Path(record["corpus_dir"])
    metadata = json.loads((corpus_dir / "metadata.json").read_text())
    tokens = torch.from_numpy(PreparedCorpus(corpus_dir, corpus_dir / metadata["tokenizer"]["file"], metadata)
                              .tokens("val").astype(np.int64))
    caches, carried, fresh = model.new_caches(1, torch.empty(0)), 0.0, 0.0
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, 16):
            window = tokens[start:start + 17][None]
            carried += F.cross_entropy(model(window[:, :-1], caches)[0], window[0, 1:], reduction="sum").item()
            fresh += F.cross_entropy(model(window[:, :-1])[0], window[0, 1:], reduction="sum").item()
    assert abs(carried - fresh) / (len(tokens) - 1) > 1e-3  # the state matters, so this checks it is carried
    assert abs(record["final"]["val/loss"] - carried / (len(tokens) - 1)) <= 1e-5
    assert math.isfinite(record["final"]["val/word_perplexity"])


@pytest.mark.bad_input
def test_a_transformer_asked_for_streams_is_refused_in_one_line(tmp_path, corpus_cache):
    proc = run_in_process("train", "experiment=tiny", "logger=csv", "data.sampling=streams", "trainer.max_steps=10",
                          "data.corpus.source.max_bytes=4000", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
                          cache=corpus_cache, check=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert lines == [("error: data.sampling=streams carries a recurrent state across batches: it needs a causal "
                      "recurrent model (model=lstm, gru or rnn), not 'gpt'")]
    assert not (tmp_path / "run" / "checkpoints").exists()


# --- the zaremba_small recipe ---------------------------------------------------------------


@pytest.fixture(scope="module")
def zaremba():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=["experiment=zaremba_small", "data.corpus.source.path=/corpus.txt",
                                                       "paths.output_dir=/tmp/out"])


def test_zaremba_small_states_the_papers_small_non_regularised_model(zaremba):
    cfg = zaremba
    assert cfg.model.family == "lstm" and cfg.model.n_layer == 2 and cfg.model.n_embd == 200
    assert cfg.model.dropout == 0 and not cfg.model.tie_embeddings and cfg.model.init_range == 0.1
    assert cfg.model.block_size == cfg.data.block_size == 20  # 20 steps of unrolling
    assert cfg.data.batch_size == 20 and cfg.data.sampling == "streams" and cfg.data.corpus.source.path == "/corpus.txt"
    assert cfg.tokenizer.type == "words" and cfg.tokenizer.vocab_size == 0  # every distinct word, line ends as tokens
    assert cfg.optimizer._target_ == "torch.optim.SGD" and cfg.optimizer.momentum == 0 and cfg.optimizer.weight_decay == 0
    # lr 1 and clip 5 on the loss summed over the 20 steps = lr 20 and clip 0.25 on the per-token mean
    assert cfg.optimizer.lr / cfg.model.block_size == 1 and cfg.trainer.gradient_clip_val * cfg.model.block_size == 5
    assert cfg.trainer.gradient_clip_algorithm == "norm"
    assert cfg.trainer.max_epochs == 13 and cfg.trainer.max_steps == -1
    assert cfg.data.val_batch_size == 1 and cfg.trainer.limit_val_batches == 1.0  # stateful, the whole text


def test_zaremba_small_learning_rate_is_1_for_4_epochs_then_halved_after_each(zaremba):
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    config = hydra.utils.instantiate(zaremba.scheduler)(optimizer=optimizer)
    assert config["interval"] == "epoch"
    rates = []
    for _ in range(zaremba.trainer.max_epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        config["scheduler"].step()
    assert rates == [1.0] * 4 + [0.5 ** k for k in range(1, 10)]  # epoch 13 at 1/512


def test_zaremba_small_initialises_every_parameter_uniformly_in_0_1(zaremba):
    model_cfg = {**OmegaConf.to_container(zaremba.model, resolve=True), "vocab_size": 300}
    torch.manual_seed(0)
    model = hydra.utils.instantiate(model_cfg)
    assert model.lm_head.bias is not None and model.lm_head.weight is not model.wte.weight
    for name, p in model.named_parameters():
        assert p.abs().max() <= 0.1 and p.abs().max() > 0.099, name  # uniform fills the whole range
        assert abs(p.std().item() - 0.2 / math.sqrt(12)) < 0.01, name  # the spread of U(-0.1, 0.1)


def test_zaremba_small_step_is_the_papers_update(zaremba):
    """One SGD step on our per-token mean loss with the recipe's lr and clip moves the weights exactly as the
    paper's step does: lr 1 on the loss summed over the unrolled steps (mean over the batch), norm clipped at 5."""
    model_cfg = {**OmegaConf.to_container(zaremba.model, resolve=True), "vocab_size": 50, "n_embd": 8}
    torch.manual_seed(0)
    ours, paper = hydra.utils.instantiate(model_cfg), hydra.utils.instantiate(model_cfg)
    with torch.no_grad():
        ours.lm_head.weight.mul_(100)  # confident, wrong predictions: gradients large enough to be clipped
    paper.load_state_dict(ours.state_dict())
    batch = torch.randint(0, 50, (zaremba.data.batch_size, zaremba.model.block_size + 1))
    for model, per_token_mean, lr, clip in ((ours, True, zaremba.optimizer.lr, zaremba.trainer.gradient_clip_val),
                                            (paper, False, 1.0, 5.0)):
        nll = F.cross_entropy(model(batch[:, :-1]).transpose(1, 2), batch[:, 1:], reduction="none")  # (B, T)
        loss = nll.mean() if per_token_mean else nll.mean(0).sum()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        assert norm > clip  # the clip acts in this step: it is part of what is compared
        torch.optim.SGD(model.parameters(), lr=lr).step()
    for (name, a), b in zip(ours.named_parameters(), paper.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)  # float32 rounding of equal sums


def test_zaremba_small_trains_on_a_word_corpus_and_validates_per_word_on_a_file_of_its_own(tmp_path, corpus_cache):
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(40)]

    def lines(n: int) -> str:  # runs of consecutive words: learnable from the previous word
        starts, lengths = rng.integers(0, 40, n), rng.integers(3, 12, n)
        return "".join(" ".join(words[(s + k) % 40] for k in range(n)) + "\n" for s, n in zip(starts, lengths))

    train, valid = lines(400), lines(40) + "an unseen line\n"
    (tmp_path / "train.txt").write_text(train)
    (tmp_path / "valid.txt").write_text(valid)
    proc = run_in_process("train", "experiment=zaremba_small", f"data.corpus.source.path={tmp_path / 'train.txt'}",
                          f"data.val_path={tmp_path / 'valid.txt'}", "data.corpus.split.val_fraction=0",
                          "model.n_embd=64", "data.batch_size=1", "trainer.max_epochs=2", "logger=csv",
                          "sample.max_new_tokens=5", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, cache=corpus_cache)
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    _, tokenizer = load_trained(tmp_path / "run" / "checkpoints" / "last.ckpt")
    ids = [tokenizer.encode(word) for word in words]
    assert all(len(i) == 1 and i[0] != tokenizer.unk_id for i in ids) and len({i[0] for i in ids}) == len(words)
    assert tokenizer.encode("w1 w2\nw3") == [ids[1][0], ids[2][0], tokenizer.newline_id, ids[3][0]]
    assert tokenizer.encode("unseen") == [tokenizer.unk_id]
    # each word and line end a token, one EOS after the file; 4 lanes of windows of 20, two epochs
    assert record["steps"] == 2 * ((len(train.split()) + train.count("\n") + 1 - 1) // 20)  # one lane
    # validation is one stream over the file, every token after the first predicted once: per-word perplexity
    # (line ends counted as words) is the per-token one, and it is printed
    final = record["final"]
    assert final["val/word_perplexity"] == pytest.approx(final["val/perplexity"], rel=1e-5)
    assert final["val/word_perplexity"] < 20  # untrained: about the vocabulary size, 40 words and the specials
    assert f"per-word perplexity {final['val/word_perplexity']:.2f}" in proc.stdout + proc.stderr
