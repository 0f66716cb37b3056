#!/usr/bin/env bash
# The GPU check of issue 13, in one go (about 5 minutes on one H200; every step has a timeout, all
# of them together under 8 minutes):
#   1. the CUDA-marked tests (tests/test_cuda.py: per-step logits of the CUDA path against the
#      CPU path, fp16/bf16 autocast, NCCL with one process);
#   2. bench_snn.py on CUDA, ViT-B/16 at 224, batch 64, T=8 (ANN, calibration and SNN times,
#      SNN/(T x ANN), peak memory);
#   3. bench_snn.py on CUDA, EVA-01 giant at 336 (random weights), T=4: the largest batch that
#      fits (powers of two), its images/s and peak memory.
# Figures go to $OUT (default ./gpu_check_output): one log per step (EVA-g's as JSON).
# Run from anywhere: bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_output}
mkdir -p "$OUT"
status=0

step() {  # step NAME SECONDS COMMAND...: run with a timeout, log to $OUT/NAME.log, keep going
    local name=$1 seconds=$2
    shift 2
    echo "== $name: $*" | tee "$OUT/$name.log"
    local start=$SECONDS
    timeout "$seconds" "$@" 2>&1 | tee -a "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/$name.log"
    [ "$rc" -eq 0 ] || status=1
}

{ nvidia-smi; python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
  torch.cuda.get_device_name(0))'; } > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

step tests 150 python -m pytest -q -m cuda tests/test_cuda.py
step vit_base 150 python benchmarks/bench_snn.py --device cuda --model vit_base_patch16_224 \
    --batch_size 64 --T 8 --images 256 --reps 2
step eva_giant 170 python benchmarks/bench_snn.py --device cuda --model eva_giant_patch14_336 \
    --input_size 336 --T 4 --largest_batch --fc2_calibrated --images 256 --max_batch 512 --json
exit $status
