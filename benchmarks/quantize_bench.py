"""Size and CPU speed of a GPT checkpoint in fp32 and int8 (weight-only, dynamic), with torch's deprecated
``torch.ao.quantization.quantize_dynamic`` as a reference point, in one run (machines are shared and
noisy: compare the ratios, not the figures).

    python benchmarks/quantize_bench.py                                  # the gutenberg_small best.ckpt
    python benchmarks/quantize_bench.py --ckpt <file.ckpt> --threads 1 --batch 8 --new-tokens 64

Figures: bytes of the linear layers' weights (int8: with their row scales; a head tied to the embedding
not counted) and of the whole state dict; forward tokens/s over (batch, context) windows and greedy
generation tokens/s (batch 1, KV cache), the models timed in turns, each its fastest of ``--repeats``
runs; and the largest logit error against fp32 relative to the largest fp32 logit. Validation perplexity needs the checkpoint's data:
``lm-lightning quantize experiment=quant_ptq ckpt_path=...`` reports it.
"""

from __future__ import annotations

import argparse
import copy
import glob
import io
import warnings

import torch
from torch import nn

from lm_lightning.compression.quantize import (
    forward_tokens_per_second,
    generation_tokens_per_second,
    linear_weight_bytes,
    quantize_linears,
    state_dict_bytes,
)
from lm_lightning.training.loading import load_trained

DEFAULT_CKPT = "outputs/gutenberg_small/runs/*/checkpoints/best.ckpt"


def torch_ao_dynamic(model: nn.Module) -> nn.Module:
    """torch's own eager dynamic quantization (fbgemm int8 kernels; 7-bit activations, per-channel weights)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        linears = {name: per_channel_dynamic_qconfig for name, m in model.named_modules()
                   if type(m) is nn.Linear and m.weight is not model.wte.weight}
        return quantize_dynamic(copy.deepcopy(model), linears)


def saved_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=DEFAULT_CKPT, help="a GPT checkpoint (a glob: the newest match)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--batch", type=int, default=8, help="windows per timed forward pass")
    parser.add_argument("--new-tokens", type=int, default=64, help="generated tokens per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs; the fastest counts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    paths = sorted(glob.glob(args.ckpt))
    if not paths:
        raise SystemExit(f"no checkpoint matches {args.ckpt}: train one (lm-lightning train experiment=gutenberg_small)")
    task, _ = load_trained(paths[-1])
    fp32 = task.model.eval()
    weight_only, dynamic = copy.deepcopy(fp32), copy.deepcopy(fp32)
    quantize_linears(weight_only, "weight")
    quantize_linears(dynamic, "dynamic")
    variants = {"fp32": fp32, "int8 weight-only": weight_only, "int8 dynamic": dynamic,
                "torch.ao quantize_dynamic": torch_ao_dynamic(fp32)}
    context = fp32.config.block_size
    idx = torch.randint(fp32.config.vocab_size, (4, context), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference = fp32(idx)
    print(f"checkpoint {paths[-1]}: {fp32.parameter_count().total:,} parameters, context {context}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print(f"{'model':<26} {'linear MB':>9} {'state MB':>8} {'file MB':>8} {'fwd tok/s':>10} {'gen tok/s':>9} {'max |Δlogit|':>12}")
    forward = forward_tokens_per_second(variants, args.batch, context, args.repeats)
    generation = generation_tokens_per_second(variants, args.new_tokens, args.repeats)
    base = {}
    for name, model in variants.items():
        with torch.inference_mode():
            error = (model(idx) - reference).abs().max().item() / reference.abs().max().item()
        native = not name.startswith("torch.ao")  # packed fbgemm weights hide from state-dict accounting
        row = {"linear": linear_weight_bytes(model) if native else None,
               "state": state_dict_bytes(model) if native else None, "file": saved_bytes(model),
               "forward": forward[name], "generate": generation[name]}
        base = base or row

        def cell(key: str, scale: float = 1e6) -> str:
            if row[key] is None:
                return "-"
            return f"{row[key] / scale:.2f}" if scale != 1 else f"{row[key]:,.0f}"

        print(f"{name:<26} {cell('linear'):>9} {cell('state'):>8} {cell('file'):>8} {cell('forward', 1):>10} "
              f"{cell('generate', 1):>9} {error:>11.2%}")
        if row is not base:
            ratios = [f"linear weights {base['linear'] / row['linear']:.2f}× smaller" if row["linear"] else None,
                      f"file {base['file'] / row['file']:.2f}× smaller",
                      f"forward {row['forward'] / base['forward']:.2f}×", f"generation {row['generate'] / base['generate']:.2f}×"]
            print(f"{'':<26} " + ", ".join(r for r in ratios if r))


if __name__ == "__main__":
    main()
