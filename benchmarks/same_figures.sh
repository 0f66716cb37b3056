#!/usr/bin/env bash
# Every figure the command line writes, from two checkouts on the same trained models: a check
# for refactors that must not change a number (a benchmark script, not a test: it trains models).
#   git worktree add ../before <commit>
#   bash benchmarks/same_figures.sh ../before [OUT_DIR [FAMILY ...]]
# Per family (default: vit_token eva01 eva02): a small model fine-tuned on the bundled DIGITS
# (EPOCHS, default 4), calibrated once per coding (for_v, by this checkout), then in each checkout snn T=4
# with the monitor, level counts on all batches, the full energy report (fp32_memory) and the
# per-layer CSV, for both codings and two chunkings (--time_chunk 4 and 1). Every file each run
# writes (results JSON less its timings and paths, the layer CSV, the level JSON) is compared
# byte for byte; the script ends non-zero at the first difference and says which file.
set -euo pipefail
cd "$(dirname "$0")/.."
BEFORE=$(cd "${1:?usage: same_figures.sh BEFORE_CHECKOUT [OUT_DIR [FAMILY ...]]}" && pwd)
AFTER=$(pwd)
OUT=$(mkdir -p "${2:-same_figures}" && cd "${2:-same_figures}" && pwd)
shift 2 || shift $#
EPOCHS=${EPOCHS:-4}
ARCH="patch_size=4 embed_dim=96 depth=4 num_heads=3"
declare -A FAMILIES=(
  [vit_token]="vit_tiny_patch16_224|$ARCH"
  [vit_layerscale_qknorm]="vit_tiny_patch16_224|$ARCH init_values=0.1 qk_norm=True"
  [eva01]="eva_giant_patch14_224|$ARCH mlp_ratio=4.0"
  [eva02]="eva02_tiny_patch14_224|$ARCH"
  [siglip_map]="vit_base_patch16_siglip_224|$ARCH"
)
ORDER=(vit_token eva01 eva02)
if [ $# -gt 0 ]; then ORDER=("$@"); fi
for name in "${ORDER[@]}"; do
  [ -n "${FAMILIES[$name]:-}" ] || { echo "error: unknown family $name (known: ${!FAMILIES[*]})" >&2; exit 2; }
  IFS='|' read -r model kwargs <<< "${FAMILIES[$name]}"
  common=(--model "$model" --model_kwargs $kwargs --input_size 32 --nb_classes 10 --data_set DIGITS
          --num_workers 0 --batch_size 128)
  if [ ! -f "$OUT/${name}_best.pth" ]; then
    python fintune_model.py "${common[@]}" --epochs "$EPOCHS" --lr 1e-3 --warmup_epochs 1 \
        --no-save_every_epoch --output_dir "$OUT" --savename "$name" > "$OUT/$name.train.log" 2>&1
  fi
  for coding in rate differential; do  # thresholds calibrated for each coding (the record says which)
    [ -f "$OUT/${name}_for_v_$coding.pth" ] || python run_class_finetuning.py "${common[@]}" --no_progress \
        --model_path "$OUT/${name}_best.pth" --test_mode for_v --coding "$coding" --log_dir "$OUT" \
        --output_dir "$OUT" --savename "${name}_for_v_$coding" > "$OUT/$name.for_v.log" 2>&1
  done
  for coding in rate differential; do
    for chunk in 4 1; do
      for tree in before after; do
        root=$BEFORE; [ "$tree" = after ] && root=$AFTER
        run="$OUT/$tree/${name}_${coding}_c$chunk"
        mkdir -p "$run"
        (cd "$root" && python run_class_finetuning.py "${common[@]}" --no_progress --model_path "$OUT/${name}_for_v_$coding.pth" \
            --test_mode snn --test_T 4 --time_chunk "$chunk" --coding "$coding" --monitor True \
            --level_batches all --energy_model fp32_memory --log_dir "$run" --output_dir "$run" \
            --savename run --results "$run/results.json") > "$run.log" 2>&1 \
          || { echo "error: the $tree run failed: $run.log" >&2; tail -5 "$run.log" >&2; exit 1; }
        # Timings and paths differ by nature; everything else must not.
        python - "$run/results.json" <<'PY'
import json, sys
path = sys.argv[1]
record = json.load(open(path))
def strip(value):
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items()
                if k not in ('seconds', 'images_per_second', 'started', 'finished', 'args', 'command')
                and not k.endswith(('_path', '_dir', '_file')) and k not in ('layer_report', 'level_counts', 'log')}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value
json.dump(strip(record), open(path + '.figures', 'w'), indent=1, sort_keys=True)
PY
      done
      # The results record: every key the before run wrote has the same value after (keys the
      # after run adds, such as newly recorded options, are listed, not compared).
      python - "$OUT/before/${name}_${coding}_c$chunk/results.json.figures" "$OUT/after/${name}_${coding}_c$chunk/results.json.figures" <<'PY' || exit 1
import json, sys
before, after = (json.load(open(p)) for p in sys.argv[1:])
new = sorted(set(after) - set(before))
changed = [k for k in before if k not in after or after[k] != before[k]]
if changed:
    print('DIFFERENT results keys:', changed[:10]); sys.exit(1)
if new:
    print('  (new results keys after:', ', '.join(new) + ')')
PY
      for file in run_layers.csv run_levels.json; do
        a="$OUT/before/${name}_${coding}_c$chunk/$file"; b="$OUT/after/${name}_${coding}_c$chunk/$file"
        [ -f "$a" ] && [ -f "$b" ] || { echo "error: $file missing in one of the runs ($a, $b)" >&2; exit 1; }
        cmp -s "$a" "$b" || { echo "DIFFERENT: $name $coding chunk $chunk $file"; diff <(head -c 3000 "$a") <(head -c 3000 "$b") | head -20; exit 1; }
      done
      echo "same: $name $coding --time_chunk $chunk (results, layer CSV, level counts)"
    done
  done
done
echo "every figure the command line wrote is the same in both checkouts"
