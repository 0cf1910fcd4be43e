"""``lm-lightning finetune ckpt_path=<pretrained.ckpt> task=classification|sft peft=none|lora|adapter|prompt``:
a pre-trained model adapted to a task — a classification head on a labelled TSV (default: SST-2), or
supervised fine-tuning on instructions (Alpaca-style JSON) — in full, with frozen parts or with
parameter-efficient adaptation; ``init=scratch`` trains the same architecture from random weights."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig

from lm_lightning.adaptation.peft import count_trainable, lora_state_dict
from lm_lightning.adaptation.recipes import TASK_FAMILIES, TASKS, backbone_preparation
from lm_lightning.config.app import hydra_command, instantiate_group, plain, run_identity, set_threads
from lm_lightning.errors import UserError
from lm_lightning.tracking.records import write_run_record
from lm_lightning.training.ema import weight_averaging
from lm_lightning.training.loading import load_trained

log = logging.getLogger("lm_lightning")
def finetune(cfg: DictConfig) -> dict[str, Any]:
    set_threads(cfg.get("num_threads"))
    L.seed_everything(cfg.seed, workers=True)
    if cfg.init not in ("pretrained", "scratch"):
        raise UserError(f"init={cfg.init!r}: choose pretrained or scratch")
    if cfg.task.name not in TASKS:
        raise UserError(f"task={cfg.task.name!r}: choose one of {', '.join(TASKS)}")
    pretrained, tokenizer = load_trained(cfg.ckpt_path)
    model_cfg = dict(pretrained.hparams.model)
    family = model_cfg.get("family", "gpt")
    if cfg.get("backbone_dropout") is not None:
        if "dropout" not in model_cfg:
            raise UserError(f"backbone_dropout={cfg.backbone_dropout}: a {family} checkpoint has no dropout setting")
        model_cfg["dropout"] = float(cfg.backbone_dropout)
    if family not in TASK_FAMILIES[cfg.task.name]:
        raise UserError(f"a {family} checkpoint cannot be fine-tuned for task={cfg.task.name}: it needs a "
                        f"{', '.join(TASK_FAMILIES[cfg.task.name])} checkpoint")
    prompt_tokens = cfg.peft.prompt_tokens if cfg.peft.get("method") == "prompt" else 0
    state = pretrained.model.state_dict() if cfg.init == "pretrained" else None
    parts = TASKS[cfg.task.name](cfg, model_cfg, state, backbone_preparation(cfg, family), tokenizer,
                                 pretrained.model.context_length - prompt_tokens)
    trainable, total = count_trainable(parts.module)

    output_dir = Path(HydraConfig.get().runtime.output_dir)
    name, group = run_identity(cfg.experiment_name)
    loggers = instantiate_group(cfg.logger)
    for logger in loggers:
        logger.log_hyperparams({"config": plain(cfg), "trainable_parameters": trainable, "parameters": total})
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers or False, enable_checkpointing=False,
                                                 callbacks=weight_averaging(cfg.get("ema")))
    trainer.fit(parts.module, datamodule=parts.data)
    final = {k: float(v) for k, v in trainer.validate(parts.module, datamodule=parts.data, verbose=False)[0].items()}
    checkpoint = output_dir / "checkpoints" / "finetuned.ckpt"
    trainer.save_checkpoint(checkpoint)
    adapter = None
    if cfg.peft.get("method") == "lora":  # the adapter-only checkpoint: LoRA matrices and the task's own head
        adapter = output_dir / "checkpoints" / "lora_adapter.pt"
        head = getattr(getattr(parts.module, "classifier", None), "head", None)
        torch.save({"lora": lora_state_dict(parts.adapted()), "head": head.state_dict() if head is not None else None,
                    "peft": plain(cfg.peft), "pretrained": str(cfg.ckpt_path)}, adapter)
    extra, lines = parts.finish(final)

    record = {"run_name": name, "group": group, "task": cfg.task.name, "init": cfg.init, "peft": cfg.peft.get("method"),
              "pretrained": str(cfg.ckpt_path), "architecture": family, "steps": trainer.global_step, "final": final,
              **extra, "parameters": {"trainable": trainable, "total": total}, "checkpoint": str(checkpoint),
              "adapter_checkpoint": str(adapter) if adapter else None, "config": plain(cfg)}
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update({f"final/{k}": v for k, v in final.items()})
            if "majority_baseline" in extra:
                logger.experiment.summary["majority_baseline"] = extra["majority_baseline"]
            record["wandb_dir"] = str(Path(logger.experiment.dir).parent)
            logger.experiment.finish()
    write_run_record(output_dir / "run.json", record)
    print("\n".join([
        "", "=" * 72,
        f"fine-tuned {family} for {cfg.task.name} ({cfg.init}, {cfg.peft.get('method') or 'all parameters'}) "
        f"for {trainer.global_step} steps",
        *lines,
        f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.2%})",
        f"checkpoint: {checkpoint}" + (f" (LoRA only: {adapter})" if adapter else ""),
        f"W&B run folder: {record.get('wandb_dir') or '(W&B off)'}",
        f"run record: {output_dir / 'run.json'}",
        "=" * 72,
    ]), flush=True)
    return record


@hydra_command("finetune")
def main(cfg: DictConfig) -> float:
    final = finetune(cfg)["final"]
    return final.get("val/accuracy", final["val/loss"])


if __name__ == "__main__":
    main()
