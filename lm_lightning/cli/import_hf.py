"""``lm-lightning import source=<folder> out=<file.ckpt>``: a Hugging Face ``transformers`` folder (GPT-2,
GPT-NeoX or Llama layout) as a checkpoint that ``train init_from=``, ``finetune``, ``generate``, ``evaluate``
and ``export`` take (layouts: :mod:`lm_lightning.interop.hf_import`)."""

from __future__ import annotations

from omegaconf import DictConfig

from lm_lightning.config.app import hydra_command, set_threads
from lm_lightning.interop.hf_export import transformers_module
from lm_lightning.interop.hf_import import import_from_hf


@hydra_command("import")
def main(cfg: DictConfig) -> str:
    set_threads(cfg.get("num_threads"))
    transformers_module().utils.logging.disable_progress_bar()  # one summary line, not a bar per file
    return str(import_from_hf(cfg.source, cfg.out, block_size=cfg.block_size, overwrite=cfg.overwrite,
                              verify=cfg.verify))


if __name__ == "__main__":
    main()
