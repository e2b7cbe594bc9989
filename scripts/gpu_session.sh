#!/usr/bin/env bash
# One call on a lent GPU: the GPU check (speed and fidelity against diffusers, the solvers per call, a kernel-time profile,
# the 256x256 model, training throughput, the streamed CLI), then candidates for the bundled digits
# model trained side by side and scored. Everything lands in $OUT (at most 7 files).
#   carry: .gpu (diffusers wheels in .gpu/wheels, data from scripts/make_digits.py in .gpu/digits)
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
CHECK_S=${CHECK_S:-270}
DIGITS_S=${DIGITS_S:-140}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
timeout $((CHECK_S + 30)) python3 scripts/gpu_check.py --out "$OUT" --budget "$CHECK_S" --modes default \
    --batches 1024 --baseline-runs 1 --lean --stages correctness,cifar10,solvers,profile,ddpm256,training,cli 2>&1 \
    | tee "$OUT/gpu_check.log"
timeout $((DIGITS_S + 100)) python3 scripts/train_digits.py .gpu/digits --seconds "$DIGITS_S" --out "$OUT" 2>&1 \
    | tee "$OUT/train_digits.log"
