"""``lm-lightning distill teacher_ckpt=<teacher.ckpt>``: knowledge distillation of a trained teacher into a
student (the ``model`` group), on the teacher's corpus and tokenizer. The run is ``lm-lightning train``'s
(same data, checkpoints, metrics, run record and summary) with a DistillationTask for the LightningModule.

    lm-lightning distill experiment=distill teacher_ckpt=outputs/gutenberg_small/runs/<time>/checkpoints/best.ckpt
    lm-lightning distill experiment=distill teacher_ckpt=... distill.alpha=0.9 distill.hidden_weight=1.0
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lm_lightning.cli import train as training
from lm_lightning.compression.distill import DistillationConfig, DistillationTask, check_same_tokenizer
from lm_lightning.data.tokenizer import Tokenizer
from lm_lightning.errors import UserError
from lm_lightning.config.app import hydra_command, plain, set_threads
from lm_lightning.training.loading import load_trained
from lm_lightning.tracking.sweep import sweep_row

log = logging.getLogger("lm_lightning.cli.distill")


def distill(cfg: DictConfig) -> dict[str, Any]:
    """Trains the student against the teacher; returns the run record (``<run>/run.json``) with the teacher's
    checkpoint, size and shape and the distillation settings added."""
    if OmegaConf.is_missing(cfg, "teacher_ckpt") or not cfg.teacher_ckpt:
        raise UserError("teacher_ckpt is required: "
                        "lm-lightning distill teacher_ckpt=<a checkpoint of lm-lightning train>")
    if not Path(cfg.teacher_ckpt).exists():  # load_trained's message would name ckpt_path
        raise UserError(f"teacher_ckpt={cfg.teacher_ckpt} not found: pass a checkpoint of lm-lightning train")
    config = DistillationConfig(**plain(cfg.distill))
    set_threads(cfg.get("num_threads"))
    teacher_task, teacher_tokenizer = load_trained(cfg.teacher_ckpt)
    teacher = teacher_task.model
    teacher_params = teacher.parameter_count()
    log.info("teacher %s: %s parameters", cfg.teacher_ckpt, f"{teacher_params.total:,}")
    build = functools.partial(_distillation_task, teacher=teacher, tokenizer=teacher_tokenizer, config=config,
                              teacher_ckpt=str(cfg.teacher_ckpt))
    shape = {k: getattr(teacher.config, k, None) for k in ("family", "n_layer", "n_head", "n_embd")}

    def extend(record: dict[str, Any]) -> list[str]:
        record["teacher"] = {"checkpoint": str(cfg.teacher_ckpt), "parameters": teacher_params.as_dict(),
                             "shape": shape}
        record["distill"] = vars(config)
        return _summary_lines(record) if record["status"] == "finished" else []

    # train() builds a DistillationTask instead of its LanguageModelTask; everything else of train() (data,
    # loggers, callbacks, checkpoints, record, summary) is unchanged, the teacher added to the record and banner
    return training.train(cfg, task_class=build, extend=extend)


def _distillation_task(teacher, tokenizer: Tokenizer, config: DistillationConfig, teacher_ckpt: str,
                       **task_kwargs) -> DistillationTask:
    check_same_tokenizer(tokenizer, task_kwargs["tokenizer_model"], teacher_ckpt)
    return DistillationTask(**task_kwargs).set_teacher(teacher, config)


def _summary_lines(record: dict[str, Any]) -> list[str]:
    teacher, final, settings = record["teacher"], record["final"], record["distill"]
    teacher_total, student_total = teacher["parameters"]["total"], record["parameters"]["total"]
    return [
        f"distilled from {teacher['checkpoint']}",
        f"teacher: {teacher_total:,} parameters ({teacher['shape']['n_layer']} x {teacher['shape']['n_embd']}); "
        f"student: {student_total:,} ({teacher_total / student_total:.1f}x fewer)",
        f"temperature {settings['temperature']}, alpha {settings['alpha']}, hidden_weight {settings['hidden_weight']}",
        f"validation (same batches): student loss {final['val/loss']:.4f}, "
        f"teacher loss {final['val/teacher_loss']:.4f}, soft-target loss {final['val/kd_loss']:.4f} nats/token",
    ]


@hydra_command("distill")
def main(cfg: DictConfig) -> float | None:
    return sweep_row(distill(cfg))


if __name__ == "__main__":
    main()
