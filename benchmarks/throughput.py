"""Throughput of the platform's Trainer path against a plain PyTorch loop: same GPT, same batches, same
optimizer, measured in one run (machines are shared and noisy: compare the ratio, not the figures).

    python benchmarks/throughput.py                       # both CPU shapes of issue 7, fp32, compile off
    python benchmarks/throughput.py --shapes gpt2 --precision bf16-mixed --compile --device cuda

Shapes: ``nanogpt`` = BASELINES.md's CPU nanoGPT run (4 layers, 4 heads, 128 wide, context 64, batch 12,
65 characters); ``small`` = 6 layers, 6 heads, 384 wide, context 256, batch 4; ``gpt2`` = GPT-2 124M
(12 × 768, context 1024, vocabulary 50304, batch 16). Both paths train ``--steps`` steps; the median
step time is taken after ``--warmup`` steps, as wall time between consecutive step ends (data
loading and all framework work included). MFU is against ``--peak`` (default: 129 GFLOP/s on CPU,
BASELINES.md; 989 TFLOP/s for bf16 on an H100).
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lm_lightning.models.gpt import GPT, GPTConfig
from lm_lightning.tasks.language_model import LanguageModelTask, weight_decay_groups

SHAPES = {
    "nanogpt": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65, batch=12),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65, batch=4),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, batch=16),
}
AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def model_config(shape: dict) -> dict:
    return {k: v for k, v in shape.items() if k != "batch"} | {"dropout": 0.0, "bias": False}


def batches(shape: dict, steps: int, seed: int = 0) -> list[torch.Tensor]:
    """``steps`` random windows batches of shape (batch, block_size + 1), identical for both paths."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(shape["vocab_size"], (shape["batch"], shape["block_size"] + 1), generator=g)
            for _ in range(steps)]


def plain_loop(shape: dict, data: list[torch.Tensor], device: str, precision: str, compile: bool) -> list[float]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**model_config(shape))).to(device)
    if compile:
        model.compile()
    optimizer = torch.optim.AdamW(weight_decay_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.99))
    ends = [time.perf_counter()]
    for xy in data:
        xy = xy.to(device, non_blocking=True)
        with torch.autocast(device, dtype=AUTOCAST.get(precision, torch.float32), enabled=precision in AUTOCAST):
            logits = model(xy[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), xy[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the loop synchronises once a step, as Lightning's loss logging does
        ends.append(time.perf_counter())
    return [b - a for a, b in zip(ends, ends[1:])]


class StepEnds(L.Callback):
    def __init__(self) -> None:
        self.ends = [0.0]

    def on_train_start(self, trainer, pl_module) -> None:
        self.ends = [time.perf_counter()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())


def trainer_path(shape: dict, data: list[torch.Tensor], device: str, precision: str, compile: bool) -> list[float]:
    torch.manual_seed(0)
    task = LanguageModelTask(
        model={"_target_": "lm_lightning.models.gpt.build_gpt", **model_config(shape)},
        objective={"_target_": "lm_lightning.objectives.causal_lm.CausalLM"},
        optimizer=partial(torch.optim.AdamW, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1),
        compile=compile,
    )
    timer = StepEnds()
    trainer = L.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision=precision, max_steps=len(data),
        gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[timer], limit_val_batches=0, num_sanity_val_steps=0,
    )
    loader = DataLoader(data, batch_size=None, shuffle=False, pin_memory=device == "cuda")
    trainer.fit(task, train_dataloaders=loader)
    return [b - a for a, b in zip(timer.ends, timer.ends[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["nanogpt", "small"], choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=30, help="steps per path (median over those after warm-up)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "16-mixed", "bf16-true"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the model in both paths")
    parser.add_argument("--peak", type=float, default=None, help="peak FLOP/s for MFU")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = args.peak or (129e9 if args.device == "cpu" else 989e12)
    print(f"device {args.device}, {torch.get_num_threads()} threads, precision {args.precision}, "
          f"compile {'on' if args.compile else 'off'}, {args.steps} steps, median after {args.warmup}, peak {peak:.4g} FLOP/s")
    for name in args.shapes:
        shape = SHAPES[name]
        data = batches(shape, args.steps)
        flops_per_token = GPT(GPTConfig(**model_config(shape))).flops_per_token()
        tokens = shape["batch"] * shape["block_size"]
        results = {}
        for path, fn in (("plain PyTorch", plain_loop), ("Trainer", trainer_path)):
            results[path] = statistics.median(fn(shape, data, args.device, args.precision, args.compile)[args.warmup:])
        print(f"\n{name}: {shape['n_layer']} layers x {shape['n_embd']} wide, context {shape['block_size']}, "
              f"batch {shape['batch']} ({tokens} tokens/step), {flops_per_token:.4g} FLOPs/token")
        for path, median in results.items():
            rate = tokens / median
            print(f"  {path:<14} median step {median * 1000:8.2f} ms  {rate:10,.0f} tokens/s  "
                  f"MFU {rate * flops_per_token / peak:6.2%}")
        ratio = results["plain PyTorch"] / results["Trainer"]
        print(f"  Trainer / plain tokens/s = {ratio:.3f} ({(ratio - 1) * 100:+.1f}%)")


if __name__ == "__main__":
    main()
