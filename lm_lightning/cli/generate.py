"""``lm-lightning generate ckpt_path=<file.ckpt> prompt="..."``: sample text from a trained model."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from lm_lightning.config.app import hydra_command, set_threads
from lm_lightning.generation import check_sampling_options, generate_text
from lm_lightning.training.loading import load_trained


def generate(cfg: DictConfig) -> list[str]:
    check_sampling_options(cfg)  # before the checkpoint is read: a bad range costs no load
    set_threads(cfg.get("num_threads"))
    task, tokenizer = load_trained(cfg.ckpt_path)
    generator = torch.Generator().manual_seed(cfg.seed)
    samples = []
    for i in range(cfg.num_samples):
        text = generate_text(
            task.model, tokenizer, cfg.prompt, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
            top_k=cfg.top_k, top_p=cfg.top_p, use_cache=cfg.use_cache, generator=generator,
            beam_width=cfg.beam_width, length_penalty=cfg.length_penalty, stop=list(cfg.stop or []),
        )
        samples.append(text)
        print(f"--- sample {i + 1} ---\n{cfg.prompt}{text}", flush=True)
    return samples


@hydra_command("generate")
def main(cfg: DictConfig) -> None:
    generate(cfg)


if __name__ == "__main__":
    main()
