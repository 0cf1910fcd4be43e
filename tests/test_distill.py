"""Knowledge distillation: the soft-target loss is Hinton et al.'s (T², alpha mix), alpha = 0 is ordinary
training, the teacher stays frozen and outside the student's checkpoint, hidden states are matched through
a learned projection, a teacher with another tokenizer is refused in one line, and the command runs."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from helpers import run_in_process
from lm_lightning.compression.distill import (
    DistillationConfig,
    DistillationTask,
    check_same_tokenizer,
    distillation_loss,
    soft_target_loss,
)
from lm_lightning.data.tokenizer import Tokenizer, train_tokenizer
from lm_lightning.cli.distill import distill
from lm_lightning.errors import UserError
from lm_lightning.models.gpt import build_gpt
from lm_lightning.training.loading import load_trained
from lm_lightning.tasks.language_model import LanguageModelTask

V = 24
OBJECTIVE = {"_target_": "lm_lightning.objectives.causal_lm.CausalLM"}


def gpt_config(n_layer: int, n_embd: int) -> dict:
    return {"_target_": "lm_lightning.models.gpt.build_gpt", "vocab_size": V, "block_size": 16, "n_layer": n_layer,
            "n_head": 2, "n_embd": n_embd}


def teacher(seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = gpt_config(3, 32)
    config.pop("_target_")
    return build_gpt(**config)


def student_task(task_class=DistillationTask, seed: int = 0) -> LanguageModelTask:
    torch.manual_seed(seed)
    return task_class(model=gpt_config(2, 16), objective=OBJECTIVE,
                      optimizer=functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1))


def batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (4, 13), generator=torch.Generator().manual_seed(seed))


def test_soft_target_loss_is_t_squared_kl_of_the_softened_distributions_mixed_by_alpha():
    T = 2.0
    # position 0: the teacher at T=2 gives (1/4, 1/2, 1/4), the student a uniform (1/3, 1/3, 1/3);
    # position 1: student and teacher agree, KL 0
    teacher_logits = torch.tensor([[T * math.log(1), T * math.log(2), T * math.log(1)], [0.3, -1.0, 2.0]])
    student_logits = torch.tensor([[5.0, 5.0, 5.0], [0.3, -1.0, 2.0]])
    kl = 0.25 * math.log(0.25 / (1 / 3)) + 0.5 * math.log(0.5 / (1 / 3)) + 0.25 * math.log(0.25 / (1 / 3))
    assert kl == pytest.approx(0.5 * math.log(1.125))
    expected_soft = T**2 * (kl + 0.0) / 2  # T² · mean KL over the two positions = 0.11778
    assert soft_target_loss(student_logits, teacher_logits, T).item() == pytest.approx(expected_soft, rel=1e-6)
    assert expected_soft == pytest.approx(0.117783, abs=1e-6)
    hard = torch.tensor(1.5)
    total, soft = distillation_loss(hard, student_logits, teacher_logits, temperature=T, alpha=0.25)
    assert soft.item() == pytest.approx(expected_soft, rel=1e-6)
    assert total.item() == pytest.approx(0.25 * expected_soft + 0.75 * 1.5, rel=1e-6)
    # (B, T, V) logits average over every position the same way
    assert soft_target_loss(student_logits[None], teacher_logits[None], T).item() == pytest.approx(expected_soft, rel=1e-6)


def test_with_alpha_zero_the_loss_and_gradients_are_plain_next_token_training():
    plain = student_task(LanguageModelTask)
    distilled = student_task().set_teacher(teacher(), DistillationConfig(temperature=3.0, alpha=0.0))
    assert torch.equal(plain.model.wte.weight, distilled.model.wte.weight)  # same seed, same student
    plain_loss, distilled_loss = plain.training_step(batch(), 0), distilled.training_step(batch(), 0)
    assert distilled_loss.item() == pytest.approx(plain_loss.item(), rel=1e-6)
    plain_loss.backward()
    distilled_loss.backward()
    for p, q in zip(plain.model.parameters(), distilled.model.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    # and alpha = 1 follows the teacher alone: the loss is the soft-target term
    only_soft = student_task().set_teacher(teacher(), DistillationConfig(temperature=3.0, alpha=1.0))
    inputs = batch()[:, :-1]
    with torch.no_grad():
        expected = soft_target_loss(only_soft.model(inputs), teacher()(inputs), 3.0)
    assert only_soft.training_step(batch(), 0).item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_teacher_gets_no_gradient_stays_in_eval_mode_and_is_not_part_of_the_student():
    frozen = teacher()
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    task = student_task().set_teacher(frozen, DistillationConfig(alpha=0.7))
    optimizer = task.configure_optimizers()
    task.train()  # Lightning puts the task in training mode at every epoch and after each validation
    student_before = task.model.wte.weight.detach().clone()
    for step in range(3):
        optimizer.zero_grad()
        task.training_step(batch(step), step).backward()
        optimizer.step()
    assert not frozen.training and all(not m.training for m in frozen.modules())
    assert all(p.grad is None and not p.requires_grad for p in frozen.parameters())
    for k, v in frozen.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(task.model.wte.weight, student_before)  # the student did learn
    teacher_ids = {id(p) for p in frozen.parameters()}
    assert not teacher_ids & {id(p) for p in task.parameters()}
    assert not teacher_ids & {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(k.startswith("model.") for k in task.state_dict())


def test_hidden_states_are_matched_through_a_learned_projection_that_trains_and_stays_out_of_the_student():
    frozen = teacher()
    config = DistillationConfig(alpha=0.5, hidden_weight=2.0, hidden_layers=[[-1, -1], [0, 1]])
    task = student_task().set_teacher(frozen, config)
    assert [tuple(p.weight.shape) for p in task.hidden_match.projections] == [(32, 16), (32, 16)]  # student → teacher width
    without = student_task().set_teacher(teacher(), DistillationConfig(alpha=0.5))
    loss, loss_without = task.training_step(batch(), 0), without.training_step(batch(), 0)

    def block_outputs(model, idx):  # the residual stream after each block, as the GPT computes it
        x = model.wte(idx) + model.wpe(torch.arange(idx.size(1)))
        outputs = []
        for block in model.h:
            x = block(x)
            outputs.append(x)
        return outputs

    inputs = batch()[:, :-1]
    s, t = block_outputs(task.model, inputs), block_outputs(frozen, inputs)
    p0, p1 = task.hidden_match.projections
    hidden = (torch.nn.functional.mse_loss(p0(s[-1]), t[-1]) + torch.nn.functional.mse_loss(p1(s[0]), t[1])) / 2
    assert loss.item() == pytest.approx(loss_without.item() + 2.0 * hidden.item(), rel=1e-5)
    optimizer = task.configure_optimizers()
    assert {id(p) for p in task.hidden_match.parameters()} <= {id(p) for g in optimizer.param_groups for p in g["params"]}
    loss.backward()
    assert all(p.weight.grad.abs().sum() > 0 for p in task.hidden_match.projections)
    checkpoint = {"state_dict": task.state_dict()}
    task.on_save_checkpoint(checkpoint)  # the student's state dict alone; the projections beside it
    assert all(k.startswith("model.") for k in checkpoint["state_dict"])
    assert set(checkpoint["distillation"]["hidden_match"]) == {"hidden_match.projections.0.weight",
                                                               "hidden_match.projections.1.weight"}
    with pytest.raises(UserError, match="the student has 2 blocks, no block 5"):
        student_task().set_teacher(teacher(), DistillationConfig(hidden_weight=1.0, hidden_layers=[[5, 0]]))


def test_bad_settings_are_refused_with_the_option_named():
    with pytest.raises(UserError, match=r"distill.alpha=1.5 must be in \[0, 1\]"):
        DistillationConfig(alpha=1.5)
    with pytest.raises(UserError, match="distill.temperature=0"):
        DistillationConfig(temperature=0)
    small_vocab = build_gpt(vocab_size=V - 1, block_size=16, n_layer=1, n_head=2, n_embd=16)
    with pytest.raises(UserError, match=f"the teacher predicts over {V - 1} tokens, the student over {V}"):
        student_task().set_teacher(small_vocab, DistillationConfig())


def _char_tokenizer(tmp_path, name: str, text: str) -> Tokenizer:
    config = {"type": "char", "num_threads": 1, "verbose": False}
    return Tokenizer.load(train_tokenizer([text], config, tmp_path / name))


def test_a_teacher_with_another_tokenizer_is_refused_in_one_line(tmp_path):
    teacher_tok = _char_tokenizer(tmp_path, "teacher", "the cat sat on the mat\n" * 20)
    same = _char_tokenizer(tmp_path, "same", "the cat sat on the mat\n" * 20)
    check_same_tokenizer(teacher_tok, same.path.read_bytes(), "teacher.ckpt")  # the same vocabulary: accepted
    other_size = _char_tokenizer(tmp_path, "bigger", "the cat sat on the mat!\n" * 20)  # one piece more
    with pytest.raises(UserError) as err:
        check_same_tokenizer(teacher_tok, other_size.path.read_bytes(), "teacher.ckpt")
    message = str(err.value)
    assert "\n" not in message and "(15 pieces, the data's 16)" in message
    assert message.startswith("the teacher teacher.ckpt has another tokenizer than the data (")
    assert "the data= and tokenizer= settings of the teacher's run" in message
    swapped = _char_tokenizer(tmp_path, "swapped", "the cat sat on the pat\n" * 20)  # as many pieces, one differs
    assert swapped.vocab_size == teacher_tok.vocab_size
    with pytest.raises(UserError, match="pieces differ"):
        check_same_tokenizer(teacher_tok, swapped.path.read_bytes(), "teacher.ckpt")


def test_distill_command_trains_a_student_from_a_teacher_checkpoint(tmp_path, tiny_checkpoint, corpus_cache):
    cache = corpus_cache
    common = ["experiment=tiny", "logger=csv", "num_threads=1", "scheduler.warmup_steps=1", "trainer.max_steps=6",
              "trainer.val_check_interval=6", "trainer.limit_val_batches=2", "sample.max_new_tokens=0"]
    teacher_ckpt = tiny_checkpoint  # experiment=tiny: the student's data and tokenizer
    student_dir = tmp_path / "student"
    proc = run_in_process("distill", *common, f"teacher_ckpt={teacher_ckpt}", "model.n_layer=1", "model.n_embd=16",
                          "distill.hidden_weight=1.0", "distill.temperature=2.0", "distill.alpha=0.5",
                          f"hydra.run.dir={student_dir}", cwd=tmp_path, cache=cache)
    assert "distilled from" in proc.stdout and "temperature 2.0, alpha 0.5, hidden_weight 1.0" in proc.stdout
    record = json.loads((student_dir / "run.json").read_text())
    assert record["steps"] == 6 and record["status"] == "finished"
    assert record["teacher"]["parameters"]["total"] > 4 * record["parameters"]["total"]
    final = record["final"]
    assert {"val/loss", "val/perplexity", "val/bpb", "val/kd_loss", "val/teacher_loss"} <= set(final)
    header = next((student_dir / "csv").glob("version_*/metrics.csv")).read_text().splitlines()[0].split(",")
    assert {"train/loss", "train/kd_loss", "train/hidden_loss", "train/total_loss"} <= set(header)
    student, _ = load_trained(str(student_dir / "checkpoints" / "last.ckpt"))  # a plain student checkpoint
    assert type(student) is LanguageModelTask and student.model.config.n_layer == 1


def test_a_missing_teacher_is_named_in_one_line(tmp_path):
    with pytest.raises(UserError, match=r"^teacher_ckpt is required: lm-lightning distill teacher_ckpt="):
        distill(OmegaConf.create({"teacher_ckpt": "???", "distill": {}}))
    missing = tmp_path / "none.ckpt"
    with pytest.raises(UserError, match=f"^teacher_ckpt={missing} not found: pass a checkpoint of lm-lightning train$"):
        distill(OmegaConf.create({"teacher_ckpt": str(missing), "distill": {}}))
