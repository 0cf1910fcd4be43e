#!/usr/bin/env bash
# Issue 19's GPU check, under 8 minutes on one H100: GPT-2 124M (12 x 768, context 1024, vocabulary 50304)
# on synthetic tokens, compiled, through `lm-lightning train`: 20 steps each of bf16-mixed, fsdp, fsdp2,
# fp16-mixed (loss scaling) and bf16-true with tokens/s and MFU against 989 TFLOP/s; a kill-and-resume of
# 10 steps; peak torch.cuda.max_memory_allocated against `lm-lightning estimate`.
# Without a GPU: composes every config it would run, says so in one line and exits 0.
#   benchmarks/gpu_check.sh [--out outputs/gpu_check] [--steps 20] [--only fsdp2 resume] [--print-config]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec python "$here/gpu_check.py" "$@"
