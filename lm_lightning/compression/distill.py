"""Knowledge distillation: a frozen teacher's softened next-token distribution (Hinton, Vinyals & Dean 2015)
and, optionally, its hidden states (through a learned projection, as FitNets and TinyBERT) added to a student's
next-token loss.

    loss = alpha · T² · KL(softmax(z_teacher / T) ‖ softmax(z_student / T)) + (1 − alpha) · CE(z_student, next token)
           + hidden_weight · mean over layer pairs of MSE(W · h_student, h_teacher)

The T² keeps the soft term's gradients the same size whatever the temperature (they shrink as 1/T²).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from lm_lightning.data.tokenizer import Tokenizer, load_tokenizer
from lm_lightning.errors import UserError
from lm_lightning.objectives.base import token_nll
from lm_lightning.tasks.language_model import LanguageModelTask, weight_decay_groups
from lm_lightning.tasks.metrics import LanguageModelMetrics


@dataclass
class DistillationConfig:
    """The ``distill`` node of conf/distill.yaml."""

    temperature: float = 1.0  # T > 0: softmax(logits / T) for teacher and student
    alpha: float = 0.9  # weight of the soft-target loss; 1 − alpha weights the next-token (hard-label) loss
    hidden_weight: float = 0.0  # weight of the hidden-state loss; 0 = off
    hidden_layers: Sequence[Sequence[int]] = field(default_factory=lambda: [(-1, -1)])  # (student, teacher) blocks

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise UserError(f"distill.temperature={self.temperature} must be positive")
        if not 0.0 <= self.alpha <= 1.0:
            raise UserError(f"distill.alpha={self.alpha} must be in [0, 1] (the soft-target share of the loss)")
        if self.hidden_weight < 0:
            raise UserError(f"distill.hidden_weight={self.hidden_weight} must be 0 (off) or positive")
        if self.hidden_weight and (not self.hidden_layers or any(len(pair) != 2 for pair in self.hidden_layers)):
            raise UserError(f"distill.hidden_layers={list(self.hidden_layers)} must list "
                            "[student block, teacher block] pairs")


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher / T) ‖ softmax(student / T)), summed over the vocabulary and averaged over
    positions, nats. Logits (..., V); computed in float32."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_q.reshape(-1, log_q.size(-1)), log_p.reshape(-1, log_p.size(-1)), log_target=True,
                  reduction="batchmean")  # batchmean over the flattened positions: the mean KL per position
    return temperature**2 * kl


def distillation_loss(hard_loss: torch.Tensor, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha · soft + (1 − alpha) · hard, soft): the mixed loss and its soft-target term, nats per position."""
    soft = soft_target_loss(student_logits, teacher_logits, temperature)
    return alpha * soft + (1.0 - alpha) * hard_loss, soft


class HiddenStateMatch(nn.Module):
    """Mean over layer pairs of MSE(W_i · h_student_i, h_teacher_i); one learned linear map W_i
    (student width → teacher width, no bias) per pair. States (B, T, width)."""

    def __init__(self, student_width: int, teacher_width: int, n_pairs: int) -> None:
        super().__init__()
        self.projections = nn.ModuleList(nn.Linear(student_width, teacher_width, bias=False) for _ in range(n_pairs))

    def forward(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
        losses = [F.mse_loss(project(s).float(), t.float())
                  for project, s, t in zip(self.projections, student, teacher)]
        return torch.stack(losses).mean()


def check_same_tokenizer(teacher: Tokenizer, data_tokenizer_model: bytes, teacher_ckpt: str) -> None:
    """Raises a UserError unless the data's tokenizer has the teacher's vocabulary, piece for piece:
    the student reads the same token ids and predicts over the same vocabulary as the teacher."""
    data = load_tokenizer(data_tokenizer_model)
    if data.vocab_size != teacher.vocab_size:
        differ = f"{teacher.vocab_size} pieces, the data's {data.vocab_size}"
    else:
        n = sum(teacher.id_to_token(i) != data.id_to_token(i) for i in range(data.vocab_size))
        if not n:
            return
        differ = f"{n} of its {data.vocab_size} pieces differ"
    raise UserError(f"the teacher {teacher_ckpt} has another tokenizer than the data ({differ}): distill on the "
                    "teacher's corpus with its tokenizer, i.e. the data= and tokenizer= settings of the teacher's run")


def _blocks(model: nn.Module, name: str) -> nn.ModuleList:
    blocks = getattr(model, "h", None)
    if not isinstance(blocks, nn.ModuleList):
        raise UserError(f"distill.hidden_weight > 0 needs transformer blocks (model.h) in the {name}; "
                        f"{type(model).__name__} has none: set distill.hidden_weight=0")
    return blocks


def _block(blocks: nn.ModuleList, index: int, name: str) -> nn.Module:
    if not -len(blocks) <= index < len(blocks):
        raise UserError(f"distill.hidden_layers: the {name} has {len(blocks)} blocks, no block {index}")
    return blocks[index]


class DistillationTask(LanguageModelTask):
    """LanguageModelTask (same arguments, objective, metrics, optimizer, schedule) whose training loss adds
    a frozen teacher's soft targets, and optionally its hidden states; give it the teacher with
    :meth:`set_teacher` before fitting.

    The teacher is not a submodule: it stays out of ``parameters()``, ``state_dict()`` and Lightning's
    ``train()`` calls (it is always in eval mode), and the hyperparameters are the parent's, so a distilled
    student's checkpoint is a plain LanguageModelTask's that evaluate, generate and finetune read. The
    hidden-state projections travel in the checkpoint beside the state dict, under ``"distillation"``.

    Metrics beyond the parent's: ``train/kd_loss`` (the soft-target term), ``train/hidden_loss``,
    ``train/total_loss`` (what is minimised; ``train/loss`` stays the next-token cross-entropy, as in
    ``train``), and on the validation batches ``val/kd_loss`` and ``val/teacher_loss`` (the teacher's own
    cross-entropy). The throughput monitor counts the student's FLOPs only.
    """

    teacher: nn.Module | None = None  # set by set_teacher

    def set_teacher(self, teacher: nn.Module, config: DistillationConfig) -> DistillationTask:
        """Freezes ``teacher`` (same vocabulary, context ≥ the student's) and records what the loss reads
        with forward hooks: the student's inputs and logits, and the chosen blocks' outputs (B, T, width)."""
        if getattr(self.objective, "name", None) != "causal_lm":
            raise UserError("distillation trains a next-token student: objective=causal_lm, "
                            f"not {self.objective.name}")
        if not getattr(teacher, "causal", False):
            raise UserError(f"the teacher must be a causal language model (gpt), not {type(teacher).__name__}")
        if teacher.config.vocab_size != self.model.config.vocab_size:
            raise UserError(f"the teacher predicts over {teacher.config.vocab_size} tokens, the student over "
                            f"{self.model.config.vocab_size}: use the teacher's tokenizer")
        if teacher.context_length < self.model.context_length:
            raise UserError(f"the teacher reads {teacher.context_length} tokens, fewer than the student's "
                            f"model.block_size={self.model.context_length}: lower model.block_size")
        self.distill_config = config
        teacher.eval().requires_grad_(False)
        object.__setattr__(self, "teacher", teacher)  # not registered as a submodule (see the class docstring)
        self._recorded: dict[str, Any] = {}
        self.model.register_forward_hook(self._record_student)
        self.hidden_match: HiddenStateMatch | None = None
        if config.hidden_weight:
            student_blocks, teacher_blocks = _blocks(self.model, "student"), _blocks(teacher, "teacher")
            pairs = [(_block(student_blocks, s, "student"), _block(teacher_blocks, t, "teacher"))
                     for s, t in config.hidden_layers]
            for i, (student_block, teacher_block) in enumerate(pairs):
                student_block.register_forward_hook(self._recorder(f"student_hidden_{i}"))
                teacher_block.register_forward_hook(self._recorder(f"teacher_hidden_{i}"))
            self.hidden_match = HiddenStateMatch(self.model.config.n_embd, teacher.config.n_embd, len(pairs))
        self.val_kd = MeanMetric()
        self.teacher_val_metrics = LanguageModelMetrics()
        return self

    def _record_student(self, module: nn.Module, args: tuple, logits: torch.Tensor) -> None:
        self._recorded["inputs"], self._recorded["logits"] = args[0], logits

    def _recorder(self, key: str):
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self._recorded[key] = output
        return record

    def _hidden(self, who: str) -> list[torch.Tensor]:
        return [self._recorded.pop(f"{who}_hidden_{i}") for i in range(len(self.distill_config.hidden_layers))]

    def _teacher_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.teacher is None:
            raise RuntimeError("DistillationTask needs its teacher: call set_teacher(teacher, config) first")
        self.teacher.to(inputs.device)  # a no-op once there; the teacher is not moved with the task
        with torch.no_grad():
            return self.teacher(inputs)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        # the parent runs the objective and logs its loss and metrics; the hooks keep the student's inputs and logits
        hard = super().training_step(batch, batch_idx)
        logits = self._recorded.pop("logits")
        teacher_logits = self._teacher_logits(self._recorded.pop("inputs"))
        config = self.distill_config
        loss, soft = distillation_loss(hard, logits, teacher_logits, config.temperature, config.alpha)
        hidden = None
        if self.hidden_match is not None:
            hidden = self.hidden_match(self._hidden("student"), self._hidden("teacher"))
            loss = loss + config.hidden_weight * hidden
        if self._step_reaches_loggers:
            self.log_dict({"train/kd_loss": soft.detach(), "train/total_loss": loss.detach()})
            if hidden is not None:
                self.log("train/hidden_loss", hidden.detach())
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        logits = self._recorded.pop("logits")
        teacher_logits = self._teacher_logits(self._recorded.pop("inputs"))
        self._recorded.clear()  # hidden states, unused here
        soft = soft_target_loss(logits, teacher_logits, self.distill_config.temperature)
        self.val_kd.update(soft, weight=logits.shape[:-1].numel())  # a mean over positions
        self.teacher_val_metrics.update(*token_nll(teacher_logits, batch[:, 1:]))

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        metrics = {"val/kd_loss": self.val_kd.compute(),
                   "val/teacher_loss": self.teacher_val_metrics.compute()["loss"]}
        self.val_kd.reset()
        self.teacher_val_metrics.reset()
        self.log_dict(metrics, sync_dist=False)

    def configure_optimizers(self) -> Any:
        if self.hidden_match is None:
            return super().configure_optimizers()
        # the parent optimises self.model; the projections train with it, under the same groups and schedule
        weight_decay = getattr(self.optimizer_factory, "keywords", {}).get("weight_decay", 0.0)
        optimizer = self.optimizer_factory(params=weight_decay_groups(nn.ModuleList([self.model, self.hidden_match]),
                                                                      weight_decay))
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer=optimizer),
                                                         "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        # the state dict stays the student's alone; the projections are kept beside it, for a resumed run
        state = checkpoint["state_dict"]
        projections = {k: state.pop(k) for k in [k for k in state if k.startswith("hidden_match.")]}
        checkpoint["distillation"] = {"config": vars(self.distill_config), "hidden_match": projections}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        checkpoint["state_dict"].update(checkpoint.get("distillation", {}).get("hidden_match", {}))
