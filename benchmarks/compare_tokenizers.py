"""Compare tokenizers on the same corpus at equal vocabulary size: tokens per byte and per
word, share of held-out tokens inside the vocabulary (not <unk> or byte fallback), and
training time. Each row is one ``prepare_corpus`` (cached, so a rerun only prints).

    python benchmarks/compare_tokenizers.py --data lm_lightning/conf/data/gutenberg.yaml --max-bytes 10000000 --vocab-size 8192

The same comparison from the CLI, one W&B run per tokenizer in one sweep group:
``lm-lightning prepare -m data=gutenberg tokenizer=bpe,unigram,char,word tokenizer.vocab_size=8192``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from omegaconf import OmegaConf

from lm_lightning.data.corpus import prepare_corpus

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO / "lm_lightning/conf/data/gutenberg.yaml", help="a conf/data/*.yaml")
    parser.add_argument("--max-bytes", type=int, default=10_000_000, help="bytes of text to use")
    parser.add_argument("--vocab-size", type=int, default=8192, help="pieces, for every type but char")
    parser.add_argument("--types", default="bpe,unigram,char,word")
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--cache-dir", default=os.environ.get("LM_LIGHTNING_CACHE", ".cache/lm-lightning"))
    args = parser.parse_args()

    OmegaConf.register_new_resolver("repo_dir", lambda: str(REPO), replace=True)
    conf = OmegaConf.load(args.data)
    conf.paths = OmegaConf.load(REPO / "lm_lightning/conf/paths/default.yaml")
    data = OmegaConf.to_container(conf.corpus, resolve=True)
    data["source"]["max_bytes"] = args.max_bytes
    rows = []
    for kind in args.types.split(","):
        tok = {**OmegaConf.to_container(OmegaConf.load(REPO / f"lm_lightning/conf/tokenizer/{kind}.yaml")),
               "vocab_size": args.vocab_size, "verbose": False}
        t = prepare_corpus(data, tok, args.cache_dir, num_proc=args.num_proc).report()["tokenizer"]
        rows.append((kind, t["vocab_size"], t["tokens_per_byte"], t["tokens_per_word"], t["coverage"], t["training_seconds"]))
    print(f"{args.data.name}, first {args.max_bytes / 1e6:.0f} MB, vocabulary {args.vocab_size}")
    print(f"{'tokenizer':<10} {'vocab':>7} {'tokens/byte':>12} {'tokens/word':>12} {'coverage':>9} {'train s':>8}")
    for kind, vocab, tpb, tpw, cov, sec in rows:
        print(f"{kind:<10} {vocab:>7,} {tpb:>12.4f} {tpw:>12.3f} {cov:>9.2%} {sec:>8.1f}")


if __name__ == "__main__":
    main()
