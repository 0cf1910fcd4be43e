"""A reward model: a pre-trained decoder with a scalar head on its last real token, trained on
preference pairs with the Bradley–Terry loss; and the loader the RL methods score samples with."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import hydra
import torch
from torch import nn

from lm_lightning.adaptation.classification import SequenceClassifier
from lm_lightning.alignment.losses import bradley_terry_loss
from lm_lightning.alignment.task import AlignmentTask
from lm_lightning.errors import UserError


class RewardModel(SequenceClassifier):
    """Token ids (B, T) right-padded, with lengths (B,) → rewards (B,): a linear head on the hidden
    state of the last real token (a sequence ends with end-of-sequence, so that is where it reads)."""

    def __init__(self, backbone: nn.Module, dropout: float = 0.0) -> None:
        super().__init__(backbone, n_classes=1, dropout=dropout)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return super().forward(ids, lengths).squeeze(-1)


class RewardModelTask(AlignmentTask):
    """Trains a RewardModel on batches of pairs (chosen rows, then rejected rows) with −log σ(r_c − r_r);
    logs pairwise accuracy, mean reward margin and the mean reward of each side, train and val."""

    def __init__(self, model: Mapping, dropout: float = 0.0, optimizer: Callable[..., Any] | None = None,
                 scheduler: Callable[..., Any] | None = None, backbone_state: Mapping[str, torch.Tensor] | None = None,
                 tokenizer_model: bytes | None = None) -> None:
        """``model``: the backbone's Hydra config; ``backbone_state``: its pre-trained weights;
        ``tokenizer_model``: the sentencepiece model bytes, saved inside the checkpoint."""
        super().__init__(optimizer, scheduler)
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "backbone_state", "tokenizer_model"])
        backbone = hydra.utils.instantiate(dict(model))
        if backbone_state is not None:
            backbone.load_state_dict(backbone_state)
        self.reward_model = RewardModel(backbone, dropout)
        self.tokenizer_model = tokenizer_model

    def trainable(self) -> nn.Module:
        return self.reward_model

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.reward_model(ids, lengths)

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        chosen, rejected = self(batch["ids"], batch["lengths"]).chunk(2)
        loss = bradley_terry_loss(chosen, rejected).mean()
        metrics = self.train_pairs if stage == "train" else self.val_pairs
        metrics(chosen, rejected)
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=chosen.numel())
        self.log_dict(metrics.as_dict(stage), prog_bar=stage == "val", batch_size=chosen.numel())
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tokenizer_model"] = self.tokenizer_model  # the reward model scores text in this tokenizer
        checkpoint["reward_model"] = True


def tokenizer_from_bytes(data: bytes):
    """The tokenizer of the bytes a checkpoint carries (a sentencepiece model or a tokenizer.json)."""
    from lm_lightning.data.tokenizer import load_tokenizer

    return load_tokenizer(data)


def require_same_tokenizer(reward_tokenizer, policy_tokenizer, reward_path: str | Path, policy_path: str | Path) -> None:
    """A reward model reads the policy's token ids, so both must use the same sentencepiece model
    (compared by the SHA-256 of its bytes); otherwise one UserError naming both checkpoints."""
    if reward_tokenizer.sha256 != policy_tokenizer.sha256:
        raise UserError(f"reward model {reward_path} uses a different tokenizer (sentencepiece sha256 "
                        f"{reward_tokenizer.sha256[:12]}) from the policy {policy_path} ({policy_tokenizer.sha256[:12]}): "
                        "train the reward model from the policy's checkpoint (lm-lightning align method=reward_model "
                        "ckpt_path=<policy.ckpt>)")


def load_reward_model(ckpt_path: str | Path, policy_tokenizer=None, policy_path: str | Path = "") -> tuple[RewardModel, Any]:
    """(RewardModel in eval mode on CPU, its Tokenizer) from a checkpoint written by
    ``lm-lightning align method=reward_model``. With ``policy_tokenizer``, the two tokenizers must match."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise UserError(f"reward model checkpoint not found: {path} (train one with lm-lightning align method=reward_model)")
    from lm_lightning.training.checkpoint_io import load_checkpoint_file

    try:
        checkpoint = load_checkpoint_file(path)
    except UserError:
        raise
    except Exception as err:  # a truncated or foreign file fails in many ways inside torch.load
        raise UserError(f"reward model checkpoint {path} could not be loaded ({type(err).__name__}: {err})") from err
    if not isinstance(checkpoint, dict) or not checkpoint.get("reward_model"):
        raise UserError(f"{path} is not a reward model checkpoint (train one with lm-lightning align method=reward_model)")
    task = RewardModelTask(**checkpoint["hyper_parameters"])
    task.load_state_dict(checkpoint["state_dict"])
    tokenizer = tokenizer_from_bytes(checkpoint["tokenizer_model"])
    if policy_tokenizer is not None:
        require_same_tokenizer(tokenizer, policy_tokenizer, path, policy_path)
    return task.reward_model.eval(), tokenizer
