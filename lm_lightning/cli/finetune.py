"""``lm-lightning finetune ckpt_path=<pretrained.ckpt> task=classification|sft peft=none|lora|adapter|prompt``:
a pre-trained model adapted to a task — a classification head on a labelled TSV (default: SST-2), or
supervised fine-tuning on instructions (Alpaca-style JSON) — in full, with frozen parts or with
parameter-efficient adaptation; ``init=scratch`` trains the same architecture from random weights."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from omegaconf import DictConfig

from lm_lightning.adaptation.adapter_checkpoint import save_lora_adapter
from lm_lightning.adaptation.peft import count_trainable
from lm_lightning.adaptation.recipes import TASK_FAMILIES, TASKS, backbone_preparation
from lm_lightning.config.app import hydra_command, plain, set_threads
from lm_lightning.errors import UserError
from lm_lightning.models.capabilities import family_of
from lm_lightning.training.ema import weight_averaging
from lm_lightning.training.job import Job
from lm_lightning.training.loading import load_trained

log = logging.getLogger("lm_lightning")


def finetune(cfg: DictConfig) -> dict[str, Any]:
    set_threads(cfg.get("num_threads"))
    L.seed_everything(cfg.seed, workers=True)
    if cfg.init not in ("pretrained", "scratch"):
        raise UserError(f"init={cfg.init!r}: choose pretrained or scratch")
    if cfg.task.name not in TASKS:
        raise UserError(f"task={cfg.task.name!r}: choose one of {', '.join(TASKS)}")
    limit = cfg.task.get("max_train_examples")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        # a negative count would slice rows off the end ([:-1] is all but one) rather than limit them
        raise UserError(f"task.max_train_examples={limit!r} must be a whole number >= 1 (null: every row)")
    pretrained, tokenizer = load_trained(cfg.ckpt_path)
    model_cfg = dict(pretrained.hparams.model)
    family = family_of(model_cfg)  # a bidirectional recurrent checkpoint is "bidirectional <cell>"
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

    with Job(cfg, {"trainable_parameters": trainable, "parameters": total}) as job:
        trainer = job.build_trainer(enable_checkpointing=False, callbacks=weight_averaging(cfg.get("ema")))
        job.fit(parts.module, datamodule=parts.data)
        final = job.final_validation(parts.module, datamodule=parts.data)
        checkpoint = job.output_dir / "checkpoints" / "finetuned.ckpt"
        trainer.save_checkpoint(checkpoint)
        adapter = None
        if cfg.peft.get("method") == "lora":  # the adapter-only checkpoint: LoRA matrices and the task's own head
            adapter = save_lora_adapter(job.output_dir / "checkpoints" / "lora_adapter.pt", parts.module,
                                        parts.adapted(), plain(cfg.peft), str(cfg.ckpt_path))
        extra, lines = parts.finish(final)

        record = {"run_name": job.run_name, "group": job.group, "task": cfg.task.name, "init": cfg.init,
                  "peft": cfg.peft.get("method"), "pretrained": str(cfg.ckpt_path), "architecture": family,
                  "steps": trainer.global_step, "final": final, **extra,
                  "parameters": {"trainable": trainable, "total": total}, "checkpoint": str(checkpoint),
                  "adapter_checkpoint": str(adapter) if adapter else None, "config": plain(cfg)}
        banner = [
            f"fine-tuned {family} for {cfg.task.name} ({cfg.init}, {cfg.peft.get('method') or 'all parameters'}) "
            f"for {trainer.global_step} steps",
            *lines,
            f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.2%})",
            f"checkpoint: {checkpoint}" + (f" (LoRA only: {adapter})" if adapter else ""),
            *job.where(),
        ]
        summary = {"majority_baseline": extra["majority_baseline"]} if "majority_baseline" in extra else {}
        return job.finish(record, banner, final=final, summary=summary)


@hydra_command("finetune")
def main(cfg: DictConfig) -> float:
    final = finetune(cfg)["final"]
    return final.get("val/accuracy", final["val/loss"])


if __name__ == "__main__":
    main()
