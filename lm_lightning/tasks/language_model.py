"""Pre-training LightningModule: any model from config, any objective, AdamW-style optimizers with
weight-decay groups, a per-step (or per-epoch) schedule, and the metrics of SPEC §5 and §8. On contiguous
streams (``data.sampling=streams``) a recurrent model carries its state from batch to batch (``carried_state.py``)."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from typing import Any

import hydra
import lightning as L
import numpy as np
import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lm_lightning.errors import UserError
from lm_lightning.objectives.base import ObjectiveOutput
from lm_lightning.parallel.cuda import optimizer_kwargs_for, use_tf32_on_cuda
from lm_lightning.tasks.carried_state import CarriedState
from lm_lightning.tasks.metrics import LanguageModelMetrics, Ratio
from lm_lightning.tasks.param_groups import apply_lr_scales, parameter_groups
from lm_lightning.tracking.callbacks import reaches_loggers
from lm_lightning.training.lightning_internals import batches_processed_in_epoch

log = logging.getLogger("lm_lightning")


class LanguageModelTask(L.LightningModule):
    """Trains ``model`` (built from its Hydra config) with ``objective``.

    The model is only used through its interface: ``forward``, ``parameter_count()`` and
    ``flops_per_token(context)``. ``bytes_per_token`` maps a split name to its UTF-8 bytes per
    token, for bits-per-byte.
    """

    def __init__(
        self,
        model: Mapping,
        objective: Mapping,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        bytes_per_token: Mapping[str, float] | None = None,
        tokens_per_step: int | None = None,
        tokenizer_model: bytes | None = None,
        parallelize: Callable[[nn.Module, Any], nn.Module] | None = None,
        compile: bool = False,
        text_preparation: Mapping[str, Any] | None = None,
    ) -> None:
        """``text_preparation``: the corpus's ``cleaning`` and ``document_split``, kept in the checkpoint's
        hyper-parameters so ``evaluate`` prepares a text file as the training text was."""
        super().__init__()
        # configs are saved so a checkpoint rebuilds the model alone; callables are not serialisable
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "tokenizer_model", "parallelize", "compile"])
        self.model: nn.Module = hydra.utils.instantiate(_plain(model))
        self.objective = hydra.utils.instantiate(_plain(objective))
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.bytes_per_token = dict(bytes_per_token or {})
        self.tokens_per_step = tokens_per_step
        self.tokenizer_model = tokenizer_model
        self.parallelize, self.compile_model = parallelize, compile
        self._configured = False
        # bits-per-byte only where the predicted tokens are the text itself (not masks or sentinels)
        bpb = self.bytes_per_token if getattr(self.objective, "bits_per_byte", True) else {}
        self.train_metrics = LanguageModelMetrics(bpb.get("train"))
        self.val_metrics = LanguageModelMetrics(bpb.get("val"))
        names = getattr(self.objective, "accuracy_names", ())
        self.train_accuracy = nn.ModuleDict({name: Ratio() for name in names})
        self.val_accuracy = nn.ModuleDict({name: Ratio() for name in names})
        # Mixture-of-Experts: weight of the load-balancing loss added to the objective's
        self.aux_loss_weight = float(getattr(getattr(self.model, "config", None), "moe_aux_weight", 0.0))
        self.initial_loss: float | None = None  # loss of the first training step, for "loss fell by" checks
        self.context = getattr(self.model, "context_length", None)
        self._flops_per_token = self.model.flops_per_token(self.context)
        self._batch_tokens = 0
        self.last_val_step: int | None = None  # global step of the latest validation
        self.carried = CarriedState()  # the recurrent state across stream windows (data.sampling=streams)
        self._streams = False
        # this step's total gradient norm where the non-finite guard computed it, for clipping to reuse
        self.grad_norm: torch.Tensor | None = None

    def setup(self, stage: str) -> None:
        data = self.trainer.datamodule
        self._streams = bool(getattr(data, "streams", False))
        if self._streams and not (getattr(self.model, "carries_state", False) and self.model.causal):
            raise UserError(f"data.sampling=streams carries a recurrent state across batches: it needs a causal "
                            f"recurrent model (model=lstm, gru or rnn), not {self.model.config.family!r}")
        if self._streams and getattr(self.objective, "name", None) != "causal_lm":
            raise UserError(f"data.sampling=streams trains on next-token prediction: use objective=causal_lm, "
                            f"not {getattr(self.objective, 'name', self.objective)!r}")

    def _predict(self, batch: torch.Tensor, batch_idx: int, split: str,
                 generator: torch.Generator | None = None) -> ObjectiveOutput:
        """The objective on a batch; on streams the model reads on from the state of the window before."""
        if not self._streams:
            return self.objective(self.model, batch, generator)
        caches = self.carried.caches(self.model, split, batch_idx, batch)
        resets = self.trainer.datamodule.stream_resets(split, batch_idx)
        resets = None if resets is None else resets.to(batch.device)
        # the objective calls model(inputs): here the model reading on from the carried state
        return self.objective(lambda inputs: self.model(inputs, caches, resets=resets), batch)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def configure_model(self) -> None:
        """Compiles and/or shards the model once, from outside (FSDP2: ``parallelize(model, device_mesh)``).

        Compilation is in place (``nn.Module.compile``), so parameter names and checkpoints do not
        change; with sharding each block is compiled on its own before ``fully_shard``, as torchtitan does.
        """
        if self._configured:
            return
        self._configured = True
        if self.compile_model:
            for module in (self.model.blocks() if self.parallelize is not None else [self.model]):
                module.compile()
        if self.parallelize is not None:
            self.parallelize(self.model, self.device_mesh)

    @property
    def flops_per_batch(self) -> int:
        """FLOPs of the latest micro-batch, read by Lightning's ThroughputMonitor: forward + backward
        when training, forward only (a third) when evaluating."""
        flops = self._flops_per_token * self._batch_tokens
        return flops if self.training else flops // 3

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self._batch_tokens = batch[:, 1:].numel()
        out = self._predict(batch, batch_idx, "train")
        loss = out.loss
        aux = self.model.aux_loss() if hasattr(self.model, "aux_loss") else None
        if aux is not None:
            loss = loss + self.aux_loss_weight * aux
        if self.initial_loss is None:  # the reported loss (over the predicted tokens), as validation reports it
            self.initial_loss = float(out.nll_sum / out.n_tokens.clamp(min=1))
        if self._step_reaches_loggers:
            # averaged over ranks: the loss of the whole global batch, comparable across world sizes
            self.log("train/loss", out.loss.detach(), prog_bar=True, sync_dist=self._distributed)
            self.train_metrics.update(out.nll_sum, out.n_tokens)
            metrics = self.train_metrics.compute()
            self.train_metrics.reset()
            self.log_dict({f"train/{k}": v for k, v in metrics.items() if k != "loss"})
            tokens_per_step = self.tokens_per_step or self._batch_tokens * self.trainer.world_size
            tokens_seen = (self.global_step + 1) * tokens_per_step
            self.log("train/tokens_seen", float(tokens_seen))
            self.log("train/flops_so_far", float(tokens_seen * self._flops_per_token))
            if aux is not None:
                self.log("train/moe_load_balance", aux.detach())
            for name, (hit, total) in out.accuracies.items():
                self.train_accuracy[name].update(hit, total)
                self.log(f"train/{name}", self.train_accuracy[name].compute())
                self.train_accuracy[name].reset()
        return loss

    @property
    def _step_reaches_loggers(self) -> bool:
        """Whether what this training step logs is written (every ``trainer.log_every_n_steps`` steps): only
        then is it logged, as each ``self.log`` costs about 0.7 ms on CPU, a few percent of a small model's step."""
        return self._trainer is not None and reaches_loggers(self.trainer, self.trainer.global_step + 1)

    @property
    def _distributed(self) -> bool:
        return self._trainer is not None and self.trainer.world_size > 1

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._batch_tokens = batch[:, 1:].numel()
        # the same masks and spans at every evaluation, so validation losses compare over time
        generator = torch.Generator(batch.device).manual_seed(1_000_003 * batch_idx + 17)
        out = self._predict(batch, batch_idx, "val", generator)
        self.val_metrics.update(out.nll_sum, out.n_tokens)
        for name, (hit, total) in out.accuracies.items():
            self.val_accuracy[name].update(hit, total)

    def on_validation_epoch_end(self) -> None:
        metrics = self.val_metrics.compute()
        self.val_metrics.reset()
        for name, metric in self.val_accuracy.items():
            metrics[name] = metric.compute()
            metric.reset()
        words_per_token = self._streams and self.trainer.datamodule.words_per_token("val")
        if words_per_token:  # the recurrent-LM papers' figure: per word, a line end counting as one
            metrics["word_perplexity"] = torch.exp(metrics["loss"] / words_per_token)
            if not self.trainer.sanity_checking:
                log.info("validation at step %d: per-word perplexity %.2f (%.4f nats/token, %.3f words/token)",
                         self.global_step, metrics["word_perplexity"], metrics["loss"], words_per_token)
        if not self.trainer.sanity_checking:
            self.last_val_step = self.global_step
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, prog_bar=True, sync_dist=False)

    def on_fit_start(self) -> None:
        use_tf32_on_cuda(self.device)  # fp32 matmuls on TF32 cores; CUDA only

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clipping by the global norm reuses the norm the non-finite guard computed this step (one pass over
        the gradients instead of two, ~1% of a small model's step) where the gradients are whole tensors (one
        device or DDP) and unscaled (no fp16 loss scaler); otherwise, Lightning's clipping."""
        norm, self.grad_norm = self.grad_norm, None
        if (norm is None or not gradient_clip_val or gradient_clip_algorithm not in (None, "norm")
                or type(self.trainer.strategy) not in (SingleDeviceStrategy, DDPStrategy)
                or getattr(self.trainer.precision_plugin, "scaler", None) is not None):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, norm)

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise RuntimeError("LanguageModelTask was built without an optimizer: it can evaluate but not train")
        weight_decay = getattr(self.optimizer_factory, "keywords", {}).get("weight_decay", 0.0)
        optimizer = self.optimizer_factory(params=parameter_groups(self.model, weight_decay),
                                           **optimizer_kwargs_for(self.optimizer_factory, self.device))  # fused on CUDA
        apply_lr_scales(optimizer)  # μP's per-role factors, before the scheduler takes lr as its base
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        # a factory may return Lightning's scheduler config itself, to be stepped per epoch (epoch_schedules.per_epoch)
        config = scheduler if isinstance(scheduler, dict) else {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": config}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the tokenizer travels inside the checkpoint, so evaluate/generate need nothing else
        if self.tokenizer_model is not None:
            checkpoint["tokenizer_model"] = self.tokenizer_model
        if self._streams and (state := self.carried.state_dict(batches_processed_in_epoch(self.trainer))):
            checkpoint["carried_state"] = state  # the recurrent state each training lane reads on from
        # random states, so dropout masks and sampling continue as if the run had never stopped
        checkpoint["initial_loss"] = self.initial_loss
        # as tensors, ints and tuples only: weights_only=True loading refuses numpy's pickled arrays
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        checkpoint["rng_states"] = {"torch": torch.get_rng_state(),
                                    "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
                                    "python": random.getstate()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokenizer_model = checkpoint.get("tokenizer_model", self.tokenizer_model)
        self.initial_loss = checkpoint.get("initial_loss", self.initial_loss)
        if state := checkpoint.get("carried_state"):
            self.carried.load_state_dict(state)
        if states := checkpoint.get("rng_states"):
            torch.set_rng_state(states["torch"])
            kind, keys, pos, has_gauss, gauss = states["numpy"]
            np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
            random.setstate(states["python"])


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (linear and embedding weights); never biases or norm gains (1-D tensors)."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _plain(cfg: Mapping) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
