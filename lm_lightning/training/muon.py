"""Muon on hidden matrices and AdamW on everything else, as one optimizer (``optimizer=muon``).

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"; Liu et al. 2025, "Muon is scalable for LLM
training") replaces the update of a 2-D hidden weight by its momentum orthogonalised with a Newton–Schulz iteration;
embeddings, the output head and vectors (biases, norm gains) are not what it is for and keep AdamW. modded-nanogpt
and nanochat pair them the same way. Both halves run torch's own code (``torch.optim.Muon``, ``torch.optim.AdamW``):
this class only routes each parameter group to one of them, so there is one ``param_groups`` list, one state and one
``state_dict`` that Lightning checkpoints, resumes and schedules as it does any optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from lm_lightning.errors import UserError


class MuonAdamW(Optimizer):
    """Muon for the groups whose ``role`` is ``hidden``, AdamW for the other groups (``lm_lightning.tasks.param_groups``).

    Which half updates a group is its key ``use_muon``: given by the caller, or else decided from the group's ``role``
    (``hidden``: Muon); a group with neither is refused, since a plain list of matrices cannot tell an embedding table
    (AdamW's) from a hidden matrix. A group that goes to Muon must hold 2-D tensors only. Recurrent models' matrices
    (RNN, LSTM and GRU weights, the gates stacked in one matrix, as torch stores them) are hidden and go to Muon; a
    model with no hidden matrix trains with AdamW alone.

    Learning rate: Muon's orthogonalised update is rescaled by ``adjust_lr_fn``; the default ``match_rms_adamw``
    (Liu et al. 2025: 0.2·√max(rows, cols)) gives it AdamW's update RMS, so ``lr`` and ``weight_decay`` tuned for AdamW
    carry over and one ``lr`` serves both halves (the experiments' ``optimizer.lr`` applies unchanged); ``original``
    is Keller Jordan's √max(1, rows/cols), which wants lr ≈ 0.02. ``adamw_lr`` / ``adamw_weight_decay`` set the AdamW
    half apart from Muon's. A group's own ``lr`` (set before construction) wins; a group's ``weight_decay`` of 0 (the
    vectors') is kept. ``betas`` and ``eps`` are AdamW's (named as in AdamW so that experiments' ``optimizer.betas``
    apply); Muon's momentum is ``momentum``.

    Every group dict in ``param_groups`` is the one its half steps with: changing its ``lr`` (an LR scheduler, μP's
    per-role multipliers) changes the step.
    """

    #: roles whose updates are orthogonalised, their scale set here rather than by μP's per-role lr multipliers: with
    #: adjust_lr_fn=original a square matrix's update has spectral norm lr at any width (μP's spectral condition);
    #: match_rms_adamw's 0.2·√max(rows, cols) grows it as √width, so μP transfer wants original
    orthogonalised_roles = frozenset({"hidden"})

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_coefficients: Sequence[float] = (3.4445, -4.7750, 2.0315),
        adjust_lr_fn: str | None = "match_rms_adamw",
        adamw_lr: float | None = None,
        adamw_weight_decay: float | None = None,
        betas: Sequence[float] = (0.9, 0.95),
        eps: float = 1e-8,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        if adjust_lr_fn not in (None, "original", "match_rms_adamw"):
            raise UserError(f"optimizer.adjust_lr_fn={adjust_lr_fn!r} is not one of torch.optim.Muon's: set it to "
                            "match_rms_adamw, original or null")
        # plain floats and tuples (not OmegaConf lists): they go into the checkpoint, which loads with weights_only
        self._halves_defaults = {
            True: {"lr": float(lr), "weight_decay": float(weight_decay), "momentum": float(momentum),
                   "nesterov": bool(nesterov), "ns_steps": int(ns_steps), "adjust_lr_fn": adjust_lr_fn,
                   "ns_coefficients": tuple(float(c) for c in ns_coefficients), "eps": 1e-7},  # torch's NS epsilon
            False: {"lr": float(lr if adamw_lr is None else adamw_lr), "betas": tuple(float(b) for b in betas),
                    "eps": float(eps), "weight_decay": float(weight_decay), "amsgrad": False, "maximize": False,
                    "foreach": foreach, "fused": fused, "capturable": False, "differentiable": False,
                    "decoupled_weight_decay": True},
        }
        self._adamw_weight_decay = adamw_weight_decay
        self._halves: dict[bool, Optimizer] = {}
        # no shared defaults: each group is filled from its own half's in add_param_group
        super().__init__(params, {})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        use_muon = param_group.get("use_muon")
        if use_muon is None:
            if "role" not in param_group:
                raise UserError("optimizer=muon needs parameter groups that name their role (hidden, embedding, head, "
                                "vector), as train's do; this command builds plain weight-decay groups: use "
                                "optimizer=adamw")
            use_muon = param_group["role"] in self.orthogonalised_roles
        param_group["use_muon"] = bool(use_muon)
        if not use_muon and self._adamw_weight_decay is not None and param_group.get("weight_decay", 1.0) != 0:
            param_group["weight_decay"] = float(self._adamw_weight_decay)
        for name, value in self._halves_defaults[bool(use_muon)].items():
            param_group.setdefault(name, value)
        if use_muon:
            shapes = [tuple(p.shape) for p in ([param_group["params"]] if isinstance(param_group["params"], torch.Tensor)
                                               else param_group["params"]) if p.dim() != 2]
            if shapes:
                raise UserError(f"optimizer=muon orthogonalises 2-D matrices only, but the {param_group.get('role')} "
                                f"group holds tensors of shapes {shapes}: use optimizer=adamw for this model")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One step of both halves; ``closure`` (re-evaluating the loss, as Lightning passes it) runs once."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for use_muon in (True, False):
            groups = [group for group in self.param_groups if group["use_muon"] == use_muon]
            if groups:
                self._half(use_muon, groups).step()
        return loss

    def _half(self, use_muon: bool, groups: list[dict[str, Any]]) -> Optimizer:
        """torch's Muon or AdamW, stepping exactly ``groups`` (this optimizer's live dicts) with this optimizer's state.

        Both are rebound on every step, since ``load_state_dict`` replaces the group dicts and the state."""
        half = self._halves.get(use_muon)
        if half is None:
            adamw = self._halves_defaults[False]
            half = self._halves[use_muon] = (torch.optim.Muon(groups) if use_muon else
                                             torch.optim.AdamW(groups, foreach=adamw["foreach"], fused=adamw["fused"]))
        half.param_groups = groups
        half.state = self.state  # per-parameter, and the two halves' parameters are disjoint
        return half
