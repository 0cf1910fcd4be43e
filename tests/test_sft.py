"""Supervised fine-tuning on instructions: only response tokens are scored, a malformed instruction
file is one clear error, and the command's loss falls and ends with answers to held-back instructions."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import SHARED_DATA, run_in_process, step_losses
from lm_lightning.adaptation.instructions import Instruction, load_instructions, render_prompt
from lm_lightning.adaptation.sft import IGNORE, encode_example, response_loss, sft_batch
from lm_lightning.errors import UserError


class CharTokenizer:
    """One id per character (ids 4..), end-of-sequence 3, padding 0."""

    eos_id, pad_id = 3, 0

    def encode(self, text: str) -> list[int]:
        return [4 + ord(c) % 200 for c in text]


def test_prompt_tokens_change_the_inputs_but_not_which_positions_are_scored():
    tok = CharTokenizer()
    first = Instruction("Name a colour.", "", "Blue.")
    second = Instruction("Name a flower.", "", "Blue.")  # as many characters: the same prompt length
    a, b = encode_example(tok, first, 128), encode_example(tok, second, 128)
    assert a[1] == b[1] == len(render_prompt(first))
    batch_a, batch_b = sft_batch([a], tok.pad_id), sft_batch([b], tok.pad_id)
    assert not torch.equal(batch_a["inputs"], batch_b["inputs"])  # the prompt is read ...
    torch.testing.assert_close(batch_a["targets"], batch_b["targets"])  # ... but grading is the same
    scored = batch_a["targets"][0] != IGNORE
    prompt_length = a[1]
    # exactly the response's tokens and the end-of-sequence are targets, at the positions that predict them
    assert scored.nonzero().flatten().tolist() == list(range(prompt_length - 1, len(a[0]) - 1))
    assert batch_a["targets"][0, scored].tolist() == tok.encode("Blue.") + [tok.eos_id]


def test_the_response_loss_ignores_logits_at_prompt_and_padding_positions():
    tok = CharTokenizer()
    rows = [encode_example(tok, Instruction("Say hi.", "", "Hi!"), 128),
            encode_example(tok, Instruction("Add 2 and 2.", "and nothing else", "4"), 128)]
    batch = sft_batch(rows, tok.pad_id)
    logits = torch.randn(*batch["inputs"].shape, 210)
    expected = torch.nn.functional.cross_entropy(logits[batch["targets"] != IGNORE], batch["targets"][batch["targets"] != IGNORE])
    torch.testing.assert_close(response_loss(logits, batch["targets"]), expected)
    noisy = logits.clone()
    noisy[batch["targets"] == IGNORE] = torch.randn_like(noisy[batch["targets"] == IGNORE]) * 10
    torch.testing.assert_close(response_loss(noisy, batch["targets"]), expected)


def test_a_long_prompt_loses_its_start_and_a_long_response_is_cut():
    tok = CharTokenizer()
    row = Instruction("x" * 40, "", "y" * 100)
    prompt = tok.encode(render_prompt(row))
    ids, prompt_length = encode_example(tok, row, 40)
    assert prompt_length == 20 and ids[:20] == prompt[-20:]  # "### Response:\n" stays next to the answer
    assert len(ids) == 41 and ids[20:] == tok.encode("y" * 21)
    ids, prompt_length = encode_example(tok, row, 200)
    assert prompt_length == len(prompt) and ids == prompt + tok.encode("y" * 100) + [tok.eos_id]


@pytest.mark.parametrize("content, message", [
    ('[{"instruction": "a", "output": "b"', "is not valid JSON (line 1"),
    ('{"instruction": "a", "output": "b"}', "holds no rows"),
    ("[]", "holds no rows"),
    ('[{"instruction": "a", "output": "b"}, {"instruction": "c"}]', "row 2: missing field output"),
    ('[{"instruction": "a", "input": 3, "output": "b"}]', "row 1: field input must be a string"),
    ('["just text"]', "row 1: expected an object"),
])
def test_a_malformed_instruction_file_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(UserError, match="bad.json") as error:
        load_instructions(path)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_jsonl_rows_and_an_optional_input_are_read(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "input": "d", "output": "e"}\n')
    assert load_instructions(path) == [Instruction("a", "", "b"), Instruction("c", "d", "e")]
    assert "### Input:\nd" in render_prompt(Instruction("c", "d", "e"))


def test_sft_command_lowers_the_response_loss_and_answers_held_back_instructions(tmp_path, corpus_cache):
    # its own pre-trained model: SFT's prompt and response need a 256-token context (the session's has 32)
    cache = corpus_cache
    pre = tmp_path / "pre"
    run_in_process("train", "experiment=tiny", "model.block_size=256", "trainer.max_steps=5",
                   "scheduler.warmup_steps=1", "logger=csv", f"hydra.run.dir={pre}", cwd=tmp_path, cache=cache)
    ckpt = pre / "checkpoints" / "last.ckpt"
    out = tmp_path / "sft"
    proc = run_in_process("finetune", "task=sft", f"ckpt_path={ckpt}", "task.max_train_examples=300",
                          "task.val_examples=20", "max_length=256", "batch_size=8", "lr=3e-3", "warmup_steps=2",
                          "trainer.max_steps=40", "trainer.val_check_interval=40", "trainer.log_every_n_steps=1",
                          "task.generation.max_new_tokens=8", "logger=csv", f"hydra.run.dir={out}", cwd=tmp_path,
                          cache=cache)
    losses = step_losses(out)
    first, last = [losses[s] for s in sorted(losses)[:5]], [losses[s] for s in sorted(losses)[-5:]]
    assert sum(last) / 5 < 0.9 * sum(first) / 5, (first, last)
    record = json.loads((out / "run.json").read_text())
    assert record["task"] == "sft" and record["steps"] == 40
    rows = json.loads((SHARED_DATA / "alpaca" / "alpaca_data_1k.json").read_text())
    assert [a["instruction"] for a in record["heldout_answers"]] == [r["instruction"] for r in rows[-3:]]
    assert "answers to 3 held-back instructions:" in proc.stdout and "held-out response loss" in proc.stdout
    assert "trainable parameters" in proc.stdout  # as the README's finetune lines show

    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "a"}]')
    failed = run_in_process("finetune", "task=sft", f"ckpt_path={ckpt}", f"task.data_file={bad}", "logger=csv",
                            f"hydra.run.dir={tmp_path / 'bad'}", cwd=tmp_path, cache=cache, check=False)
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines()[-1] == f"error: instruction file {bad}, row 1: missing field output " \
        "(every row needs instruction and output; input is optional)"
