"""``lm-lightning align method=reward_model|dpo|kto ckpt_path=<pre-trained GPT .ckpt>``: preference
tuning of a checkpoint the platform trained, on preference pairs (synthetic Alpaca pairs with a known
preference by default, JSONL pairs, or Anthropic HH-RLHF); see conf/align.yaml.

Each method is a builder of its LightningModule in ``METHODS``; the data, the Trainer, the trackers,
the held-out accuracy with its 95% interval and the run record are shared.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig

from lm_lightning.alignment.methods import FAMILIES, METHODS, Method, build_data
from lm_lightning.alignment.policy import PolicyTask, cache_reference_logprobs, save_policy_checkpoint
from lm_lightning.alignment.task import wilson_interval
from lm_lightning.errors import UserError
from lm_lightning.models.capabilities import family_of
from lm_lightning.config.app import hydra_command, plain, set_threads
from lm_lightning.training.job import Job
from lm_lightning.training.loading import load_trained

log = logging.getLogger("lm_lightning")


def align(cfg: DictConfig) -> dict[str, Any]:
    set_threads(cfg.get("num_threads"))
    L.seed_everything(cfg.seed, workers=True)
    if cfg.method not in METHODS:
        raise UserError(f"method={cfg.method!r}: choose one of {', '.join(METHODS)}, ppo (experiment=ppo)")
    method = METHODS[cfg.method]
    pretrained, tokenizer = load_trained(cfg.ckpt_path)
    family = family_of(pretrained.hparams.model)
    if family not in FAMILIES:
        raise UserError(f"align needs a decoder checkpoint ({' or '.join(FAMILIES)}); {cfg.ckpt_path} holds a {family} model")
    data, sizes = build_data(cfg, tokenizer, pretrained.model.context_length, method.unpaired)
    task = method.build(cfg, pretrained, hydra.utils.instantiate(cfg.optimizer), hydra.utils.instantiate(cfg.scheduler))

    caching = {}
    if isinstance(task, PolicyTask):  # the reference's log-probabilities of every training response, once
        start = time.perf_counter()
        scored = cache_reference_logprobs(task.reference, data.train, cfg.data.val_batch_size, data.pad_id)
        caching = {"sequences": scored, "seconds": time.perf_counter() - start}

    trainable = sum(p.numel() for p in task.trainable().parameters() if p.requires_grad)
    with Job(cfg, {"trainable_parameters": trainable, **sizes}) as job:
        trainer = job.build_trainer(enable_checkpointing=False)
        job.fit(task, datamodule=data)
        final = job.final_validation(task, datamodule=data)
        low, high = wilson_interval(final["val/accuracy"], sizes["val_pairs"])

        name = "reward_model.ckpt" if cfg.method == "reward_model" else "policy.ckpt"
        checkpoint = job.output_dir / "checkpoints" / name
        if isinstance(task, PolicyTask):
            save_policy_checkpoint(task.policy, cfg.ckpt_path, checkpoint)
        else:
            trainer.save_checkpoint(checkpoint, weights_only=True)

        record = {"run_name": job.run_name, "group": job.group, "method": cfg.method, "pretrained": str(cfg.ckpt_path),
                  "data": {"format": cfg.data.format, "path": str(cfg.data.path), **sizes},
                  "steps": trainer.global_step, "final": final, "accuracy_interval_95": [low, high],
                  "reference_caching": caching, "trainable_parameters": trainable, "checkpoint": str(checkpoint),
                  "config": plain(cfg)}
        return job.finish(record, [*summary_lines(cfg, method, record), *job.where()], final=final,
                          summary={"final/val/accuracy_low": low, "final/val/accuracy_high": high})


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
    lines.append(f"checkpoint: {record['checkpoint']}")
    return lines


@hydra_command("align")
def main(cfg: DictConfig) -> float:
    if cfg.method == "ppo":  # rollouts against a reward, not preference pairs: its own loop
        from lm_lightning.alignment.ppo import run_ppo

        return run_ppo(cfg)["score"]["last"]
    return align(cfg)["final"]["val/accuracy"]


if __name__ == "__main__":
    main()
