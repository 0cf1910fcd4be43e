"""A policy trained against a frozen copy of itself (the reference), as DPO and KTO do.

Training steps never run the reference: its log-probabilities of every training response are
computed once, before training (:func:`cache_reference_logprobs`), and travel in the batches.
Validation runs on held-out pairs and logs
- ``val/accuracy``, ``val/margin``, ``val/reward_chosen|rejected``: the implicit rewards
  β·(log π − log π_ref) of the chosen and rejected responses (accuracy: chosen > rejected);
- ``val/kl``: KL(π ‖ π_ref) to the reference, exact over the vocabulary at every response position
  of the held-out chosen responses (the prefixes are the data's, not samples), summed over the
  response, in nats per sequence; the reference runs here, on the held-out pairs only;
- ``val/logratio_chosen|rejected``: mean log π/π_ref of the held-out responses (nats per sequence).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchmetrics import MeanMetric

from lm_lightning.alignment.losses import response_kl, sequence_logprobs
from lm_lightning.alignment.preference import Example, collate
from lm_lightning.alignment.task import AlignmentTask


class PolicyTask(AlignmentTask):
    """Holds ``policy`` (trained in place) and a frozen deep copy of it taken at construction (the reference)."""

    def __init__(self, policy: nn.Module, beta: float, optimizer: Callable[..., Any] | None = None,
                 scheduler: Callable[..., Any] | None = None) -> None:
        super().__init__(optimizer, scheduler)
        self.save_hyperparameters(ignore=["policy", "optimizer", "scheduler"])
        self.policy = policy
        self.reference = copy.deepcopy(policy).requires_grad_(False).eval()
        self.beta = beta
        self.val_kl, self.val_logratio_chosen, self.val_logratio_rejected = MeanMetric(), MeanMetric(), MeanMetric()

    def trainable(self) -> nn.Module:
        return self.policy

    def train(self, mode: bool = True) -> PolicyTask:
        super().train(mode)
        self.reference.eval()  # the reference is a fixed function: no dropout, ever
        return self

    def policy_logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """log π of each sequence's response (S·B,), with gradient."""
        return sequence_logprobs(self.policy(batch["ids"]), batch["ids"], batch["response_mask"])

    @staticmethod
    def cached_reference(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "reference_logps" not in batch:
            raise RuntimeError("the batch carries no reference log-probabilities: call cache_reference_logprobs "
                               "on the training examples before fitting")
        return batch["reference_logps"]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        ids, mask = batch["ids"], batch["response_mask"]
        logits, reference_logits = self.policy(ids), self.reference(ids)
        logratio = sequence_logprobs(logits, ids, mask) - sequence_logprobs(reference_logits, ids, mask)
        chosen, rejected = logratio.chunk(2)
        n = chosen.numel()
        self.val_pairs(self.beta * chosen, self.beta * rejected)
        self.val_kl(response_kl(logits[:n], reference_logits[:n], mask[:n]))
        self.val_logratio_chosen(chosen)
        self.val_logratio_rejected(rejected)
        self.log_dict({**self.val_pairs.as_dict("val"), "val/kl": self.val_kl,
                       "val/logratio_chosen": self.val_logratio_chosen,
                       "val/logratio_rejected": self.val_logratio_rejected}, batch_size=n)


@torch.inference_mode()
def cache_reference_logprobs(reference: nn.Module, examples: Sequence[Example], batch_size: int, pad_id: int) -> int:
    """Fills ``example.reference_logps`` (one per slot) with the reference's response log-probabilities.
    Runs once, before training; returns the number of sequences scored."""
    was_training = reference.training
    reference.eval()
    scored = 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = collate(chunk, pad_id)
        logps = sequence_logprobs(reference(batch["ids"]), batch["ids"], batch["response_mask"])
        per_slot = logps.view(len(chunk[0].sequences), len(chunk))  # collate is slot-major
        for j, example in enumerate(chunk):
            example.reference_logps = per_slot[:, j].tolist()
        scored += logps.numel()
    reference.train(was_training)
    return scored


def save_policy_checkpoint(policy: nn.Module, pretrained_ckpt: str | Path, out: str | Path) -> Path:
    """The trained policy as a checkpoint of the pre-trained model's kind (its config and tokenizer,
    the new weights), so ``lm-lightning generate|evaluate ckpt_path=<out>`` read it like any other."""
    from lm_lightning.parallel.checkpoint import as_file
    from lm_lightning.training.checkpoint_io import load_checkpoint_file, save_checkpoint_file

    checkpoint = load_checkpoint_file(as_file(pretrained_ckpt), name=pretrained_ckpt)
    state = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("model.")}
    state.update({f"model.{k}": v.detach().cpu() for k, v in policy.state_dict().items()})
    checkpoint["state_dict"] = state
    for key in ("optimizer_states", "lr_schedulers", "loops", "callbacks"):  # a model, not a run to resume
        checkpoint.pop(key, None)
    return save_checkpoint_file(checkpoint, out)  # sealed: its SHA-256 inside, and a sidecar
