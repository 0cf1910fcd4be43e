"""``lm-lightning prepare data=<corpus> tokenizer=<type>``: clean, dedup, split, train the
tokenizer, tokenize, cache; print the report and record it in W&B.

``lm-lightning prepare -m tokenizer=bpe,unigram,char,word`` prepares the same corpus with
each tokenizer and ends each job with its fertility (tokens per byte and per word); the
W&B runs of the sweep share one group, so the dashboard shows them side by side.
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from lm_lightning.data.corpus import prepare_corpus
from lm_lightning.data.prepared_corpus import PreparedCorpus
from lm_lightning.data.report import format_report, log_report
from lm_lightning.config.app import hydra_command, plain


def prepare(cfg: DictConfig) -> PreparedCorpus:
    corpus = prepare_corpus(plain(cfg.data.corpus), plain(cfg.tokenizer), cfg.paths.cache_dir, force=cfg.force,
                            num_proc=cfg.num_proc)
    report = corpus.report()
    print(format_report(report))
    print(f"prepared corpus: {corpus.directory} (report: {corpus.directory / corpus.metadata['report_file']})")
    print(f"tokenizer: {corpus.tokenizer_path}")
    hydra = HydraConfig.get()
    group = f"prepare-{Path(hydra.sweep.dir).name}" if hydra.mode == RunMode.MULTIRUN else None
    run_dir = log_report(report, cfg.wandb_mode, hydra.runtime.output_dir, group=group)
    if run_dir:
        print(f"W&B run: {run_dir}")
    return corpus


@hydra_command("prepare")
def main(cfg: DictConfig) -> None:
    prepare(cfg)


if __name__ == "__main__":
    main()
