"""Fine-tuning recipes: what ``lm-lightning finetune`` builds for each task (a classification head on a
labelled TSV, or supervised fine-tuning on instructions) and how the backbone is prepared (frozen parts,
LoRA, bottleneck adapters or a soft prompt)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
from omegaconf import DictConfig
from torch import nn

from lm_lightning.adaptation.classification import (
    ClassificationTask,
    TextClassificationData,
    encode_texts,
    read_labelled_tsv,
)
from lm_lightning.adaptation.instructions import load_instructions, render_prompt
from lm_lightning.adaptation.optimization import freeze
from lm_lightning.adaptation.peft import PromptTunedGPT, apply_adapters, apply_lora
from lm_lightning.adaptation.sft import InstructionData, InstructionTuningTask, encode_example
from lm_lightning.config.app import plain
from lm_lightning.errors import UserError
from lm_lightning.generation import generate_text
from lm_lightning.models.base import Trait
from lm_lightning.models.capabilities import families_where, has_features
from lm_lightning.models.gpt import GPT

log = logging.getLogger("lm_lightning")
PEFT_METHODS = ("lora", "adapter", "prompt")


def backbone_preparation(cfg: DictConfig, family: str) -> Callable[[nn.Module], nn.Module]:
    """What to do to the backbone after the pre-trained weights are loaded: freeze what ``freeze``
    names, then add LoRA, bottleneck adapters or a soft prompt (each freezes the backbone but its own
    parameters). A task head added afterwards always trains."""
    method = cfg.peft.get("method")
    if method is not None and method not in PEFT_METHODS:
        raise UserError(f"peft.method={method!r}: choose one of {', '.join(PEFT_METHODS)} (or peft=none for full fine-tuning)")
    prompt_families = families_where(lambda cls, traits: issubclass(cls, GPT))  # PromptTunedGPT wraps a GPT
    if method == "prompt" and family not in prompt_families:
        raise UserError(f"peft=prompt needs a {' or '.join(prompt_families)} checkpoint, not {family}")

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
TASK_FAMILIES = {"classification": families_where(lambda cls, traits: has_features(cls)),  # a head reads features()
                 "sft": families_where(lambda cls, traits: Trait.CAUSAL in traits)}  # next-token logits of the text
