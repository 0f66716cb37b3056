#!/usr/bin/env bash
# The GPU check of issue 22, in one go on one GPU (every step has a timeout; all together under
# 8 minutes), ending with ONE JSON line of the figures:
#   1. the CUDA tests: tests/test_cuda.py (every family's per-step logits on triton and eager
#      against the literal step-by-step reference, fp16/bf16 autocast at T=32 against float32,
#      NCCL with two processes where two GPUs exist) and tests/test_triton.py on GPU tensors
#      (every Triton kernel against the references, compiled for the GPU this time);
#   2. bench_snn.py: ViT-B/16, 224 px, batch 64, T=8, fp16 autocast, triton backend: ANN and SNN
#      images/s, SNN/(T x ANN), peak GPU memory;
#   3. bench_snn.py: EVA-01 giant at 336 px (random weights), T=4, fp16: the largest batch that
#      fits (powers of two), its images/s and GB per image.
# Logs go to $OUT (default ./gpu_check_output). Run from anywhere: bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_output}
mkdir -p "$OUT"
unset TRITON_INTERPRET  # the real GPU kernels, not the interpreter

{ nvidia-smi; python -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda,
  "triton", triton.__version__, torch.cuda.get_device_name(0))'; } > "$OUT/device.txt" 2>&1
start=$SECONDS
timeout 200 python -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_triton.py -m "cuda or not cuda" \
    > "$OUT/tests.log" 2>&1
tests_rc=$?
tests_s=$((SECONDS - start))
timeout 150 python benchmarks/bench_snn.py --device cuda --backend triton --amp fp16 --model vit_base_patch16_224 \
    --batch_size 64 --T 8 --images 256 --reps 2 --json > "$OUT/vit_base.json" 2> "$OUT/vit_base.err"
vit_rc=$?
timeout 150 python benchmarks/bench_snn.py --device cuda --backend triton --amp fp16 --model eva_giant_patch14_336 \
    --input_size 336 --T 4 --largest_batch --fc2_calibrated --images 128 --max_batch 256 --json \
    > "$OUT/eva_giant.json" 2> "$OUT/eva_giant.err"
eva_rc=$?

OUT="$OUT" TESTS_RC=$tests_rc TESTS_S=$tests_s VIT_RC=$vit_rc EVA_RC=$eva_rc python - <<'PY'
import json, os, re
out = os.environ['OUT']
def last_json(name):
    try:
        lines = [l for l in open(os.path.join(out, name)).read().splitlines() if l.startswith('{')]
        return json.loads(lines[-1]) if lines else None
    except OSError:
        return None
tail = open(os.path.join(out, 'tests.log')).read().strip().splitlines()
summary = {'device': open(os.path.join(out, 'device.txt')).read().strip().splitlines()[-1],
           'tests': {'rc': int(os.environ['TESTS_RC']), 'seconds': int(os.environ['TESTS_S']),
                     'summary': tail[-1] if tail else ''}}
vit = last_json('vit_base.json')
if vit:
    summary['vit_base_224_b64_T8_fp16'] = {
        'ann_images_per_s': vit['images'] / vit['ann_seconds'], 'snn_images_per_s': vit['images'] / vit['snn_warm_seconds'],
        'snn_over_T_ann': vit['snn_over_T_ann_warm'], 'snn_over_T_ann_cold': vit['snn_over_T_ann_cold'],
        'ann_peak_gib': vit['ann_peak_mib'] / 1024, 'snn_peak_gib': vit['snn_peak_mib'] / 1024,
        'top1_agreement': vit['snn_ann_top1_agreement']}
else:
    summary['vit_base_224_b64_T8_fp16'] = {'rc': int(os.environ['VIT_RC'])}
eva = last_json('eva_giant.json')
if eva:
    summary['eva_giant_336_T4_fp16'] = {k: eva[k] for k in ('largest_batch', 'images_per_second', 'snn_peak_gib',
                                                            'snn_peak_gib_per_image', 'weights_gib')}
else:
    summary['eva_giant_336_T4_fp16'] = {'rc': int(os.environ['EVA_RC'])}
print(json.dumps(summary))
PY
[ "$tests_rc" -eq 0 ] && [ "$vit_rc" -eq 0 ] && [ "$eva_rc" -eq 0 ]
