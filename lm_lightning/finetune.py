"""``lm-lightning finetune ckpt_path=<pretrained.ckpt> task=classification|sft peft=none|lora|adapter|prompt``:
a pre-trained model adapted to a task — a classification head on a labelled TSV (default: SST-2), or
supervised fine-tuning on instructions (Alpaca-style JSON) — in full, with frozen parts or with
parameter-efficient adaptation; ``init=scratch`` trains the same architecture from random weights."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig
from torch import nn

from lm_lightning.adaptation.classification import (
    ClassificationTask,
    TextClassificationData,
    encode_texts,
)
from lm_lightning.adaptation.instructions import load_instructions, render_prompt
from lm_lightning.adaptation.optimization import freeze
from lm_lightning.adaptation.peft import PromptTunedGPT, apply_adapters, apply_lora, count_trainable, lora_state_dict
from lm_lightning.adaptation.sft import InstructionData, InstructionTuningTask, encode_example
from lm_lightning.generation import generate_text
from lm_lightning.errors import UserError
from lm_lightning.runtime import hydra_command, instantiate_group, load_trained, plain, run_identity, set_threads
from lm_lightning.score import read_labelled_tsv
from lm_lightning.tracking.records import write_run_record

log = logging.getLogger("lm_lightning")
PEFT_METHODS = ("lora", "adapter", "prompt")


def backbone_preparation(cfg: DictConfig, family: str) -> Callable[[nn.Module], nn.Module]:
    """What to do to the backbone after the pre-trained weights are loaded: freeze what ``freeze``
    names, then add LoRA, bottleneck adapters or a soft prompt (each freezes the backbone but its own
    parameters). A task head added afterwards always trains."""
    method = cfg.peft.get("method")
    if method is not None and method not in PEFT_METHODS:
        raise UserError(f"peft.method={method!r}: choose one of {', '.join(PEFT_METHODS)} (or peft=none for full fine-tuning)")
    if method == "prompt" and family not in ("gpt", "prefix_lm"):
        raise UserError(f"peft=prompt needs a gpt or prefix_lm checkpoint, not {family}")

    def prepare(backbone: nn.Module) -> nn.Module:
        freeze(backbone, cfg.freeze.embeddings, cfg.freeze.blocks, cfg.freeze.backbone)
        if method == "lora":
            apply_lora(backbone, list(cfg.peft.targets), rank=cfg.peft.rank, alpha=cfg.peft.alpha,
                       dropout=cfg.peft.dropout)
        elif method == "adapter":
            apply_adapters(backbone, bottleneck=cfg.peft.bottleneck, after=cfg.peft.after)
        elif method == "prompt":
            backbone = PromptTunedGPT(backbone, cfg.peft.prompt_tokens)
        return backbone

    return prepare


class TaskParts(NamedTuple):
    module: L.LightningModule
    data: L.LightningDataModule
    adapted: Callable[[], nn.Module]  # the fine-tuned network (LoRA lives in it)
    finish: Callable[[dict[str, float]], tuple[dict[str, Any], list[str]]]  # final metrics -> record entries, summary lines


def classification_parts(cfg: DictConfig, model_cfg: dict, state, prepare, tokenizer, context: int) -> TaskParts:
    t = cfg.task
    train_texts, train_labels = read_labelled_tsv(Path(t.train_file), t.text_column, t.label_column)
    dev_texts, dev_labels = read_labelled_tsv(Path(t.dev_file), t.text_column, t.label_column)
    if t.max_train_examples:
        train_texts, train_labels = train_texts[: t.max_train_examples], train_labels[: t.max_train_examples]
    max_length = min(cfg.max_length, context)
    data = TextClassificationData((encode_texts(tokenizer, train_texts, max_length), train_labels),
                                  (encode_texts(tokenizer, dev_texts, max_length), dev_labels),
                                  cfg.batch_size, tokenizer.pad_id, cfg.seed)
    module = ClassificationTask(model_cfg, t.n_classes, t.dropout, cfg.lr, cfg.weight_decay, cfg.warmup_steps,
                                cfg.trainer.max_steps, t.pool, backbone_state=state, prepare=prepare,
                                lm_weight=t.lm_weight)
    majority = Counter(dev_labels).most_common(1)[0][1] / len(dev_labels)

    def finish(final: dict[str, float]) -> tuple[dict[str, Any], list[str]]:
        return ({"majority_baseline": majority, "data": {"train": str(t.train_file), "dev": str(t.dev_file)}},
                [f"dev accuracy {final['val/accuracy']:.4f} (majority class {majority:.4f}), dev loss {final['val/loss']:.4f}"])

    return TaskParts(module, data, lambda: module.classifier.backbone, finish)


def sft_parts(cfg: DictConfig, model_cfg: dict, state, prepare, tokenizer, context: int) -> TaskParts:
    t = cfg.task
    rows = load_instructions(t.data_file)
    held = t.heldout_instructions
    if len(rows) <= held + t.val_examples:
        raise UserError(f"instruction file {t.data_file} has {len(rows)} rows: it needs more than "
                        f"task.heldout_instructions + task.val_examples = {held + t.val_examples}")
    heldout = rows[len(rows) - held:]  # neither trained nor validated on: answered at the end
    val_rows = rows[len(rows) - held - t.val_examples: len(rows) - held]
    train_rows = rows[: len(rows) - held - t.val_examples][: t.max_train_examples or None]
    max_length = min(cfg.max_length, context)
    train, val = ([encode_example(tokenizer, row, max_length) for row in part] for part in (train_rows, val_rows))
    if long_prompts := sum(len(tokenizer.encode(render_prompt(row))) > max_length // 2 for row in train_rows):
        log.warning("%d of %d training prompts are longer than half the %d-token context: their start is cut",
                    long_prompts, len(train_rows), max_length)
    data = InstructionData(train, val, cfg.batch_size, tokenizer.pad_id, cfg.seed)
    module = InstructionTuningTask(model_cfg, cfg.lr, cfg.weight_decay, cfg.warmup_steps, cfg.trainer.max_steps,
                                   backbone_state=state, prepare=prepare)

    def finish(final: dict[str, float]) -> tuple[dict[str, Any], list[str]]:
        module.eval()
        answers = [{"instruction": row.instruction, "input": row.input, "reference": row.output,
                    "generated": generate_text(module.model, tokenizer, render_prompt(row), **plain(t.generation))}
                   for row in heldout]
        lines = [f"held-out response loss {final['val/loss']:.4f} nats/token (perplexity {final['val/perplexity']:.2f}) "
                 f"on {len(val)} instructions", f"answers to {len(heldout)} held-back instructions:"]
        for a in answers:
            lines += [f"--- {a['instruction']!r}" + (f" (input: {a['input']!r})" if a["input"] else ""),
                      a["generated"].strip() or "(empty)"]
        return {"heldout_answers": answers, "data": {"file": str(t.data_file), "train": len(train), "val": len(val)}}, lines

    return TaskParts(module, data, lambda: module.model, finish)


TASKS = {"classification": classification_parts, "sft": sft_parts}
TASK_FAMILIES = {"classification": ("gpt", "prefix_lm", "bert"), "sft": ("gpt", "prefix_lm", "rnn", "lstm", "gru", "ffn")}


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


class StartedEMA(EMAWeightAveraging):
    """Lightning's EMA of the weights, standing in for them only once it has averaged a step.

    Before ``update_starting_at_step`` Lightning's average is a copy of the starting weights, and it
    would validate, checkpoint and finally keep that copy; here the live weights serve until then.
    """

    _swapped = False

    def _started(self) -> bool:
        return self._average_model is not None and int(self._average_model.n_averaged) > 0

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swapped = self._started()
        if self._swapped:
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._swapped:
            super().on_validation_epoch_end(trainer, pl_module)
        self._swapped = False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._started():
            super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._started():  # the average's weights go in state_dict only once there is an average
            super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if "averaging_state" in checkpoint:  # a checkpoint saved before the average started holds none of it
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


def weight_averaging(ema: DictConfig | None) -> list[L.Callback]:
    """Lightning's EMA of the weights when ``ema.decay`` is set: validation, the saved checkpoint and the
    final figures then use the averaged weights."""
    if ema is None or ema.get("decay") is None:
        return []
    if not 0 < ema.decay < 1:
        raise UserError(f"ema.decay={ema.decay} must be between 0 and 1 (e.g. 0.995), or null for no average")
    return [StartedEMA(decay=float(ema.decay), update_starting_at_step=int(ema.get("start_step") or 0))]


@hydra_command("finetune")
def main(cfg: DictConfig) -> float:
    final = finetune(cfg)["final"]
    return final.get("val/accuracy", final["val/loss"])


if __name__ == "__main__":
    main()
