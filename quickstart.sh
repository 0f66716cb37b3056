#!/usr/bin/env bash
# The bundled quick start: fine-tune a 4-block ViT on scikit-learn's DIGITS (1,797 real 8x8
# images, no download), evaluate it as an ANN, calibrate its thresholds (for_v), and simulate
# the converted SNN for T=8 steps. CPU only is fine. Everything lands in $OUT.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-quickstart_output}
EPOCHS=${EPOCHS:-30}
T=${T:-8}
MODEL=(--model vit_tiny_patch16_224 --model_kwargs patch_size=4 embed_dim=96 depth=4 num_heads=3
       --input_size 32 --nb_classes 10 --data_set DIGITS --num_workers 0)
mkdir -p "$OUT"

echo "== 1/4 fine-tune on DIGITS ($EPOCHS epochs)"
python fintune_model.py "${MODEL[@]}" --epochs "$EPOCHS" --lr 1e-3 --batch_size 64 \
    --warmup_epochs 2 --no-save_every_epoch --output_dir "$OUT" --savename digits_vit
echo "== 2/4 ann"
python run_class_finetuning.py "${MODEL[@]}" --model_path "$OUT/digits_vit_best.pth" --batch_size 64 \
    --test_mode ann --log_dir "$OUT" --results "$OUT/ann.json"
echo "== 3/4 for_v (threshold calibration)"
python run_class_finetuning.py "${MODEL[@]}" --model_path "$OUT/digits_vit_best.pth" --batch_size 64 \
    --test_mode for_v --output_dir "$OUT" --savename digits_vit_for_v --log_dir "$OUT" --results "$OUT/for_v.json"
echo "== 4/4 snn, T=$T"
python run_class_finetuning.py "${MODEL[@]}" --model_path "$OUT/digits_vit_for_v.pth" --batch_size 64 \
    --test_mode snn --test_T "$T" --output_dir "$OUT" --log_dir "$OUT" --results "$OUT/snn.json"

python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
ann = json.load(open(f'{out}/ann.json'))
snn = json.load(open(f'{out}/snn.json'))
print(f"\nANN top-1: {ann['acc1']:.2f}% on {ann['n']} DIGITS images ({ann['seconds']:.1f} s)")
print(f"SNN top-1 per time step ({snn['seconds']:.1f} s for T={snn['T']}):")
for t, acc in enumerate(snn['acc1'], 1):
    extra = f"   energy vs ANN {snn['energy_ratio'][t - 1]:.3f}" if 'energy_ratio' in snn else ''
    print(f"  t={t}: {acc:6.2f}%  ({acc - ann['acc1']:+.2f}){extra}")
PY
