"""The optimizer's parameter groups, one per role a parameter plays in the model.

Roles decide what each optimizer does with a tensor: weight decay applies to matrices only; Muon orthogonalises the
updates of hidden matrices and leaves embeddings, the output head and vectors to AdamW; μP scales learning rates
per role with width. Each group carries its role under the key ``role`` and its learning-rate factor under
``lr_scale``, which torch's optimizers keep and ignore; :func:`apply_lr_scales` multiplies them into ``lr`` once.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lm_lightning.errors import UserError

#: in the order groups are built; a group is left out when the model has no parameter of its role
ROLES = ("hidden", "embedding", "head", "vector")


def parameter_roles(model: nn.Module) -> dict[str, str]:
    """Each trainable parameter's name → its role.

    embedding: weights of ``nn.Embedding`` modules (token, position, segment tables; a tied head is this table);
    head: the untied output projection (``lm_head``); vector: biases and norm gains (fewer than 2 dimensions);
    hidden: every other matrix (attention, feed-forward, recurrent weights).
    """
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "lm_head", None)
    head_ids = {id(head.weight)} if isinstance(head, nn.Linear) else set()
    roles = {}
    for name, p in model.named_parameters():  # a shared (tied) tensor appears once, under its first name
        if not p.requires_grad:
            continue
        if p.dim() < 2:
            roles[name] = "vector"
        elif id(p) in embedding_ids:
            roles[name] = "embedding"
        elif id(p) in head_ids:
            roles[name] = "head"
        else:
            roles[name] = "hidden"
    return roles


def lr_scales(model: nn.Module) -> dict[str, float]:
    """Each role's learning-rate factor: 1 under the standard parametrization; under μP with an Adam-type optimizer
    (Yang et al. 2021, Table 8, with the output multiplier 1/m) 1/m for hidden matrices, whose fan-in grows with the
    width m = n_embd / mup_base_width, so that their update moves each output coordinate by the same amount at
    every width; 1 for embeddings, vectors and the head (the model's output multiplier 1/m already scales its
    update)."""
    config = getattr(model, "config", None)
    m = config.width_multiplier() if hasattr(config, "width_multiplier") else 1.0
    return {role: 1.0 / m if role == "hidden" else 1.0 for role in ROLES}


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """One group per role present, matrices decayed, vectors not; each group names its ``role`` and ``lr_scale``."""
    roles = parameter_roles(model)
    scales = lr_scales(model)
    params = dict(model.named_parameters())
    groups = []
    for role in ROLES:
        members = [params[name] for name, r in roles.items() if r == role]
        if members:
            groups.append({"params": members, "weight_decay": 0.0 if role == "vector" else weight_decay, "role": role,
                           "lr_scale": scales[role],
                           "name": role})  # Lightning's LearningRateMonitor logs lr-<optimizer>/<name>
    return groups


def apply_lr_scales(optimizer: torch.optim.Optimizer) -> None:
    """Multiplies each group's ``lr`` by its ``lr_scale``, once, before a scheduler reads ``lr`` as its base.

    Groups of the roles an optimizer orthogonalises (``optimizer.orthogonalised_roles``: Muon's hidden matrices) get
    another factor: an orthogonalised update has spectral norm ``lr`` at every width, which is what μP asks of a square
    hidden matrix, so it needs none; Muon's ``adjust_lr_fn=match_rms_adamw`` multiplies it by 0.2·sqrt(max(rows,
    cols)), ∝ sqrt(m), which the square root of the 1/m factor undoes. A resumed run loads the scaled ``lr`` with the
    optimizer's state, so it is never scaled twice."""
    orthogonalised = getattr(optimizer, "orthogonalised_roles", frozenset())
    scaled = []
    for group in optimizer.param_groups:
        scale = group.get("lr_scale", 1.0)
        if group.get("role") in orthogonalised:
            scale = math.sqrt(scale) if group.get("adjust_lr_fn") == "match_rms_adamw" else 1.0
        if scale != 1.0:
            scaled.append((group, scale))
    if scaled and isinstance(optimizer, (torch.optim.SGD, torch.optim.Adafactor)):
        # SGD's μP factors differ (Yang et al. 2021, Table 3); Adafactor scales its steps by each tensor's norm
        raise UserError(f"model.parametrization=mup scales learning rates for Adam-type optimizers (adamw, adam, muon), "
                        f"not {type(optimizer).__name__}: choose one of those or model.parametrization=standard")
    for group, scale in scaled:
        group["lr"] = group["lr"] * scale
