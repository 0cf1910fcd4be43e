"""Throughput of the data pipeline on the Gutenberg corpus (paragraphs as documents):
cleaning, dedup (ours against the datasketch library, same shingles and permutation count,
side by side) and tokenization with 1 and 2 processes. Prints docs/s and MB/s.

    python benchmarks/data_pipeline.py --tokenizer <a .model file> [--dedup-mb 20]

Needs ``pip install -e ".[bench]"`` (datasketch). Not a test: it takes minutes.
"""

from __future__ import annotations

import argparse
import re
import resource
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from lm_lightning.data import corpus as corpus_module
from lm_lightning.data.cleaning import clean_documents
from lm_lightning.data.dedup import DedupConfig, MinHasher, near_duplicates
from lm_lightning.data.parallel import batched, ordered_map
from lm_lightning.data.sources import iter_documents

REPO = Path(__file__).resolve().parents[1]
WORD = re.compile(r"\w+")


def line(stage: str, docs: int, nbytes: int, seconds: float, extra: str = "") -> None:
    print(f"{stage:<34} {docs / seconds:>10,.0f} docs/s {nbytes / seconds / 1e6:>8.2f} MB/s  ({seconds:.1f} s){extra}", flush=True)


def ours(docs: list[str], cfg: DedupConfig) -> tuple[np.ndarray, dict]:
    signatures = MinHasher(cfg.num_perm, cfg.ngram, cfg.seed).signatures(docs)
    return near_duplicates(signatures, cfg, docs.__getitem__, progress=False)


def datasketch_dedup(docs: list[str], cfg: DedupConfig) -> np.ndarray:
    """datasketch MinHash (bulk, its fastest path) + MinHashLSH; a document is a duplicate when
    the LSH index already holds a candidate for it, else it is inserted."""
    from datasketch import MinHash, MinHashLSH

    n = cfg.ngram
    shingle_lists = []
    for text in docs:
        words = WORD.findall(text.lower())
        shingle_lists.append([" ".join(words[i:i + n]).encode() for i in range(max(len(words) - n + 1, 1))])
    minhashes = MinHash.bulk(shingle_lists, num_perm=cfg.num_perm, seed=cfg.seed)
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
    keep = np.ones(len(docs), dtype=bool)
    for i, m in enumerate(minhashes):
        if lsh.query(m):
            keep[i] = False
        else:
            lsh.insert(i, m)
    return keep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, help="sentencepiece .model for the tokenization figures")
    parser.add_argument("--dedup-mb", type=float, default=20.0, help="MB of paragraphs for the dedup comparison (0: skip)")
    args = parser.parse_args()

    data = OmegaConf.load(REPO / "lm_lightning/conf/data/gutenberg.yaml").corpus
    source = OmegaConf.to_container(data.source)
    source["path"] = "/work/shared/data/gutenberg/gutenberg_en_prose.jsonl.gz"
    cleaning = OmegaConf.to_container(data.cleaning)

    clock = time.perf_counter()
    raw = list(iter_documents(source))
    raw_bytes = sum(len(d.encode()) for d in raw)
    line("read + split (jsonl.gz)", len(raw), raw_bytes, time.perf_counter() - clock)

    clock = time.perf_counter()
    cleaned = list(clean_documents(raw, cleaning))
    line("cleaning, 1 process", len(raw), raw_bytes, time.perf_counter() - clock)

    if args.dedup_mb > 0:
        compare_dedup(cleaned, args.dedup_mb)
    if args.tokenizer:
        compare_tokenization(cleaned, args.tokenizer)


def compare_dedup(cleaned: list[str], megabytes: float) -> None:
    subset, total = [], 0
    for d in cleaned:
        if total >= megabytes * 1e6:
            break
        subset.append(d)
        total += len(d.encode())
    cfg = DedupConfig(near=True)
    print(f"near dedup on {len(subset):,} paragraphs ({total / 1e6:.1f} MB): word {cfg.ngram}-gram shingles, "
          f"{cfg.num_perm} permutations, threshold {cfg.threshold}, 1 process each")
    clock = time.perf_counter()
    keep, stats = ours(subset, cfg)
    line("  lm_lightning dedup", len(subset), total, time.perf_counter() - clock,
         f"  removed {(~keep).sum():,} (LSH {stats['near_bands']}x{stats['near_rows']}, exact-Jaccard verified)")
    clock = time.perf_counter()
    ds_keep = datasketch_dedup(subset, cfg)
    line("  datasketch MinHash + MinHashLSH", len(subset), total, time.perf_counter() - clock,
         f"  removed {(~ds_keep).sum():,} (unverified LSH candidates)")
    print(f"  agreement on removed documents: {((~keep) & (~ds_keep)).sum():,} removed by both")


def _cpu_seconds() -> float:
    """User + system CPU of this process and its finished children (the pool's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def compare_tokenization(cleaned: list[str], tokenizer: Path) -> None:
    """The prepare tokenization stage (batches to worker processes, one sentencepiece thread each)."""
    nbytes = sum(len(d.encode()) for d in cleaned)
    for num_proc in (1, 2):
        clock, cpu = time.perf_counter(), _cpu_seconds()
        items = batched((("train", d) for d in cleaned), corpus_module._BATCH_DOCS, corpus_module._BATCH_CHARS,
                        size=lambda item: len(item[1]))
        results = ordered_map(corpus_module._tokenize_batch, items, num_proc, corpus_module._init_tokenize_worker, (tokenizer,))
        tokens = sum(len(result[1]) for result in results)
        line(f"tokenization, {num_proc} process{'es' if num_proc > 1 else ''}", len(cleaned), nbytes,
             time.perf_counter() - clock, f"  {tokens:,} tokens, {_cpu_seconds() - cpu:.1f} CPU s (all processes)")


if __name__ == "__main__":
    main()
