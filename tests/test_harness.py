"""lm-evaluation-harness on lm-lightning checkpoints (``lm-lightning evaluate harness``): the native lm_eval model
scores as ``score`` and ``evaluate``'s sliding windows do, generates as ``generate`` does, and agrees with lm-eval's
own ``hf`` model on the exported folder; the shipped tasks read local data only."""

from __future__ import annotations

import json
import math

import pytest
import torch
from lm_eval.api.instance import Instance

from helpers import SHARED_DATA, offline_wandb_summary, run_cli, run_command
from lm_lightning.adaptation.zero_shot import candidate_logprobs
from lm_lightning.errors import UserError
from lm_lightning.evaluation.harness import TASKS_DIR, LightningLM, figures, offline, run_tasks
from lm_lightning.generation import generate_text
from test_zoo import V, Chars, build

TEMPLATE, VERBALIZERS = "{text} All in all, it was", [" terrible", " great"]  # conf/score.yaml's defaults


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, corpus_cache):
    """A tiny GPT on Tiny Shakespeare characters with a context of 256, room for whole SST-2 prompts (score and
    lm-eval cut a longer prompt differently: score keeps the same prompt for every verbalizer)."""
    run = tmp_path_factory.mktemp("harness") / "run"
    run_command("train", "experiment=tiny", "model.block_size=256", "trainer.max_steps=20", "logger=csv",
                "sample.max_new_tokens=0", "trainer.val_check_interval=20", "trainer.limit_val_batches=1",
                run_dir=run, cache=corpus_cache)
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def lm(checkpoint):
    return LightningLM(ckpt_path=str(checkpoint), batch_size=8, device="cpu")


@pytest.fixture(scope="module")
def text_slice(tmp_path_factory):
    """The first 3,000 characters of WikiText-2's raw test file (11 windows of 256 and a shorter tail)."""
    path = tmp_path_factory.mktemp("wikitext") / "slice.txt"
    path.write_text((SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")[:3000])
    return path


def test_the_sst2_task_asks_what_score_asks_and_gets_its_log_likelihoods(lm):
    from lm_eval.tasks import TaskManager

    with offline():
        task = TaskManager(include_path=str(TASKS_DIR), include_defaults=False).load(["sst2_zero_shot"])["tasks"]
        task = task["sst2_zero_shot"]
        task.build_all_requests(limit=6, rank=0, world_size=1)
    sentences = [task.doc_to_text(doc) for doc in task.eval_docs][:6]
    instances = sorted(task.instances, key=lambda i: (i.doc_id, i.idx))
    assert [i.args for i in instances] == [(s, v) for s in sentences for v in VERBALIZERS]
    first = (SHARED_DATA / "sst2" / "dev.tsv").read_text().splitlines()[1].split("\t")[0].strip()
    assert sentences[0] == TEMPLATE.format(text=first)
    scores = [score for score, _ in lm.loglikelihood(instances, disable_tqdm=True)]
    expected = [s for prompt in sentences for s in candidate_logprobs(
        lm.model, lm.tokenizer.encode(prompt), [lm.tokenizer.encode(v) for v in VERBALIZERS])]
    assert scores == pytest.approx(expected, abs=1e-4)


def test_sst2_accuracy_equals_lm_lightning_score(lm, checkpoint, tmp_path, corpus_cache):
    results = run_tasks(lm, ["sst2_zero_shot"], limit=48)
    scored = run_command("score", f"ckpt_path={checkpoint}", "max_examples=48", run_dir=tmp_path / "score",
                         cache=corpus_cache)
    assert results["n-samples"]["sst2_zero_shot"]["effective"] == scored["examples"] == 48
    assert figures(results, lm)["sst2_zero_shot/acc"] == scored["accuracy"]


def sliding_window_nats(model, stream: list[int], window: int) -> float:
    """By hand: stream[1:] predicted in non-overlapping windows of ``window`` predictions, the last window
    moved back to end at the end of the stream (full context), scoring only what is left."""
    total, done = 0.0, 0
    ends = [*range(window, len(stream) - 1, window), len(stream) - 1]
    with torch.no_grad():
        for end in ends:
            start = max(end - window, 0)
            logprobs = model(torch.tensor([stream[start:end]]))[0].float().log_softmax(-1)
            targets = torch.tensor(stream[start + 1 : end + 1])
            token_logprobs = logprobs.gather(-1, targets[:, None])[:, 0]
            total -= float(token_logprobs[-(end - done):].sum())
            done = end
    return total


def test_rolling_perplexity_is_evaluates_with_a_leading_separator_and_a_stride_of_the_context(
        lm, checkpoint, text_slice, tmp_path, corpus_cache):
    values = figures(run_tasks(lm, ["wikitext2_raw"], metadata={"wikitext_file": str(text_slice)}), lm)
    text = text_slice.read_text()
    stream = [lm.tokenizer.eos_id, *lm.tokenizer.encode(text)]  # the document follows a separator, as in training
    nats = sliding_window_nats(lm.model, stream, lm.max_length)
    assert values["wikitext2_raw/tokens"] == len(stream) - 1
    assert values["wikitext2_raw/token_perplexity"] == pytest.approx(math.exp(nats / (len(stream) - 1)), rel=1e-5)
    assert values["wikitext2_raw/word_perplexity"] == pytest.approx(math.exp(nats / len(text.split())), rel=1e-5)
    assert values["wikitext2_raw/bits_per_byte"] == pytest.approx(nats / math.log(2) / len(text.encode()), rel=1e-5)
    evaluated = run_command("evaluate", f"ckpt_path={checkpoint}", f"text_file={text_slice}", "as_trained=false",
                            "leading_separator=true", f"stride={lm.max_length}", run_dir=tmp_path / "evaluate",
                            cache=corpus_cache)
    assert evaluated["predictions"] == values["wikitext2_raw/tokens"]
    for figure in ("perplexity", "word_perplexity", "bits_per_byte"):
        harness = values["wikitext2_raw/" + ("token_perplexity" if figure == "perplexity" else figure)]
        assert harness == pytest.approx(evaluated[figure], rel=1e-4), figure


@pytest.mark.parametrize("family", ["gpt", "lstm", "gru", "ffn"])
def test_every_causal_family_scores_batched_windows_as_one_sequence_at_a_time(family):
    model = build(family, V + 6, seed=3).eval()
    lm = LightningLM(model=model, tokenizer=Chars(), batch_size=3)
    texts = ["abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvw", "hello", "zyxwvuts" * 9]
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    window = model.context_length
    expected = [-sliding_window_nats(model, [Chars.eos_id, *Chars().encode(t)], window) for t in texts]
    assert lm.loglikelihood_rolling(requests, disable_tqdm=True) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("family", ["prefix_lm", "t5", "bert"])
def test_a_model_that_does_not_read_left_to_right_is_refused(family):
    with pytest.raises(UserError, match="left to right.*gpt"):
        LightningLM(model=build(family, V + 106).eval(), tokenizer=Chars())


def test_generation_gives_generate_texts_greedy_text_batched_with_the_cache():
    model, tokenizer = build("gpt", V + 6, seed=4).eval(), Chars()  # random weights: every prompt goes its own way
    lm = LightningLM(model=model, tokenizer=tokenizer, batch_size=2)
    prompts = ["abcdef", "zyxwvu", "hello", "thequickbrownfox", "banana"]  # three of six characters: two batches
    options = {"until": ["s", "gg"], "max_gen_toks": 20}
    requests = [Instance("generate_until", {}, (p, options), i) for i, p in enumerate(prompts)]
    outputs = lm.generate_until(requests, disable_tqdm=True)
    assert outputs == [generate_text(model, tokenizer, p, max_new_tokens=20, temperature=0.0, stop=["s", "gg"])
                       for p in prompts]
    assert len(set(outputs)) == len(prompts) and sum(len(o) < 20 for o in outputs) == 2  # two cut at a stop
    with pytest.raises(UserError, match="repetition_penalty"):
        lm.generate_until([Instance("generate_until", {}, ("abc", {"repetition_penalty": 1.2}), 0)])


def test_an_unknown_task_is_one_user_error_naming_the_shipped_ones(lm):
    with pytest.raises(UserError, match="unknown lm-eval task.*no_such_task.*sst2_zero_shot.*wikitext2_raw"):
        run_tasks(lm, ["no_such_task"])


def test_lm_evals_hf_model_on_the_exported_folder_agrees(lm, checkpoint, text_slice, tmp_path):
    from lm_eval.models.huggingface import HFLM

    from lm_lightning.interop.hf_export import export_to_hf

    export_to_hf(str(checkpoint), tmp_path / "hf")
    hf = HFLM(pretrained=str(tmp_path / "hf"), prefix_token_id=lm.tokenizer.eos_id, max_length=lm.max_length,
              batch_size=8, device="cpu", dtype="float32")
    tasks, metadata = ["sst2_zero_shot", "wikitext2_raw"], {"wikitext_file": str(text_slice)}
    theirs = figures(run_tasks(hf, tasks, limit=16, metadata=metadata))
    ours = figures(run_tasks(lm, tasks, limit=16, metadata=metadata), lm)
    assert theirs.keys() <= ours.keys() and len(theirs) == 5
    for name, value in theirs.items():
        assert ours[name] == pytest.approx(value, rel=1e-5), name


def test_the_command_writes_the_figures_to_run_json_and_the_metrics_log(checkpoint, text_slice, tmp_path, lm,
                                                                         corpus_cache):
    record = run_command("evaluate_harness", f"ckpt_path={checkpoint}", "tasks=[sst2_zero_shot,wikitext2_raw]",
                         "limit=16", f"metadata.wikitext_file={text_slice}", "logger=csv",
                         run_dir=tmp_path / "run", cache=corpus_cache)
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved["figures"] == record["figures"] and saved["tasks"] == ["sst2_zero_shot", "wikitext2_raw"]
    assert saved["n-samples"]["sst2_zero_shot"]["effective"] == 16 and saved["model"]["family"] == "gpt"
    stream = [lm.tokenizer.eos_id, *lm.tokenizer.encode(text_slice.read_text())]
    by_hand = math.exp(sliding_window_nats(lm.model, stream, lm.max_length) / (len(stream) - 1))
    assert saved["figures"]["wikitext2_raw/token_perplexity"] == pytest.approx(by_hand, rel=1e-5)
    header, row = next((tmp_path / "run").glob("csv/version_*/metrics.csv")).read_text().splitlines()[:2]
    logged = dict(zip(header.split(","), map(float, row.split(","))))
    assert logged["harness/wikitext2_raw/token_perplexity"] == pytest.approx(by_hand, rel=1e-5)
    assert logged["harness/sst2_zero_shot/acc"] == saved["figures"]["sst2_zero_shot/acc"]


@pytest.mark.slow
def test_evaluate_harness_on_the_console_offline_with_wandb(checkpoint, tmp_path, corpus_cache):
    proc = run_cli("evaluate", "harness", f"ckpt_path={checkpoint}", "tasks=[sst2_zero_shot]", "limit=4",
                   "hydra.run.dir=run", cwd=tmp_path, cache=corpus_cache)
    assert "|sst2_zero_shot|" in proc.stdout and "sst2_zero_shot/acc: " in proc.stdout
    run = tmp_path / "run"
    figures_saved = json.loads((run / "run.json").read_text())["figures"]
    assert offline_wandb_summary(run, "harness/sst2_zero_shot/acc") == figures_saved["sst2_zero_shot/acc"]
    assert "W&B run folder:" in proc.stdout and "offline-run-" in proc.stdout
