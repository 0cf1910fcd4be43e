"""``lm-lightning align method=reward_model|dpo|kto ckpt_path=<pre-trained GPT .ckpt>``: preference
tuning of a checkpoint the platform trained, on preference pairs (synthetic Alpaca pairs with a known
preference by default, JSONL pairs, or Anthropic HH-RLHF); see conf/align.yaml.

Each method is a builder of its LightningModule in ``METHODS``; the data, the Trainer, the trackers,
the held-out accuracy with its 95% interval and the run record are shared.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig

from lm_lightning.alignment.methods import FAMILIES, METHODS, Method, build_data
from lm_lightning.alignment.policy import PolicyTask, cache_reference_logprobs, save_policy_checkpoint
from lm_lightning.alignment.task import wilson_interval
from lm_lightning.errors import UserError
from lm_lightning.config.app import hydra_command, instantiate_group, plain, run_identity, set_threads
from lm_lightning.training.loading import load_trained
from lm_lightning.tracking.records import write_run_record

log = logging.getLogger("lm_lightning")
def align(cfg: DictConfig) -> dict[str, Any]:
    set_threads(cfg.get("num_threads"))
    L.seed_everything(cfg.seed, workers=True)
    if cfg.method not in METHODS:
        raise UserError(f"method={cfg.method!r}: choose one of {', '.join(METHODS)}, ppo (experiment=ppo)")
    method = METHODS[cfg.method]
    pretrained, tokenizer = load_trained(cfg.ckpt_path)
    family = pretrained.hparams.model.get("family", "gpt")
    if family not in FAMILIES:
        raise UserError(f"align needs a decoder checkpoint ({' or '.join(FAMILIES)}); {cfg.ckpt_path} holds a {family} model")
    data, sizes = build_data(cfg, tokenizer, pretrained.model.context_length, method.unpaired)
    task = method.build(cfg, pretrained, hydra.utils.instantiate(cfg.optimizer), hydra.utils.instantiate(cfg.scheduler))

    caching = {}
    if isinstance(task, PolicyTask):  # the reference's log-probabilities of every training response, once
        start = time.perf_counter()
        scored = cache_reference_logprobs(task.reference, data.train, cfg.data.val_batch_size, data.pad_id)
        caching = {"sequences": scored, "seconds": time.perf_counter() - start}

    output_dir = Path(HydraConfig.get().runtime.output_dir)
    name, group = run_identity(cfg.experiment_name)
    trainable = sum(p.numel() for p in task.trainable().parameters() if p.requires_grad)
    loggers = instantiate_group(cfg.logger)
    for logger in loggers:
        logger.log_hyperparams({"config": plain(cfg), "trainable_parameters": trainable, **sizes})
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers or False, enable_checkpointing=False)
    trainer.fit(task, datamodule=data)
    final = {k: float(v) for k, v in trainer.validate(task, datamodule=data, verbose=False)[0].items()}
    low, high = wilson_interval(final["val/accuracy"], sizes["val_pairs"])

    checkpoint = output_dir / "checkpoints" / ("reward_model.ckpt" if cfg.method == "reward_model" else "policy.ckpt")
    if isinstance(task, PolicyTask):
        save_policy_checkpoint(task.policy, cfg.ckpt_path, checkpoint)
    else:
        trainer.save_checkpoint(checkpoint, weights_only=True)

    record = {"run_name": name, "group": group, "method": cfg.method, "pretrained": str(cfg.ckpt_path),
              "data": {"format": cfg.data.format, "path": str(cfg.data.path), **sizes}, "steps": trainer.global_step,
              "final": final, "accuracy_interval_95": [low, high], "reference_caching": caching,
              "trainable_parameters": trainable, "checkpoint": str(checkpoint), "config": plain(cfg)}
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update({"final/val/accuracy": final["val/accuracy"], "final/val/accuracy_low": low,
                                              "final/val/accuracy_high": high})
            record["wandb_dir"] = str(Path(logger.experiment.dir).parent)
            logger.experiment.finish()
    write_run_record(output_dir / "run.json", record)
    print("\n".join(["", "=" * 72, *summary_lines(cfg, method, record), "=" * 72]), flush=True)
    return record


def summary_lines(cfg: DictConfig, method: Method, record: dict[str, Any]) -> list[str]:
    final, (low, high), sizes = record["final"], record["accuracy_interval_95"], record["data"]
    lines = [
        f"{method.title} on {cfg.ckpt_path}: {record['steps']} steps, {sizes['train_examples']} training "
        f"{'rows' if method.unpaired else 'pairs'} ({cfg.data.format} from {cfg.data.path})",
        f"held-out {method.accuracy} {final['val/accuracy']:.4f} (95% Wilson interval {low:.3f}-{high:.3f}, "
        f"{sizes['val_pairs']} pairs); mean margin {final['val/margin']:.3f}",
    ]
    if "val/kl" in final:
        lines.append(f"KL to the reference: {final['val/kl']:.3f} nats per held-out chosen response (exact, over the "
                     f"vocabulary); mean log pi/pi_ref chosen {final['val/logratio_chosen']:+.2f}, "
                     f"rejected {final['val/logratio_rejected']:+.2f}")
        caching = record["reference_caching"]
        lines.append(f"reference log-probabilities: {caching['sequences']} training sequences, cached once in "
                     f"{caching['seconds']:.1f} s")
    lines += [f"checkpoint: {record['checkpoint']}",
              f"W&B run folder: {record.get('wandb_dir') or '(W&B off)'}",
              f"run record: {Path(HydraConfig.get().runtime.output_dir) / 'run.json'}"]
    return lines


@hydra_command("align")
def main(cfg: DictConfig) -> float:
    if cfg.method == "ppo":  # rollouts against a reward, not preference pairs: its own loop
        from lm_lightning.alignment.ppo import run_ppo

        return run_ppo(cfg)["score"]["last"]
    return align(cfg)["final"]["val/accuracy"]


if __name__ == "__main__":
    main()
