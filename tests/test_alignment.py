"""Preference data, the reward model, DPO and KTO as behaviour: how pairs are read, split and masked,
that the reference runs once before training and never in a training step, that each method learns
a preference it can learn, and the `lm-lightning align` command end to end with its errors."""

from __future__ import annotations

import gzip
import json
import random
from collections import Counter

import lightning as L
import pytest
import torch

from helpers import SHARED_DATA, run_in_process
from omegaconf import OmegaConf

from lm_lightning.adaptation.instructions import load_instructions, render_prompt
from lm_lightning.cli.align import align
from lm_lightning.alignment.dpo import DPOTask
from lm_lightning.alignment.kto import KTOTask
from lm_lightning.alignment.policy import cache_reference_logprobs
from lm_lightning.alignment.preference import (
    ASSISTANT,
    Encoder,
    Example,
    PreferenceData,
    PreferencePair,
    as_completions,
    collate,
    load_completions,
    load_hh_rlhf,
    load_pairs,
    first_per_prompt,
    split_by_prompt,
    synthetic_pairs,
)
from lm_lightning.alignment.reward import RewardModel, RewardModelTask, load_reward_model
from lm_lightning.errors import UserError
from lm_lightning.models.gpt import GPT, GPTConfig

HH = SHARED_DATA / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
ALPACA = SHARED_DATA / "alpaca" / "alpaca_data_1k.json"
TINY = {"vocab_size": 30, "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16}


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**TINY))


# --- data ---------------------------------------------------------------------------------------


def test_hh_rlhf_conversations_split_at_the_last_assistant_turn():
    pairs = load_hh_rlhf(HH)
    assert len(pairs) == 2354 - 9  # 9 rows whose two conversations differ before the last turn are not pairs
    with gzip.open(HH, "rt") as f:
        first = json.loads(f.readline())
    assert pairs[0].prompt + pairs[0].chosen == first["chosen"]
    assert pairs[0].prompt + pairs[0].rejected == first["rejected"]
    assert all(p.prompt.endswith(ASSISTANT) and ASSISTANT not in p.chosen + p.rejected for p in pairs)
    assert pairs[1].prompt.count(ASSISTANT) == 3  # a multi-turn conversation keeps its earlier turns in the prompt


def test_synthetic_pairs_prefer_the_reference_answer_to_its_shuffled_words():
    rows = load_instructions(ALPACA)
    pairs = synthetic_pairs(ALPACA, "shuffle", seed=0)
    assert len(pairs) == len(rows) - 59  # the 59 one-word answers have no other order
    by_prompt = {render_prompt(r): r.output for r in rows}
    for pair in pairs[:200]:
        assert pair.chosen == by_prompt[pair.prompt]
        assert Counter(pair.rejected.split()) == Counter(pair.chosen.split()) and pair.rejected != pair.chosen
    assert synthetic_pairs(ALPACA, "shuffle", seed=0) == pairs  # seeded
    swapped = synthetic_pairs(ALPACA, "swap", seed=0)
    outputs = {r.output for r in rows}
    assert all(p.rejected in outputs and p.rejected != p.chosen for p in swapped)


def test_the_held_out_split_is_by_prompt_deterministic_and_disjoint():
    pairs = synthetic_pairs(ALPACA, "shuffle", seed=0, per_prompt=3)
    assert len(pairs) > 2.9 * 941  # three different shuffles of nearly every answer
    train, val = split_by_prompt(pairs, 0.2, seed=3)
    assert (train, val) == split_by_prompt(pairs, 0.2, seed=3)
    assert len(train) + len(val) == len(pairs)
    train_prompts, val_prompts = {p.prompt for p in train}, {p.prompt for p in val}
    assert not train_prompts & val_prompts and len(val_prompts) == 188  # 20% of the 941 prompts
    assert split_by_prompt(pairs, 0.2, seed=4)[1] != val
    independent = first_per_prompt(val)
    assert len(independent) == 188 and independent[0] == val[0]


@pytest.mark.parametrize("loader, row, field", [
    (load_pairs, {"prompt": "p", "chosen": "a"}, "rejected"),
    (load_hh_rlhf, {"chosen": "\n\nHuman: hi\n\nAssistant: a"}, "rejected"),
    (load_completions, {"prompt": "p", "completion": "a"}, "desirable"),
])
def test_a_row_missing_a_field_is_one_error_naming_file_row_and_field(tmp_path, loader, row, field):
    good = {"prompt": "p", "chosen": "\n\nHuman: x\n\nAssistant: a", "rejected": "\n\nHuman: x\n\nAssistant: b",
            "completion": "c", "desirable": True}
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError) as err:
        loader(path)
    assert f"{path}, row 2: missing field '{field}'" in str(err.value) and "\n" not in str(err.value)


class CharTokenizer:
    """Characters a-z as ids 4..29; pad 0, bos 1, eos 2."""
    pad_id, bos_id, eos_id = 0, 1, 2

    def encode(self, text: str) -> list[int]:
        return [4 + ord(c) - ord("a") for c in text]


def test_batches_mask_the_prompt_and_keep_its_end():
    encoder = Encoder(CharTokenizer(), max_prompt_tokens=3, max_length=8)
    ids, prompt_length = encoder.sequence("abcde", "xyzuvw")
    assert (ids, prompt_length) == ([6, 7, 8, 27, 28, 29, 24, 2], 3)  # prompt's last 3; response cut, then eos
    example = encoder.pair(PreferencePair("ab", "c", "def"))
    batch = collate([example, Example([[4, 5, 6, 2], [4, 7, 2]], [1, 1])], pad_id=0)
    assert batch["ids"].tolist() == [[4, 5, 6, 2, 0, 0], [4, 5, 6, 2, 0, 0], [4, 5, 7, 8, 9, 2], [4, 7, 2, 0, 0, 0]]
    assert batch["response_mask"].int().tolist() == [[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0],
                                                     [0, 0, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0]]
    assert batch["lengths"].tolist() == [4, 4, 6, 3]  # chosen rows first, then rejected


# --- tasks --------------------------------------------------------------------------------------


def toy_pairs(n: int, seed: int) -> list[PreferencePair]:
    """Random prompts of letters a-l; chosen is "xyz", rejected "zyx" (a preference a tiny model can learn)."""
    rng = random.Random(seed)
    return [PreferencePair("".join(rng.choices("abcdefghijkl", k=5)), "xyz", "zyx") for _ in range(n)]


def encoded(pairs: list[PreferencePair]) -> list[Example]:
    return [Encoder(CharTokenizer(), 8, 16).pair(p) for p in pairs]


def fit(task: L.LightningModule, train: list[Example], val: list[Example], steps: int) -> dict[str, float]:
    data = PreferenceData(train, val, batch_size=8, val_batch_size=16, pad_id=0, seed=0)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, check_val_every_n_epoch=None,
                        val_check_interval=10**6)  # validation only after training
    trainer.fit(task, datamodule=data)
    return {k: float(v) for k, v in trainer.validate(task, datamodule=data, verbose=False)[0].items()}


def adam(lr: float):
    return lambda params: torch.optim.Adam(params, lr=lr)


def test_reference_logprobs_are_cached_once_and_never_computed_in_a_training_step():
    train, val = encoded(toy_pairs(32, seed=0)), encoded(toy_pairs(16, seed=1))
    task = DPOTask(tiny_gpt(), beta=0.1, optimizer=adam(1e-2))
    assert cache_reference_logprobs(task.reference, train, batch_size=16, pad_id=0) == 64
    batch = collate(train[:4], pad_id=0)
    with torch.no_grad():
        direct = task.policy_logprobs(batch)  # before training the policy is the reference
    torch.testing.assert_close(batch["reference_logps"], direct, atol=1e-5, rtol=0)
    calls = []
    task.reference.register_forward_hook(lambda *args: calls.append(1))
    train_step = task.training_step

    def counted_step(batch, batch_idx):
        before = len(calls)
        loss = train_step(batch, batch_idx)
        assert len(calls) == before, "the reference ran inside a training step"
        return loss

    task.training_step = counted_step
    fit(task, train, val, steps=6)
    assert len(calls) == 1  # validation's KL: one batch of 16 held-out pairs
    assert all(not p.requires_grad for p in task.reference.parameters())


@pytest.mark.parametrize("method", ["reward_model", "dpo", "kto"])
def test_each_method_learns_a_learnable_preference_on_held_out_prompts(method):
    pairs, val = toy_pairs(64, seed=0), encoded(toy_pairs(32, seed=1))
    train = encoded(pairs)
    if method == "reward_model":
        task = RewardModelTask(TINY | {"_target_": "lm_lightning.models.gpt.build_gpt"}, optimizer=adam(3e-3))
    elif method == "dpo":
        task = DPOTask(tiny_gpt(), beta=0.5, optimizer=adam(3e-3))
    else:  # each pair as a desirable and an undesirable row, each with another row's completion for z0
        task = KTOTask(tiny_gpt(), beta=0.5, optimizer=adam(3e-3))
        train = Encoder(CharTokenizer(), 8, 16).unpaired(as_completions(pairs), seed=0)
        assert len(train) == 128 and sum(ex.desirable for ex in train) == 64
    if method != "reward_model":
        cache_reference_logprobs(task.reference, train, batch_size=32, pad_id=0)
    final = fit(task, train, val, steps=40)
    assert final["val/accuracy"] == 1.0
    assert final["val/margin"] > 0
    if method != "reward_model":
        assert final["val/kl"] > 0 and final["val/logratio_chosen"] > final["val/logratio_rejected"]


def test_reward_rows_do_not_depend_on_padding():
    model = RewardModel(tiny_gpt()).eval()
    ids = torch.randint(3, 16, (2, 6))
    padded = torch.cat([ids, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    lengths = torch.tensor([6, 4])
    rewards = model(padded, lengths)
    assert rewards.shape == (2,)
    torch.testing.assert_close(rewards, model(ids, lengths))
    torch.testing.assert_close(rewards[1:], model(ids[1:, :4], lengths[1:]))


# --- the command --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def aligned(tmp_path_factory, corpus_cache):
    """A GPT trained for 5 steps on Tiny Shakespeare characters (64-character context: the session's 32
    leaves too little for a prompt and its response), then `lm-lightning align` with each ready experiment
    for 4 steps, as one multirun."""
    root = tmp_path_factory.mktemp("align")
    run_in_process("train", "experiment=tiny", "model.block_size=64", "trainer.max_steps=5", "scheduler.warmup_steps=1",
                   "logger=csv", "num_threads=1", "sample.max_new_tokens=0", f"hydra.run.dir={root / 'pre'}",
                   cwd=root, cache=corpus_cache)
    ckpt = root / "pre" / "checkpoints" / "last.ckpt"
    proc = run_in_process("align", "-m", "experiment=dpo,kto,reward_model", f"ckpt_path={ckpt}", "num_threads=1",
                          "trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.log_every_n_steps=2",
                          "scheduler.warmup_steps=1", "data.max_train_pairs=64", "data.val_fraction=0.05",
                          "data.max_prompt_tokens=24", "logger=csv", f"hydra.sweep.dir={root / 'sweep'}",
                          cwd=root, cache=root / "cache")
    runs = {name: next((root / "sweep").glob(f"{n}_*")) for n, name in enumerate(["dpo", "kto", "reward_model"])}
    return root, ckpt, proc.stdout, runs


def test_align_experiment_dpo_trains_the_policy_and_reports_accuracy_and_kl(aligned):
    _, _, stdout, runs = aligned
    assert "held-out implicit-reward accuracy" in stdout and "KL to the reference" in stdout
    record = json.loads((runs["dpo"] / "run.json").read_text())
    assert record["method"] == "dpo" and record["steps"] == 4
    assert record["reference_caching"]["sequences"] == 2 * 64  # chosen and rejected of every training pair, once
    low, high = record["accuracy_interval_95"]
    assert 0 <= low <= record["final"]["val/accuracy"] <= high <= 1
    assert record["final"]["val/kl"] > 0
    header = next((runs["dpo"] / "csv").glob("version_*/metrics.csv")).read_text().splitlines()[0].split(",")
    assert {"train/loss", "train/accuracy", "train/margin", "val/accuracy", "val/margin", "val/kl"} <= set(header)
    from lm_lightning.training.loading import load_trained

    policy, _ = load_trained(runs["dpo"] / "checkpoints" / "policy.ckpt")  # readable by evaluate/generate
    assert policy.model.config.block_size == 64


def test_align_experiments_kto_and_reward_model_and_the_tokenizer_check(aligned, tmp_path):
    _, ckpt, stdout, runs = aligned
    kto = json.loads((runs["kto"] / "run.json").read_text())
    assert kto["method"] == "kto" and kto["data"]["train_examples"] == 128  # each pair: a desirable and an undesirable row
    header = next((runs["kto"] / "csv").glob("version_*/metrics.csv")).read_text().splitlines()[0].split(",")
    assert {"train/kl_reference_point", "train/reward_desirable", "val/accuracy", "val/kl"} <= set(header)
    assert "held-out pairwise accuracy" in stdout
    reward_ckpt = runs["reward_model"] / "checkpoints" / "reward_model.ckpt"
    reward_model, tokenizer = load_reward_model(reward_ckpt)
    ids = torch.tensor([tokenizer.encode("ROMEO:") + [tokenizer.eos_id]])
    assert reward_model(ids, torch.tensor([ids.size(1)])).shape == (1,)

    from lm_lightning.data.tokenizer import Tokenizer, train_tokenizer

    other = train_tokenizer(["a different corpus\n", "of text\n"], {"type": "char", "verbose": False}, tmp_path / "other")
    with pytest.raises(UserError, match="uses a different tokenizer") as err:
        load_reward_model(reward_ckpt, Tokenizer.load(other), "policy.ckpt")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="is not a reward model checkpoint"):
        load_reward_model(ckpt)


def test_align_errors_are_one_line(aligned):
    root, ckpt, _, _ = aligned
    bad = root / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    proc = run_in_process("align", "method=dpo", f"ckpt_path={ckpt}", "data.format=pairs", f"data.path={bad}",
                          "logger=csv", f"hydra.run.dir={root / 'bad'}", cwd=root, cache=root / "cache", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: preference file {bad}, row 2: missing field 'rejected' " \
                                                   "(every row needs prompt, chosen, rejected)"
    with pytest.raises(UserError, match="method='ppx': choose one of reward_model, dpo, kto"):
        align(OmegaConf.create({"method": "ppx", "seed": 0, "num_threads": 1}))
