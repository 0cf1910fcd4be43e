"""``lm-lightning finetune ckpt_path=<pretrained.ckpt>``: a classification head on a pre-trained model,
fine-tuned on a labelled TSV (default: SST-2), or the same architecture from scratch (``init=scratch``)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig

from lm_lightning.adaptation.classification import (
    ClassificationTask,
    SequenceClassifier,
    TextClassificationData,
    encode_texts,
)
from lm_lightning.adaptation.peft import PromptTunedGPT, apply_adapters, apply_lora, lora_state_dict
from lm_lightning.models.gpt import GPT
from lm_lightning.errors import UserError
from lm_lightning.runtime import hydra_command, instantiate_group, load_trained, plain, run_identity, set_threads
from lm_lightning.score import read_labelled_tsv
from lm_lightning.tracking.records import write_run_record

log = logging.getLogger("lm_lightning")
PEFT_METHODS = ("lora", "adapter", "prompt")


def peft_preparation(peft: DictConfig) -> Callable[[SequenceClassifier], None] | None:
    """What to do to the classifier after the pre-trained weights are loaded: nothing (full
    fine-tuning), LoRA, bottleneck adapters or a soft prompt — each freezes the backbone but its own
    parameters; the task head always trains."""
    method = peft.get("method")
    if method is None:
        return None
    if method not in PEFT_METHODS:
        raise UserError(f"peft.method={method!r}: choose one of {', '.join(PEFT_METHODS)} (or null for full fine-tuning)")

    def prepare(classifier: SequenceClassifier) -> None:
        if method == "lora":
            apply_lora(classifier.backbone, list(peft.lora_targets), rank=peft.rank, alpha=peft.alpha)
        elif method == "adapter":
            apply_adapters(classifier.backbone, bottleneck=peft.bottleneck)
        else:
            if not isinstance(classifier.backbone, GPT):
                raise UserError("peft.method=prompt needs a gpt or prefix_lm checkpoint")
            classifier.backbone = PromptTunedGPT(classifier.backbone, peft.prompt_tokens)
        classifier.head.requires_grad_(True)

    return prepare


def finetune(cfg: DictConfig) -> dict[str, Any]:
    set_threads(cfg.get("num_threads"))
    L.seed_everything(cfg.seed, workers=True)
    if cfg.init not in ("pretrained", "scratch"):
        raise UserError(f"init={cfg.init!r}: choose pretrained or scratch")
    train_texts, train_labels = read_labelled_tsv(Path(cfg.train_file), cfg.text_column, cfg.label_column)
    dev_texts, dev_labels = read_labelled_tsv(Path(cfg.dev_file), cfg.text_column, cfg.label_column)
    if cfg.max_train_examples:
        train_texts, train_labels = train_texts[: cfg.max_train_examples], train_labels[: cfg.max_train_examples]
    pretrained, tokenizer = load_trained(cfg.ckpt_path)
    model_cfg = dict(pretrained.hparams.model)
    prompt_tokens = cfg.peft.prompt_tokens if cfg.peft.get("method") == "prompt" else 0
    max_length = min(cfg.max_length, pretrained.model.context_length - prompt_tokens)
    data = TextClassificationData((encode_texts(tokenizer, train_texts, max_length), train_labels),
                                  (encode_texts(tokenizer, dev_texts, max_length), dev_labels),
                                  cfg.batch_size, tokenizer.pad_id, cfg.seed)
    task = ClassificationTask(
        model_cfg, cfg.n_classes, cfg.dropout, cfg.lr, cfg.weight_decay, cfg.warmup_steps, cfg.trainer.max_steps,
        backbone_state=pretrained.model.state_dict() if cfg.init == "pretrained" else None,
        prepare=peft_preparation(cfg.peft),
    )
    trainable = sum(p.numel() for p in task.parameters() if p.requires_grad)
    total = sum(p.numel() for p in task.parameters())

    output_dir = Path(HydraConfig.get().runtime.output_dir)
    name, group = run_identity(cfg.experiment_name)
    loggers = instantiate_group(cfg.logger)
    for logger in loggers:
        logger.log_hyperparams({"config": plain(cfg), "trainable_parameters": trainable, "parameters": total})
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers or False, enable_checkpointing=False)
    trainer.fit(task, datamodule=data)
    final = {k: float(v) for k, v in trainer.validate(task, datamodule=data, verbose=False)[0].items()}
    checkpoint = output_dir / "checkpoints" / "finetuned.ckpt"
    trainer.save_checkpoint(checkpoint)
    if cfg.peft.method == "lora":  # the adapter-only checkpoint: LoRA matrices and the task head
        adapter = output_dir / "checkpoints" / "lora_adapter.pt"
        torch.save({"lora": lora_state_dict(task.classifier.backbone), "head": task.classifier.head.state_dict(),
                    "peft": plain(cfg.peft)}, adapter)

    majority = Counter(dev_labels).most_common(1)[0][1] / len(dev_labels)
    record = {"run_name": name, "group": group, "init": cfg.init, "peft": cfg.peft.method, "pretrained": str(cfg.ckpt_path),
              "architecture": model_cfg.get("family"), "steps": trainer.global_step, "final": final,
              "majority_baseline": majority, "parameters": {"trainable": trainable, "total": total},
              "checkpoint": str(checkpoint), "config": plain(cfg)}
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update({"final/val/accuracy": final["val/accuracy"], "majority_baseline": majority})
            record["wandb_dir"] = str(Path(logger.experiment.dir).parent)
            logger.experiment.finish()
    write_run_record(output_dir / "run.json", record)
    print("\n".join([
        "", "=" * 72,
        f"fine-tuned {record['architecture']} ({cfg.init}, {cfg.peft.method or 'all parameters'}) for {trainer.global_step} steps on {cfg.train_file}",
        f"dev accuracy {final['val/accuracy']:.4f} (majority class {majority:.4f}), dev loss {final['val/loss']:.4f}",
        f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.2%})",
        f"checkpoint: {checkpoint}",
        f"W&B run folder: {record.get('wandb_dir') or '(W&B off)'}",
        f"run record: {output_dir / 'run.json'}",
        "=" * 72,
    ]), flush=True)
    return record


@hydra_command("finetune")
def main(cfg: DictConfig) -> float:
    return finetune(cfg)["final"]["val/accuracy"]


if __name__ == "__main__":
    main()
