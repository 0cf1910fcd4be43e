"""What the training task, generation and the compute accounting read from every model family, and what
each family declares it can do (read by ``models/capabilities.py``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from enum import Enum
from typing import Any, ClassVar

import torch
from torch import nn

from lm_lightning.models.counting import ParameterCount, count_parameters, training_flops_per_token
from lm_lightning.models.layers import moe_aux_loss, moe_inactive_parameters


class Trait(str, Enum):
    """What a model family does with its input: each objective ``requires`` some, each family ``meets`` some."""

    CAUSAL = "causal"  # model(ids) → (B, T, V) next-token logits; position t reads tokens ≤ t
    PREFIX = "prefix"  # model(ids, prefix_lengths=(B,)) reads each row's prefix bidirectionally, the rest causally
    BIDIRECTIONAL = "bidirectional"  # model(ids) → (B, T, V) logits, every position reading the whole window
    SENTENCE_PAIR = "sentence_pair"  # model(ids, segment_ids=, return_pooled=True) also → (B, 2) logits from [CLS]
    ENCODER_DECODER = "encoder_decoder"  # model(src (B, S), tgt_in (B, T)) → (B, T, V) decoder logits


class LanguageModel(nn.Module):
    """Base of every family. A subclass has a ``config`` dataclass (``vocab_size``, ``block_size``,
    ``n_embd``, ``family``) and names its lookup tables in :meth:`embedding_tables`; parameter
    counts, FLOPs, the MoE loss and ``describe()`` then follow in one place.

    It declares what it can do, and nothing elsewhere lists it: ``families``, ``config_class``,
    ``block_lists``, and — by defining it — ``features(idx) → (B, T, n_embd)``, the hidden states that
    task heads (classification, reward, value) read. ``_target_: <module>.<Class>.build`` in a
    ``conf/model/`` YAML then makes the family trainable, in the grid and in every eligibility check."""

    config: Any
    #: family name → the objective requirements it meets; the config's ``family`` (see :meth:`family_key`) picks one
    families: ClassVar[Mapping[str, frozenset[Trait]]] = {}
    #: the dataclass the model is built from; its ``__post_init__`` checks every option (also when a config is composed)
    config_class: ClassVar[type]
    #: attributes holding the repeated blocks (nn.ModuleList), in forward order: FSDP2 shards each block and
    #: compiles each on its own; () for a model without blocks (FSDP2 refuses it)
    block_lists: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def build(cls, **fields: Any) -> LanguageModel:
        """Hydra entry point (``_target_`` of a conf/model YAML): the model of the config dataclass of ``fields``."""
        return cls(cls.config_class(**fields))

    @classmethod
    def family_key(cls, fields: Mapping[str, Any]) -> str:
        """The key of ``families`` that a config's fields build: its ``family``."""
        return str(fields["family"])

    @property
    def traits(self) -> frozenset[Trait]:
        """The objective requirements this model's family meets."""
        return self.families[self.family_key(vars(self.config))]

    @property
    def causal(self) -> bool:
        """Logits at t depend on tokens ≤ t only (without a prefix): a left-to-right, generative LM."""
        return Trait.CAUSAL in self.traits

    def blocks(self) -> list[nn.Module]:
        """The repeated blocks of every list in ``block_lists``, in forward order."""
        return [block for name in self.block_lists for block in getattr(self, name)]

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

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from final hidden states (what ``forward`` applies after ``features``): callers that read the
        hidden states themselves (PPO's value head, soft prompts) get the same logits as ``forward``."""
        return self.lm_head(hidden)

    def aux_loss(self) -> torch.Tensor | None:
        """Mean MoE load-balancing loss of the latest forward; None for a dense model."""
        return moe_aux_loss(self)

    @property
    def context_length(self) -> int:
        return self.config.block_size

    def describe(self) -> dict:
        return {"architecture": self.config.family, **asdict(self.config), **self.parameter_count().as_dict()}
