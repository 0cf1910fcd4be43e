"""``lm-lightning quantize ckpt_path=<file.ckpt> method=ptq_weight|ptq_dynamic|qat``: int8 linear layers of a
GPT for CPU inference, with model size, CPU tokens/s and validation perplexity before and after.

``ptq_weight`` and ``ptq_dynamic`` quantize the trained weights as they are (weight-only, or with dynamic
int8 activations); ``qat`` first fine-tunes the checkpoint on its LM objective through fake int8
rounding, then converts. The data and tokenizer settings must be those the checkpoint was trained
with (its validation split is scored; ``qat`` trains on its train split).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig
from torch import nn

from lm_lightning.compression.quantize import (
    check_supported,
    forward_tokens_per_second,
    generation_tokens_per_second,
    linear_weight_bytes,
    prepare_qat,
    quantize_linears,
    save_int8,
    select_linears,
    state_dict_bytes,
)
from lm_lightning.data.datamodule import LMDataModule
from lm_lightning.errors import UserError
from lm_lightning.config.app import hydra_command, instantiate_group, plain, run_identity, set_threads
from lm_lightning.training.loading import load_trained
from lm_lightning.tasks.language_model import LanguageModelTask
from lm_lightning.tasks.metrics import LanguageModelMetrics
from lm_lightning.tracking.records import write_run_record

log = logging.getLogger("lm_lightning")
METHODS = ("ptq_weight", "ptq_dynamic", "qat")


def checkpoint_data(cfg: DictConfig, task: LanguageModelTask, ckpt_path: str) -> LMDataModule:
    """The prepared corpus of ``cfg.data`` in windows of the model's context; its tokenizer must be the
    checkpoint's, or the perplexities would be of another text."""
    cfg.data.block_size = task.model.context_length
    data: LMDataModule = hydra.utils.instantiate(cfg.data, tokenizer=plain(cfg.tokenizer))
    if Path(data.corpus.tokenizer_path).read_bytes() != task.tokenizer_model:
        raise UserError(f"the tokenizer of data={cfg.data.corpus.name} with these tokenizer settings is not the one "
                        f"inside {ckpt_path}: pass the data and tokenizer settings the checkpoint was trained with "
                        "(for the gutenberg_small GPT: experiment=quant_ptq or experiment=quant_qat)")
    return data


def validation_metrics(task: LanguageModelTask, model: nn.Module, data: LMDataModule,
                       max_batches: int | None) -> dict[str, float]:
    """val/{loss, perplexity, bpb} of ``model`` under ``task``'s objective on the data's val split, as
    ``lm-lightning train`` and ``evaluate`` report them."""
    own_model, task.model = task.model, model
    task.val_metrics = LanguageModelMetrics(bytes_per_token=data.bytes_per_token("val"))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, limit_val_batches=max_batches or 1.0,
                        enable_model_summary=False, enable_checkpointing=False, enable_progress_bar=False)
    try:
        metrics = trainer.validate(task, dataloaders=data.val_dataloader(), verbose=False)[0]
    finally:
        task.model = own_model
    return {k: float(v) for k, v in metrics.items()}


def measure(task: LanguageModelTask, model: nn.Module, data: LMDataModule, cfg: DictConfig) -> dict[str, Any]:
    """Size (bytes) and validation metrics of one model."""
    return {"linear_weight_bytes": linear_weight_bytes(model), "state_dict_bytes": state_dict_bytes(model),
            "val": validation_metrics(task, model, data, cfg.max_val_batches)}


def speeds(models: dict[str, nn.Module], speed: DictConfig) -> dict[str, dict[str, float | None]]:
    """CPU tokens/s of each model's forward pass over full-context windows and of greedy generation,
    the models timed in turns."""
    context = next(iter(models.values())).context_length
    forward = forward_tokens_per_second(models, speed.batch_size, context, speed.repeats)
    generation = generation_tokens_per_second(models, speed.new_tokens, speed.repeats) if speed.new_tokens else {}
    return {name: {"forward_tokens_per_s": forward[name], "generation_tokens_per_s": generation.get(name)}
            for name in models}


def quantization_aware_training(cfg: DictConfig, pretrained: LanguageModelTask, data: LMDataModule, activations: bool,
                                layers: list[str] | None, loggers: list, checkpoint: Path) -> LanguageModelTask:
    """Fine-tunes a copy of the checkpoint on its own objective with fake int8 linear layers; saves it
    as an ordinary (fp32) Lightning checkpoint, which ``evaluate`` and ``generate`` read."""
    task = LanguageModelTask(
        pretrained.hparams.model, pretrained.hparams.objective, optimizer=hydra.utils.instantiate(cfg.optimizer),
        scheduler=hydra.utils.instantiate(cfg.scheduler),
        bytes_per_token={split: data.bytes_per_token(split) for split in ("train", "val")},
        tokenizer_model=pretrained.tokenizer_model,
    )
    task.model.load_state_dict(pretrained.model.state_dict())
    prepare_qat(task.model, activations, layers)
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers or False, enable_checkpointing=False)
    trainer.fit(task, datamodule=data)
    trainer.save_checkpoint(checkpoint)
    return task.eval()


def quantize(cfg: DictConfig) -> dict[str, Any]:
    set_threads(cfg.get("num_threads"))
    L.seed_everything(cfg.seed, workers=True)
    if cfg.method not in METHODS:
        raise UserError(f"method={cfg.method!r}: choose one of {', '.join(METHODS)}")
    task, _ = load_trained(cfg.ckpt_path)
    check_supported(task.model)
    scheme = "weight" if cfg.method == "ptq_weight" or (cfg.method == "qat" and not cfg.qat_activations) else "dynamic"
    layers = select_linears(task.model, list(cfg.layers) if cfg.layers else None)  # a bad name fails here, early
    data = checkpoint_data(cfg, task, cfg.ckpt_path)
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    name, group = run_identity(cfg.experiment_name)
    loggers = instantiate_group(cfg.logger)
    for logger in loggers:
        logger.log_hyperparams({"config": plain(cfg)})

    fp32 = task.model
    int8 = copy.deepcopy(fp32)
    quantize_linears(int8, scheme, layers)
    results = {"fp32": measure(task, fp32, data, cfg), "ptq": measure(task, int8, data, cfg)}
    timed = {"fp32": fp32, "ptq": int8}
    qat_checkpoint = output_dir / "checkpoints" / "qat.ckpt" if cfg.method == "qat" else None
    if qat_checkpoint:
        fake_quant = quantization_aware_training(cfg, task, data, scheme == "dynamic", layers, loggers, qat_checkpoint).model
        int8 = copy.deepcopy(fake_quant)
        quantize_linears(int8, scheme, layers)
        tuned_fp32 = copy.deepcopy(fp32)  # the fine-tuned weights without rounding: what training alone gained
        tuned_fp32.load_state_dict(fake_quant.state_dict())
        results["qat_fp32"] = {"val": validation_metrics(task, tuned_fp32, data, cfg.max_val_batches)}
        results["qat_fake_quant"] = {"val": validation_metrics(task, fake_quant, data, cfg.max_val_batches)}
        results["qat"] = measure(task, int8, data, cfg)
        timed["qat"] = int8
    for stage, figures in speeds(timed, cfg.speed).items():
        results[stage].update(figures)
    int8_path = save_int8(output_dir / "checkpoints" / "int8.pt", int8, task.hparams, task.tokenizer_model)

    final = results["qat" if qat_checkpoint else "ptq"]
    record = {
        "run_name": name, "group": group, "method": cfg.method, "scheme": scheme, "checkpoint": str(cfg.ckpt_path),
        "architecture": task.hparams.model.get("family"), "int8_layers": layers, "results": results,
        "linear_weight_ratio": results["fp32"]["linear_weight_bytes"] / final["linear_weight_bytes"],
        "state_dict_ratio": results["fp32"]["state_dict_bytes"] / final["state_dict_bytes"],
        "num_threads": torch.get_num_threads(), "int8_model": str(int8_path),
        "int8_file_bytes": int8_path.stat().st_size, "qat_checkpoint": str(qat_checkpoint) if qat_checkpoint else None,
        "config": plain(cfg),
    }
    summary = {f"final/{stage}/{key}": value for stage, result in results.items() for key, value in result["val"].items()}
    for logger in loggers:
        logger.log_metrics(summary)
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update(summary)
            record["wandb_dir"] = str(Path(logger.experiment.dir).parent)
            logger.experiment.finish()
        else:
            logger.save()
    write_run_record(output_dir / "run.json", record)
    print(_summary(record, output_dir), flush=True)
    return record


def _summary(record: dict[str, Any], output_dir: Path) -> str:
    results, fp32, qat = record["results"], record["results"]["fp32"], record["method"] == "qat"
    final = results["qat" if qat else "ptq"]
    mb = 1e6

    def ppl(stage: str) -> str:
        value = results[stage]["val"]["val/perplexity"]
        return f"{value:.3f} ({value / fp32['val']['val/perplexity'] - 1:+.2%})"

    perplexity = f"validation perplexity: fp32 {fp32['val']['val/perplexity']:.3f} | int8 PTQ {ppl('ptq')}"
    if qat:
        perplexity += (f" | int8 QAT {ppl('qat')}\n  (QAT's weights in fp32 {ppl('qat_fp32')}, "
                       f"fake-quantized {ppl('qat_fake_quant')})")
    generation = ""
    if fp32["generation_tokens_per_s"]:
        before, after = fp32["generation_tokens_per_s"], final["generation_tokens_per_s"]
        generation = f" | generation {before:,.0f} → {after:,.0f} ({after / before:.2f}×)"
    return "\n".join([
        "", "=" * 72,
        f"int8 {record['method']} ({record['scheme']} scheme) of {record['architecture']}: "
        f"{len(record['int8_layers'])} linear layers from {record['checkpoint']}",
        f"linear weights {fp32['linear_weight_bytes'] / mb:.2f} MB → {final['linear_weight_bytes'] / mb:.2f} MB "
        f"({record['linear_weight_ratio']:.2f}× smaller); state dict {fp32['state_dict_bytes'] / mb:.2f} MB → "
        f"{final['state_dict_bytes'] / mb:.2f} MB ({record['state_dict_ratio']:.2f}×)",
        perplexity,
        f"CPU tokens/s ({record['num_threads']} thread{'s' if record['num_threads'] > 1 else ''}): forward "
        f"{fp32['forward_tokens_per_s']:,.0f} → {final['forward_tokens_per_s']:,.0f} "
        f"({final['forward_tokens_per_s'] / fp32['forward_tokens_per_s']:.2f}×){generation}",
        f"int8 model: {record['int8_model']} (lm_lightning.compression.quantize.load_int8)",
        *([f"QAT checkpoint (fp32 weights): {record['qat_checkpoint']}"] if record["qat_checkpoint"] else []),
        f"W&B run folder: {record.get('wandb_dir') or '(W&B off)'}",
        f"run record: {output_dir / 'run.json'}",
        "=" * 72,
    ])


@hydra_command("quantize")
def main(cfg: DictConfig) -> float:
    record = quantize(cfg)
    return record["results"]["qat" if cfg.method == "qat" else "ptq"]["val"]["val/loss"]


if __name__ == "__main__":
    main()
