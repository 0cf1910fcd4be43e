"""``lm-lightning evaluate harness ckpt_path=<file.ckpt> tasks=[...]``: EleutherAI's lm-evaluation-harness tasks on
a checkpoint (:mod:`lm_lightning.evaluation.harness`), offline; lm-eval's table, the tracker's metrics and summary,
and ``run.json`` in the run folder."""

from __future__ import annotations

from typing import Any

import lm_eval
import torch
from omegaconf import DictConfig

from lm_lightning.config.app import hydra_command, plain, set_threads
from lm_lightning.evaluation.harness import LightningLM, figures, results_table, run_tasks
from lm_lightning.training.job import Job


def evaluate_harness(cfg: DictConfig) -> dict[str, Any]:
    set_threads(cfg.get("num_threads"))
    tasks = [cfg.tasks] if isinstance(cfg.tasks, str) else list(cfg.tasks)
    lm = LightningLM(ckpt_path=cfg.ckpt_path, batch_size=cfg.batch_size, device=_device(cfg.accelerator),
                     max_length=cfg.max_length, max_gen_toks=cfg.max_gen_toks, seed=cfg.seed)
    with Job(cfg, {"model": lm.get_model_info()}) as job:
        results = run_tasks(lm, tasks, list(cfg.include_path), cfg.include_defaults,
                            metadata={k: v for k, v in cfg.metadata.items() if v is not None},
                            num_fewshot=cfg.num_fewshot, limit=cfg.limit, bootstrap_iters=cfg.bootstrap_iters,
                            seed=cfg.seed)
        values = figures(results, lm)
        print(results_table(results, lm), flush=True)
        summary = {f"harness/{name}": value for name, value in values.items()}
        job.log_metrics(summary)
        record = {
            "command": "evaluate harness", "run_name": job.run_name, "group": job.group,
            "checkpoint": str(cfg.ckpt_path), "model": lm.get_model_info(), "lm_eval_version": lm_eval.__version__,
            "tasks": tasks, "figures": values, "results": results["results"], "groups": results.get("groups", {}),
            "versions": results.get("versions"), "n-shot": results.get("n-shot"), "n-samples": results.get("n-samples"),
            "config": plain(cfg),
        }
        model = f"{cfg.ckpt_path} ({lm.model.config.family}, context {lm.max_length} tokens)"
        banner = [f"lm-eval {lm_eval.__version__} on {model}", *_figure_lines(values), *job.where()]
        return job.finish(record, banner, summary=summary)


def _device(accelerator: str) -> str:
    """``cpu | gpu | auto`` → a torch device."""
    return "cuda" if accelerator == "gpu" or (accelerator == "auto" and torch.cuda.is_available()) else "cpu"


def _figure_lines(values: dict[str, float]) -> list[str]:
    """``<task>/<metric>: value ± stderr``, one line per figure."""
    lines = []
    for name, value in values.items():
        if name.endswith(("_stderr", "/tokens")):
            continue
        task, metric = name.split("/", 1)
        base, _, filter_name = metric.partition("/")
        stderr = values.get(f"{task}/{base}_stderr" + (f"/{filter_name}" if filter_name else ""))
        lines.append(f"{name}: {value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else ""))
    return lines


@hydra_command("evaluate_harness")
def main(cfg: DictConfig) -> None:
    evaluate_harness(cfg)


if __name__ == "__main__":
    main()
