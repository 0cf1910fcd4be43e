"""`lm-lightning evaluate` as a specification: sliding windows that predict every token once with the
promised context (stride 1 = a brute-force full-context loop; stride = block_size = the non-overlapping
windows of validation, plus the tail), a recurrent state carried over the whole file (= a token-by-token
loop), the text cleaned and split as the checkpoint's corpus was, and one report of tokens, bytes, words,
loss, perplexity per token and per word and bits-per-byte, printed and in the run folder's run.json."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import hydra
import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from helpers import SHARED_DATA, run_in_process
from lm_lightning.config.app import CONF_DIR
from lm_lightning.evaluation.objective import objective_scores
from lm_lightning.evaluation.perplexity import consecutive_windows, score_stream, sliding_windows
from lm_lightning.evaluation.text import RAW, TextPreparation, tokenize_text, training_preparation
from lm_lightning.tasks.language_model import LanguageModelTask
from lm_lightning.training.loading import load_trained

SHAKESPEARE = SHARED_DATA / "tinyshakespeare" / "input.txt"
WIKITEXT = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"
BLOCK = 32  # the session checkpoint's context


@pytest.fixture(scope="module")
def gpt(tiny_checkpoint):
    """The session's tiny trained GPT (2 x 32, context 32, Tiny Shakespeare characters) and its tokenizer."""
    return load_trained(str(tiny_checkpoint))


def tokens_of(tmp_path: Path, text: str, tokenizer, preparation: TextPreparation = RAW) -> np.ndarray:
    path = tmp_path / "text.txt"
    path.write_text(text)
    return tokenize_text(path, preparation, tokenizer).tokens


def full_context_nats(model, tokens: np.ndarray, window: int) -> float:
    """Every token after the first, predicted one at a time from the (up to) ``window`` tokens before it."""
    with torch.no_grad():
        return sum(-F.log_softmax(model(torch.from_numpy(tokens[max(0, t - window) : t])[None])[0, -1].double(), -1)
                   [tokens[t]].item() for t in range(1, len(tokens)))


def untrained_checkpoint(path: Path, tokenizer_model: bytes, vocab: int, model: str, objective: str, **fields) -> Path:
    """A checkpoint of a seeded untrained model as ``train`` writes it (weights, hyper-parameters, tokenizer)."""
    objective_cfg = {**OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "objective" / f"{objective}.yaml")),
                     "vocab_size": vocab}
    model_cfg = {**OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "model" / f"{model}.yaml")), **fields,
                 "vocab_size": hydra.utils.instantiate(objective_cfg).model_vocab_size(vocab)}
    torch.manual_seed(0)
    task = LanguageModelTask(model_cfg, objective_cfg, tokenizer_model=tokenizer_model)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                "pytorch-lightning_version": L.__version__, "tokenizer_model": tokenizer_model}, path)
    return path


def evaluate(tmp_path: Path, checkpoint: Path, text: Path, *overrides: str, check: bool = True):
    """``lm-lightning evaluate`` in this process; (its run record, the process result)."""
    run = tmp_path / f"eval-{len(list(tmp_path.glob('eval-*')))}"
    proc = run_in_process("evaluate", f"ckpt_path={checkpoint}", f"text_file={text}", "accelerator=cpu", *overrides,
                          f"hydra.run.dir={run}", cwd=tmp_path, cache=tmp_path / "cache", check=check)
    record = json.loads((run / "run.json").read_text()) if (run / "run.json").is_file() else None
    return record, proc


@pytest.mark.parametrize("n_tokens, window, stride", [(100, 8, 1), (100, 8, 3), (100, 8, 8), (97, 8, 5), (9, 8, 2),
                                                      (5, 8, 4), (2, 8, 8)])
def test_windows_predict_every_token_once_with_at_least_window_minus_stride_tokens_of_context(n_tokens, window, stride):
    for plan, least_context in ((sliding_windows(n_tokens, window, stride), window - stride),
                                (consecutive_windows(n_tokens, window), 0)):
        targets, contexts = [], []
        for start, length, scored in zip(plan.starts, plan.lengths, plan.scored):
            assert start >= 0 and start + length <= n_tokens - 1 and 1 <= scored <= length <= window
            positions = range(start + length - scored + 1, start + length + 1)  # stream positions predicted
            targets += positions
            contexts += [p - start for p in positions]  # tokens of the window before each
        assert targets == list(range(1, n_tokens)), "every token but the first, once, in order"
        if least_context:
            later = [c for t, c in zip(targets, contexts) if t > window]  # past the first window
            assert min(later, default=least_context) >= least_context


def test_stride_one_equals_a_brute_force_full_context_loop(gpt, tmp_path):
    task, tokenizer = gpt
    tokens = tokens_of(tmp_path, SHAKESPEARE.read_text()[-300:], tokenizer)
    scores = score_stream(task.model, tokens, BLOCK, stride=1, batch_size=64, accelerator="cpu")
    assert scores.predictions == len(tokens) - 1 and scores.windows == len(tokens) - BLOCK
    assert scores.loss == pytest.approx(full_context_nats(task.model, tokens, BLOCK) / (len(tokens) - 1), abs=1e-5)


def test_stride_block_size_equals_the_non_overlapping_windows_and_scores_the_tail_too(gpt, tmp_path):
    task, tokenizer = gpt
    tokens = tokens_of(tmp_path, SHAKESPEARE.read_text()[-1000:], tokenizer)
    full_windows = (len(tokens) - BLOCK - 1) // BLOCK + 1  # what validation's sequential sampler reads
    assert (len(tokens) - 1) % BLOCK, "the text leaves a tail"
    non_overlapping = objective_scores(task, tokens, n_bytes=len(tokens), batch_size=8, accelerator="cpu")
    both = score_stream(task.model, tokens[: full_windows * BLOCK + 1], BLOCK, stride=BLOCK, accelerator="cpu")
    assert both.loss == pytest.approx(non_overlapping["loss"], abs=1e-5)
    whole = score_stream(task.model, tokens, BLOCK, stride=BLOCK, batch_size=8, accelerator="cpu")
    assert whole.predictions == len(tokens) - 1 > full_windows * BLOCK  # the tail is scored
    start = len(tokens) - 1 - BLOCK
    with torch.no_grad():
        logits = task.model(torch.from_numpy(tokens[start:-1])[None])[0].double()
    by_hand = F.cross_entropy(logits, torch.from_numpy(tokens[start + 1 :]), reduction="none")[full_windows * BLOCK - start :]
    # the last window, moved back to end at the end of the stream, scores only the tail
    assert whole.nats == pytest.approx(both.nats + float(by_hand.sum()), rel=1e-6)


def test_stateful_lstm_equals_a_loop_that_carries_the_state_over_the_whole_file(gpt, tmp_path):
    _, tokenizer = gpt
    checkpoint = untrained_checkpoint(tmp_path / "lstm" / "lstm.ckpt", gpt[0].tokenizer_model, tokenizer.vocab_size,
                                      "lstm", "causal_lm", block_size=16, n_layer=2, n_embd=16)
    text = tmp_path / "held_out.txt"
    text.write_text(SHAKESPEARE.read_text()[-300:])
    record, _ = evaluate(tmp_path, checkpoint, text, "stateful=true")
    model = load_trained(str(checkpoint))[0].model
    tokens = tokenize_text(text, training_preparation({}, checkpoint), tokenizer).tokens  # + EOS, as evaluate read it
    state, nats = None, 0.0
    with torch.no_grad():
        for t in range(len(tokens) - 1):
            out, state = model.rnn(model.wte(torch.tensor([[tokens[t]]])), state)
            nats -= F.log_softmax(model.lm_head(out)[0, -1].double(), -1)[tokens[t + 1]].item()
    assert record["stateful"] and record["predictions"] == len(tokens) - 1 == record["tokens"] - 1
    assert record["windows"] == math.ceil((len(tokens) - 1) / 16)
    assert record["loss"] == pytest.approx(nats / (len(tokens) - 1), abs=1e-5)
    reset, _ = evaluate(tmp_path, checkpoint, text)  # the same windows, each from a zero state
    assert abs(reset["loss"] - record["loss"]) > 1e-4, "the state is carried, not reset at each window"


def test_a_half_window_stride_gives_lower_perplexity_than_non_overlapping_windows_on_wikitext2(gpt, tmp_path):
    task, tokenizer = gpt
    tokens = tokens_of(tmp_path, WIKITEXT.read_text()[:20000], tokenizer)
    half = score_stream(task.model, tokens, BLOCK, stride=BLOCK // 2, batch_size=64, accelerator="cpu")
    non_overlapping = score_stream(task.model, tokens, BLOCK, batch_size=64, accelerator="cpu")
    assert half.predictions == non_overlapping.predictions == len(tokens) - 1
    assert half.loss < non_overlapping.loss


def test_the_report_is_printed_on_one_line_and_recorded_with_every_figure(tiny_checkpoint, tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 30)
    record, proc = evaluate(tmp_path, tiny_checkpoint, text, "stride=16", "batch_size=7")
    line = next(l for l in proc.stdout.splitlines() if l.startswith(str(text)))
    words = len(text.read_text().split())
    assert record["tokens"] == len(text.read_text()) + 1  # characters, then the end-of-sequence token
    assert (record["bytes"], record["words"], record["predictions"]) == (len(text.read_text()), words, record["tokens"] - 1)
    assert record["loss"] == pytest.approx(record["nats"] / record["predictions"])
    assert record["perplexity"] == pytest.approx(math.exp(record["loss"]))
    assert record["word_perplexity"] == pytest.approx(math.exp(record["nats"] / words))
    assert record["bits_per_byte"] == pytest.approx(record["nats"] / math.log(2) / record["bytes"])
    assert (record["window"], record["stride"], record["stateful"], record["complete"]) == (BLOCK, 16, False, True)
    assert f"loss {record['loss']:.4f} nats/token" in line and f"perplexity {record['perplexity']:.3f} per token" in line
    assert f"{record['word_perplexity']:.2f} per word" in line and f"bits-per-byte {record['bits_per_byte']:.4f}" in line
    assert f"{words:,} words" in line and "stride 16 (context >= 16 tokens)" in line
    lines, _ = evaluate(tmp_path, tiny_checkpoint, text, "stride=16", "line_ends_as_words=true")
    assert lines["words"] == words + 5 * 30 and lines["loss"] == pytest.approx(record["loss"], abs=1e-6)
    partial, _ = evaluate(tmp_path, tiny_checkpoint, text, "max_batches=2", "batch_size=4")
    assert partial["predictions"] == 8 * BLOCK and not partial["complete"]


def test_the_text_is_cleaned_and_split_into_documents_as_the_checkpoint_was_trained(gpt, tiny_checkpoint, tmp_path,
                                                                                      monkeypatch):
    _, tokenizer = gpt
    from lm_lightning.cli import evaluate as evaluate_command

    # a checkpoint written before checkpoints carried their text preparation: the run's record says it
    monkeypatch.setattr(evaluate_command, "training_preparation", lambda hparams, path: training_preparation({}, path))
    run = tmp_path / "run"  # a copy of the session run whose record says how its corpus was prepared
    shutil.copytree(tiny_checkpoint.parent, run / "checkpoints")
    cleaning = {"strip_whitespace": True, "min_chars": 12}
    config = {"data": {"corpus": {"cleaning": cleaning, "source": {"document_split": "paragraph"}}}}
    (run / "run.json").write_text(json.dumps({"config": config}))
    text = tmp_path / "raw.txt"
    text.write_text("To be, or not to be   \nthat is the question.\n\n\nShort.\n\n  Whether 'tis nobler  \n")
    record, _ = evaluate(tmp_path, run / "checkpoints" / "last.ckpt", text)
    documents = ["To be, or not to be\nthat is the question.", "Whether 'tis nobler"]  # "Short." under min_chars
    assert (record["documents"], record["documents_dropped"]) == (2, 1)
    assert record["tokens"] == sum(len(d) + 1 for d in documents)  # characters and one EOS after each document
    assert record["bytes"] == sum(len(d) for d in documents) and record["text_preparation"] == str(run / "run.json")
    tokens = tokenize_text(text, training_preparation({}, run / "checkpoints" / "last.ckpt"), tokenizer).tokens
    assert tokens.tolist() == [i for d in documents for i in [*tokenizer.encode(d), tokenizer.eos_id]]
    raw, _ = evaluate(tmp_path, run / "checkpoints" / "last.ckpt", text, "as_trained=false")
    assert (raw["tokens"], raw["documents"]) == (len(text.read_text()), 1)  # as it is: no EOS
    led, _ = evaluate(tmp_path, run / "checkpoints" / "last.ckpt", text, "as_trained=false", "leading_separator=true")
    assert led["predictions"] == raw["tokens"] == led["tokens"] - 1  # every token of the text scored, the first from EOS
    assert tokenize_text(text, RAW, tokenizer, leading_separator=True).tokens.tolist() == [
        tokenizer.eos_id, *tokenizer.encode(text.read_text())]
    saved = training_preparation({"text_preparation": {"cleaning": {}, "document_split": "lines:1"}}, run / "checkpoints" / "last.ckpt")
    assert (saved.document_split, saved.origin) == ("lines:1", "the checkpoint")  # carried by the checkpoint: first


def test_a_trained_checkpoint_carries_the_cleaning_and_document_split_of_its_corpus(tiny_run):
    from lm_lightning.training.loading import load_trained

    task, _ = load_trained(tiny_run / "checkpoints" / "last.ckpt")
    corpus = json.loads((tiny_run / "run.json").read_text())["config"]["data"]["corpus"]
    preparation = training_preparation(task.hparams, "elsewhere/last.ckpt")  # no run folder beside it
    assert preparation.origin == "the checkpoint"
    assert dict(preparation.cleaning) == (corpus.get("cleaning") or {})
    assert preparation.document_split == (corpus["source"].get("document_split") or "file")


@pytest.mark.parametrize("overrides, message", [
    (["stateful=true"], "error: stateful=true carries a recurrent model's state; this checkpoint is a gpt model"),
    (["stride=0"], "error: stride=0 is not valid: give 1..32 tokens"),
    (["stride=33"], "error: stride=33 is not valid: give 1..32 tokens"),
])
def test_settings_that_cannot_apply_are_refused_in_one_line(tiny_checkpoint, tmp_path, overrides, message):
    text = tmp_path / "held_out.txt"
    text.write_text(SHAKESPEARE.read_text()[:500])
    record, proc = evaluate(tmp_path, tiny_checkpoint, text, *overrides, check=False)
    assert proc.returncode == 2 and record is None
    assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr[-1000:]


def test_a_masked_lm_checkpoint_is_scored_by_its_objective_and_refuses_a_stride(gpt, tmp_path):
    _, tokenizer = gpt
    checkpoint = untrained_checkpoint(tmp_path / "bert" / "bert.ckpt", gpt[0].tokenizer_model, tokenizer.vocab_size,
                                      "bert", "mlm", block_size=16, n_layer=1, n_head=2, n_embd=16)
    text = tmp_path / "held_out.txt"
    text.write_text(SHAKESPEARE.read_text()[:2000])
    record, proc = evaluate(tmp_path, checkpoint, text)
    assert record["objective"] == "mlm" and 0 <= record["masked_accuracy"] <= 1
    assert record["perplexity"] == pytest.approx(math.exp(record["loss"]), rel=1e-5)
    assert "objective mlm" in proc.stdout and "bits_per_byte" not in record  # masks are not the text in order
    _, refused = evaluate(tmp_path, checkpoint, text, "stride=8", check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith("error: stride and stateful score next-token predictions")
