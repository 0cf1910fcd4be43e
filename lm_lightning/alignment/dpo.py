"""Direct Preference Optimization (Rafailov et al. 2023): the policy learns from preference pairs
directly, the Bradley–Terry loss on its implicit rewards β·(log π − log π_ref)."""

from __future__ import annotations

import torch

from lm_lightning.alignment.losses import dpo_loss
from lm_lightning.alignment.policy import PolicyTask


class DPOTask(PolicyTask):
    """Batches of pairs (chosen rows, then rejected rows) with the reference's log-probabilities cached
    in them. Logs ``train/loss``, the implicit-reward ``train/accuracy``, ``train/margin``,
    ``train/reward_chosen|rejected`` and ``train/logratio_chosen`` (mean log π/π_ref of the chosen
    responses); validation as in :class:`PolicyTask`."""

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        policy_chosen, policy_rejected = self.policy_logprobs(batch).chunk(2)
        reference_chosen, reference_rejected = self.cached_reference(batch).chunk(2)
        losses, chosen, rejected = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, self.beta)
        loss, n = losses.mean(), chosen.numel()
        self.train_pairs(chosen, rejected)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log_dict(self.train_pairs.as_dict("train"), batch_size=n)
        self.log("train/logratio_chosen", (policy_chosen - reference_chosen).mean().detach(), batch_size=n)
        return loss
