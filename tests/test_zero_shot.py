"""Zero-shot scoring: a candidate's score is the sum of its tokens' log-probabilities, for every
generative family; `lm-lightning score` prints accuracy beside the majority-class baseline."""

from __future__ import annotations

import pytest
import torch

from helpers import run_in_process
from lm_lightning.adaptation.zero_shot import candidate_logprobs, classify
from test_zoo import GENERATIVE, Chars, build

V = 40


@pytest.mark.parametrize("name", GENERATIVE)
def test_a_candidates_score_is_the_sum_of_its_token_log_probabilities(name):
    model = build(name, V + 106, seed=2).eval()
    prompt, candidate = [5, 9, 7], [11, 12, 13]
    score = candidate_logprobs(model, prompt, [candidate])[0]
    # by hand: one token at a time, each conditioned on everything before it, through the generation path
    from lm_lightning.generation import decoding_view

    view, start = decoding_view(model, torch.tensor([prompt]))
    by_hand, ids = 0.0, start
    with torch.no_grad():
        for token in candidate:
            by_hand += float(view(ids)[0, -1].float().log_softmax(-1)[token])
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    assert score == pytest.approx(by_hand, abs=1e-4)


def test_classify_picks_the_most_likely_verbalizer():
    torch.manual_seed(0)
    model = build("gpt", V + 106).eval()
    tokenizer = Chars()
    scores = candidate_logprobs(model, tokenizer.encode("abc"), [tokenizer.encode("d"), tokenizer.encode("e")])
    assert classify(model, tokenizer, ["abc"], ["d", "e"]) == [int(scores[1] > scores[0])]


def test_score_command_prints_accuracy_beside_the_majority_baseline(tmp_path, tiny_run):
    run_dir = tiny_run
    proc = run_in_process("score", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "max_examples=40",
                          cwd=tmp_path, cache=tmp_path / "cache")
    line = proc.stdout.strip().splitlines()[-1]
    assert "40 examples | zero-shot accuracy" in line and "majority-class baseline" in line
    accuracy = float(line.split("zero-shot accuracy ")[1].split()[0])
    assert 0.0 <= accuracy <= 1.0
    again = run_in_process("evaluate", "task=zero_shot", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
                           "max_examples=40", cwd=tmp_path, cache=tmp_path / "cache")
    assert again.stdout.strip().splitlines()[-1] == line  # `evaluate task=zero_shot` is the same command
    bad = run_in_process("score", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "label_column=polarity",
                         cwd=tmp_path, cache=tmp_path / "cache", check=False)
    assert bad.returncode == 2 and "has no column 'polarity'" in bad.stderr.strip().splitlines()[-1]
