"""``lm-lightning export ckpt_path=<file.ckpt> out_dir=<folder>``: a trained GPT as a Hugging Face
``transformers`` folder that ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads and runs with the
platform's logits (layouts: :mod:`lm_lightning.interop.hf_export`)."""

from __future__ import annotations

from omegaconf import DictConfig

from lm_lightning.config.app import hydra_command, set_threads
from lm_lightning.interop.hf_export import export_to_hf, transformers_module


@hydra_command("export")
def main(cfg: DictConfig) -> str:
    set_threads(cfg.get("num_threads"))
    transformers_module().utils.logging.disable_progress_bar()  # one summary line, not a bar per file
    return str(export_to_hf(cfg.ckpt_path, cfg.out_dir, overwrite=cfg.overwrite, verify=cfg.verify))


if __name__ == "__main__":
    main()
