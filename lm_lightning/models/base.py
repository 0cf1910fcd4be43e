"""What the training task, generation and the compute accounting read from every model family."""

from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn

from lm_lightning.models.counting import ParameterCount, count_parameters, training_flops_per_token
from lm_lightning.models.layers import moe_aux_loss, moe_inactive_parameters


class LanguageModel(nn.Module):
    """Base of every family. A subclass has a ``config`` dataclass (``vocab_size``, ``block_size``,
    ``n_embd``, ``family``) and names its lookup tables in :meth:`embedding_tables`; parameter
    counts, FLOPs, the MoE loss and ``describe()`` then follow in one place."""

    config: object

    def embedding_tables(self) -> list[nn.Module]:
        """Token and position tables and the output head (a vocabulary table too; tied, it counts once)."""
        raise NotImplementedError

    def attention_layers(self) -> int:
        """Layers whose attention costs 12·d·context FLOPs per token (0 without attention)."""
        return self.config.n_layer

    def parameter_count(self) -> ParameterCount:
        return count_parameters(self, self.embedding_tables(), moe_inactive_parameters(self))

    def flops_per_token(self, context: int | None = None) -> int:
        """Training FLOPs (forward + backward) per token at the given (default: full) context."""
        c = self.config
        return training_flops_per_token(self.parameter_count().active_non_embedding, c.n_embd * c.vocab_size,
                                        self.attention_layers(), c.n_embd, context or c.block_size)

    def aux_loss(self) -> torch.Tensor | None:
        """Mean MoE load-balancing loss of the latest forward; None for a dense model."""
        return moe_aux_loss(self)

    @property
    def context_length(self) -> int:
        return self.config.block_size

    def describe(self) -> dict:
        return {"architecture": self.config.family, **asdict(self.config), **self.parameter_count().as_dict()}
