"""Parameter and FLOP accounting, in one place (SPEC §2, §8).

Conventions (Kaplan et al. 2020; Chowdhery et al. 2022):
- embedding parameters: the token table, any learned position table and the output head
  (a vocabulary table too); a tied head shares the token table and is counted once;
- non-embedding N = total - embedding (N ≈ 12·n_layer·d² for the standard GPT shape);
- training FLOPs per token = 6·(N + output-head matmul) + 12·n_layer·d·T, where the last
  term is attention's QKᵀ and AV over a context of T tokens (forward 2, backward 4).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn


@dataclass(frozen=True)
class ParameterCount:
    """Parameter counts of a model, in parameters."""

    total: int
    embedding: int
    non_embedding: int
    active: int  # used per token: total minus the experts a token is not routed to (= total for dense models)

    @property
    def active_non_embedding(self) -> int:
        return self.active - self.embedding

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def count_parameters(model: nn.Module, embedding_modules: list[nn.Module], inactive: int = 0) -> ParameterCount:
    """Counts unique parameters (tied weights once); ``embedding_modules`` are the lookup tables,
    ``inactive`` the parameters a token does not use (Mixture-of-Experts)."""
    unique = {id(p): p for p in model.parameters()}
    embedding = {id(p): p for m in embedding_modules for p in m.parameters()}
    total = sum(p.numel() for p in unique.values())
    n_embedding = sum(p.numel() for p in embedding.values())
    return ParameterCount(total=total, embedding=n_embedding, non_embedding=total - n_embedding, active=total - inactive)


def training_flops_per_token(non_embedding: int, head: int, n_layer: int, d_model: int, context: int) -> int:
    """Forward + backward FLOPs for one token of a sequence of ``context`` tokens.

    ``head`` is the number of weights in the output projection to the vocabulary (d·V), a
    matmul every token pays for even when it is tied to the embedding table.
    """
    return 6 * (non_embedding + head) + 12 * n_layer * d_model * context
