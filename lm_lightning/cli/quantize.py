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
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig

from lm_lightning.compression.measure import checkpoint_data, measure, speeds, validation_metrics
from lm_lightning.compression.qat import quantization_aware_training
from lm_lightning.compression.quantize import check_supported, quantize_linears, save_int8, select_linears
from lm_lightning.errors import UserError
from lm_lightning.config.app import hydra_command, plain, set_threads
from lm_lightning.training.job import Job
from lm_lightning.training.loading import load_trained

log = logging.getLogger("lm_lightning")
METHODS = ("ptq_weight", "ptq_dynamic", "qat")


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
    with Job(cfg) as job:
        fp32 = task.model
        int8 = copy.deepcopy(fp32)
        quantize_linears(int8, scheme, layers)
        results = {"fp32": measure(task, fp32, data, cfg), "ptq": measure(task, int8, data, cfg)}
        timed = {"fp32": fp32, "ptq": int8}
        qat_checkpoint = job.output_dir / "checkpoints" / "qat.ckpt" if cfg.method == "qat" else None
        if qat_checkpoint:
            fake_quant = quantization_aware_training(cfg, task, data, scheme == "dynamic", layers, job,
                                                     qat_checkpoint).model
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
        int8_path = save_int8(job.output_dir / "checkpoints" / "int8.pt", int8, task.hparams, task.tokenizer_model)

        final = results["qat" if qat_checkpoint else "ptq"]
        record = {
            "run_name": job.run_name, "group": job.group, "method": cfg.method, "scheme": scheme,
            "checkpoint": str(cfg.ckpt_path), "architecture": task.hparams.model.get("family"), "int8_layers": layers,
            "results": results,
            "linear_weight_ratio": results["fp32"]["linear_weight_bytes"] / final["linear_weight_bytes"],
            "state_dict_ratio": results["fp32"]["state_dict_bytes"] / final["state_dict_bytes"],
            "num_threads": torch.get_num_threads(), "int8_model": str(int8_path),
            "int8_file_bytes": int8_path.stat().st_size,
            "qat_checkpoint": str(qat_checkpoint) if qat_checkpoint else None, "config": plain(cfg),
        }
        summary = {f"final/{stage}/{key}": value for stage, result in results.items()
                   for key, value in result["val"].items()}
        job.log_metrics(summary)
        return job.finish(record, [*_summary_lines(record), *job.where()], summary=summary)


def _summary_lines(record: dict[str, Any]) -> list[str]:
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
    return [
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
    ]


@hydra_command("quantize")
def main(cfg: DictConfig) -> float:
    record = quantize(cfg)
    return record["results"]["qat" if cfg.method == "qat" else "ptq"]["val"]["val/loss"]


if __name__ == "__main__":
    main()
