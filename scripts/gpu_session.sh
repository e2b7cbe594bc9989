#!/usr/bin/env bash
# One call on a lent GPU, about 6.5 minutes: first the distillation numbers (scripts/gpu_distill.py: time per
# 1,000 updates of `distill --steps 2` on the CIFAR-10 architecture; digits students at 1, 2, 4 calls scored
# against DDIM-50), then the GPU check (scripts/gpu_check.py: correctness, the CIFAR-10 fast path against
# diffusers, the solvers per call, training throughput). Everything lands in $OUT (7 files: at most 8 come back).
#   carry: .gpu (diffusers wheels in .gpu/wheels, data from scripts/make_digits.py in .gpu/digits)
#   DISTILL_S=0 or CHECK_S=0 leaves a part out; CHECK_STAGES adds the check's other stages
#   (profile, ddpm256, cli: about 2 minutes more). SMOKE=1 tries the whole script on a CPU at toy sizes.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
DISTILL_S=${DISTILL_S:-240}
CHECK_S=${CHECK_S:-150}
CHECK_STAGES=${CHECK_STAGES:-correctness,cifar10,solvers,training}
TRY=()
[ "${SMOKE:-0}" = 1 ] && TRY=(--smoke --device cpu)
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader || true
if [ "$DISTILL_S" -gt 0 ]; then
    timeout $((DISTILL_S + 60)) python3 scripts/gpu_distill.py .gpu/digits --out "$OUT" --seconds "$DISTILL_S" ${TRY[@]+"${TRY[@]}"} 2>&1 \
        | tee "$OUT/gpu_distill.log"
fi
if [ "$CHECK_S" -gt 0 ]; then
    timeout $((CHECK_S + 30)) python3 scripts/gpu_check.py --out "$OUT" --budget "$CHECK_S" --modes default \
        --batches 1024 --baseline-runs 1 --lean --stages "$CHECK_STAGES" ${TRY[@]+"${TRY[@]}"} 2>&1 | tee "$OUT/gpu_check.log"
fi
