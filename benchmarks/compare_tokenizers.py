"""Compare tokenizers on the same corpus at equal vocabulary size: tokens per byte and per
word, share of held-out tokens inside the vocabulary (not <unk> or byte fallback), training
time, and bits per byte (UTF-8 bytes of the text, so tokenizers compare) of two models: the
unigram model of the validation tokens (the best that ignores context, no training needed)
and, with ``--train-steps``, a small GPT trained on each tokenizer's tokens with the same
settings. Each row is one ``prepare_corpus`` (cached, so a rerun only trains and prints).

    python benchmarks/compare_tokenizers.py --data lm_lightning/conf/data/gutenberg.yaml --max-bytes 10000000 --vocab-size 8192
    python benchmarks/compare_tokenizers.py --data lm_lightning/conf/data/tinyshakespeare.yaml --vocab-size 1024 --train-steps 600

The same comparison from the CLI, one W&B run per tokenizer in one sweep group:
``lm-lightning prepare -m data=gutenberg tokenizer=bpe,unigram,char,word,byte,byte_bpe tokenizer.vocab_size=8192``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from lm_lightning.data.corpus import prepare_corpus
from lm_lightning.data.prepared_corpus import unigram_entropy

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO / "lm_lightning/conf/data/gutenberg.yaml", help="a conf/data/*.yaml")
    parser.add_argument("--max-bytes", type=int, default=10_000_000, help="bytes of text to use")
    parser.add_argument("--vocab-size", type=int, default=8192, help="tokens, for every type but char and byte")
    parser.add_argument("--types", default="bpe,unigram,char,word,byte,byte_bpe", help="conf/tokenizer/*.yaml names")
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--cache-dir", default=os.environ.get("LM_LIGHTNING_CACHE", ".cache/lm-lightning"))
    parser.add_argument("--train-steps", type=int, default=0, help="train a GPT this many steps per tokenizer; 0 = none")
    parser.add_argument("--train-overrides", default="experiment=tiny",
                        help="lm-lightning train overrides for that model, space-separated (the tiny 2 x 32 GPT, context 32)")
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
        corpus = prepare_corpus(data, tok, args.cache_dir, num_proc=args.num_proc)
        t = corpus.report()["tokenizer"]
        split = "val" if "val" in corpus.metadata["splits"] else "train"
        tokens = corpus.tokens(split)
        unigram_bpb = unigram_entropy(tokens, t["vocab_size"]) * len(tokens) / (corpus.num_bytes(split) * math.log(2))
        model_bpb = _trained_bpb(args, kind) if args.train_steps else None
        rows.append((kind, t["vocab_size"], t["tokens_per_byte"], t["tokens_per_word"], t["coverage"],
                     t["training_seconds"], unigram_bpb, model_bpb))
    text_bytes = sum(s["bytes"] for s in corpus.metadata["splits"].values())
    print(f"{args.data.name}, {text_bytes / 1e6:.2f} MB of text, vocabulary {args.vocab_size}; bits per byte on "
          f"the {split} split" + (f", model: {args.train_overrides} trained {args.train_steps} steps" if args.train_steps else ""))
    print(f"{'tokenizer':<10} {'vocab':>7} {'tokens/byte':>12} {'tokens/word':>12} {'coverage':>9} {'train s':>8} "
          f"{'unigram bpb':>12} {'model bpb':>10}")
    for kind, vocab, tpb, tpw, cov, sec, unigram_bpb, model_bpb in rows:
        model = f"{model_bpb:>10.4f}" if model_bpb is not None else f"{'-':>10}"
        print(f"{kind:<10} {vocab:>7,} {tpb:>12.4f} {tpw:>12.3f} {cov:>9.2%} {sec:>8.1f} {unigram_bpb:>12.4f} {model}")


def _trained_bpb(args: argparse.Namespace, kind: str) -> float:
    """Final validation bits per byte of ``lm-lightning train`` on this corpus with this tokenizer."""
    steps = args.train_steps
    with tempfile.TemporaryDirectory() as run:
        overrides = [*args.train_overrides.split(), f"data={args.data.stem}", f"data.corpus.source.max_bytes={args.max_bytes}",
                     f"tokenizer={kind}", f"tokenizer.vocab_size={args.vocab_size}", f"trainer.max_steps={steps}",
                     f"trainer.val_check_interval={steps}", "trainer.limit_val_batches=1.0", "sample.max_new_tokens=0",
                     "logger=csv", f"hydra.run.dir={run}"]
        env = {**os.environ, "LM_LIGHTNING_CACHE": str(Path(args.cache_dir).resolve())}
        proc = subprocess.run([sys.executable, "-m", "lm_lightning", "train", *overrides], cwd=run, env=env,
                              capture_output=True, text=True, check=False)
        if proc.returncode:
            sys.exit(f"lm-lightning train {' '.join(overrides)} failed:\n{proc.stderr[-3000:]}")
        return json.loads((Path(run) / "run.json").read_text())["final"]["val/bpb"]


if __name__ == "__main__":
    main()
