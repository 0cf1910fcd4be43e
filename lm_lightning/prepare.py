"""``lm-lightning prepare data=<corpus> tokenizer=<type>``: clean, split, train the tokenizer, tokenize, cache."""

from __future__ import annotations

import json

from omegaconf import DictConfig

from lm_lightning.data.corpus import PreparedCorpus, prepare_corpus
from lm_lightning.runtime import hydra_command, plain


def prepare(cfg: DictConfig) -> PreparedCorpus:
    corpus = prepare_corpus(plain(cfg.data.corpus), plain(cfg.tokenizer), cfg.paths.cache_dir, force=cfg.force)
    meta = corpus.metadata
    print(f"prepared corpus: {corpus.directory}")
    print(f"tokenizer: {corpus.tokenizer_path} ({meta['tokenizer']['type']}, {meta['tokenizer']['vocab_size']} pieces)")
    for split, info in meta["splits"].items():
        if info.get("tokens"):
            print(f"  {split:<5} {info['documents']:>8,} documents {info['bytes']:>13,} bytes {info['tokens']:>12,} tokens"
                  f"  ({info['bytes'] / info['tokens']:.3f} bytes/token)")
    print(json.dumps(meta.get("cleaning_stats", {}), sort_keys=True))
    return corpus


@hydra_command("prepare")
def main(cfg: DictConfig) -> None:
    prepare(cfg)


if __name__ == "__main__":
    main()
