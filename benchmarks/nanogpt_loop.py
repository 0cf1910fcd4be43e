"""nanoGPT's training loop, written plainly in PyTorch over the same model, data and schedule as
``lm-lightning train experiment=shakespeare_char`` — a reference for loss and speed.

    python benchmarks/nanogpt_loop.py [--steps 2000] [--seed 1337] [--position rope|learned]

It prints the median step time, the whole-loop wall time and the validation loss over the
whole validation split (the same windows ``lm-lightning`` validates on), so the Lightning path
can be compared with a loop that has no framework at all.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lm_lightning.data.corpus import prepare_corpus
from lm_lightning.models.gpt import GPT, GPTConfig
from lm_lightning.tasks.language_model import weight_decay_groups
from lm_lightning.tasks.schedules import warmup_cosine

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--position", default="rope", help="rope (the experiment) or learned (nanoGPT's model)")
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/tinyshakespeare/input.txt"))
    parser.add_argument("--cache", default=str(REPO / ".cache/lm-lightning"))
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    corpus = prepare_corpus(
        {"name": "tinyshakespeare", "source": {"kind": "text", "path": args.data, "document_split": "file", "max_bytes": None},
         "cleaning": {"unicode_normalization": None, "strip_whitespace": False, "min_chars": 0},
         "split": {"mode": "contiguous", "val_fraction": 0.1, "test_fraction": 0.0, "seed": 0}},
        {"type": "char", "vocab_size": 0, "byte_fallback": False, "character_coverage": 1.0, "special_tokens": [],
         "input_sentence_size": 0, "max_sentence_length": 16384, "seed": 0, "num_threads": 2},
        args.cache,
    )
    train, val = corpus.tokens("train"), corpus.tokens("val")
    block, batch = 64, 12
    model = GPT(GPTConfig(vocab_size=corpus.tokenizer().vocab_size, block_size=block, n_layer=4, n_head=4, n_embd=128,
                          dropout=0.0, bias=False, position=args.position))
    optimizer = torch.optim.AdamW(weight_decay_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.99), fused=True)  # as the task picks
    scheduler = warmup_cosine(optimizer, total_steps=args.steps, warmup_steps=100, min_lr_ratio=0.1)

    def get_batch() -> torch.Tensor:
        ix = torch.randint(len(train) - block, (batch,))
        return torch.stack([torch.from_numpy(train[i : i + block + 1].astype(np.int64)) for i in ix])

    times = []
    start = time.perf_counter()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        xy = get_batch()
        logits = model(xy[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), xy[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    train_time = time.perf_counter() - start

    model.eval()
    nll, count = 0.0, 0
    with torch.inference_mode():
        starts = np.arange(0, len(val) - block, block)
        for i in range(0, len(starts), batch):
            xy = torch.stack([torch.from_numpy(val[s : s + block + 1].astype(np.int64)) for s in starts[i : i + batch]])
            logits = model(xy[:, :-1])
            nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)), xy[:, 1:].reshape(-1), reduction="sum").item()
            count += xy[:, 1:].numel()
    median = statistics.median(times)
    print(f"plain PyTorch loop: {args.steps} steps in {train_time:.1f} s, median step {median * 1000:.1f} ms "
          f"({batch * block / median:,.0f} tokens/s)")
    print(f"validation loss over the whole split ({math.ceil(len(starts) / batch)} batches): {nll / count:.4f}")


if __name__ == "__main__":
    main()
