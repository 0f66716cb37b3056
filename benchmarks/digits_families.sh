#!/usr/bin/env bash
# Conversion fidelity of each supported family on real images (the bundled DIGITS data):
# fine-tune a small model of the family, then ann, for_v and snn (T=8) through the command line,
# and print ANN top-1 against SNN top-1 per step, and plain timm's top-1 with the same weights.
# About 3 minutes per family on 2 quiet CPU cores (the gated and rotary ones take longer); on a
# busy machine OMP_NUM_THREADS=1 runs far faster.
#   bash benchmarks/digits_families.sh [OUT_DIR [FAMILY ...]]    (default: every family below)
# EPOCHS (default 30) sets the training length; SNN_FLAGS adds flags to every family's snn run,
# e.g. SNN_FLAGS="--fc2_thresholds 0.25 0.08" (the fixed fc2 thresholds of ViT names, ECMT_SPEC 4).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-digits_families}
shift || true
EPOCHS=${EPOCHS:-30}
mkdir -p "$OUT"
ARCH="patch_size=4 embed_dim=96 depth=4 num_heads=3"
declare -A FAMILIES=(
  [vit_token]="vit_tiny_patch16_224|$ARCH"
  [vit_avgpool]="vit_tiny_patch16_224|$ARCH global_pool=avg fc_norm=True class_token=False"
  [vit_layerscale_qknorm]="vit_tiny_patch16_224|$ARCH init_values=0.1 qk_norm=True"
  [eva01]="eva_giant_patch14_224|$ARCH mlp_ratio=4.0"
  # EVA-02 tiny: rotary embeddings, packed SwiGLU (GluMlp), mean pooling + fc_norm
  [eva02]="eva02_tiny_patch14_224|$ARCH"
  # EVA-02 base and up: separate q/k/v, SwiGLU with its norm, the attention's inner norm
  [eva02_swiglu_norms]="eva02_base_patch14_224|$ARCH scale_attn_inner=True"
  # timm's rotary ViT (built as Eva): register token, LayerScale, no absolute position embedding
  [vit_rope_reg]="vit_medium_patch16_rope_reg1_gap_256|$ARCH init_values=0.1"
  # SigLIP: attention pooling (global_pool='map')
  [siglip_map]="vit_base_patch16_siglip_224|$ARCH"
  # DeiT distilled: class + distillation tokens, the two heads averaged
  [deit_distilled]="deit_tiny_distilled_patch16_224|$ARCH"
  # BEiT: relative position bias in every block, LayerScale, mean pooling + fc_norm
  [beit]="beit_base_patch16_224|$ARCH"
  # CaiT: talking-heads attention, then two class-attention blocks; LayerScale (from 0.1, not 1e-5)
  [cait]="cait_xxs24_224|$ARCH init_values=0.1"
  # Swin: 8x8 tokens in 4x4 windows (shifted in every second block), patch merging to 4x4
  [swin]="swin_tiny_patch4_window7_224|patch_size=4 embed_dim=64 depths=(2,2) num_heads=(2,4) window_size=4"
  # Swin V2: the same, with cosine attention, the position MLP, post-norm blocks
  [swinv2]="swinv2_tiny_window8_256|patch_size=4 embed_dim=64 depths=(2,2) num_heads=(2,4) window_size=4"
)
ORDER=(vit_token vit_avgpool vit_layerscale_qknorm eva01 eva02 eva02_swiglu_norms vit_rope_reg siglip_map
       deit_distilled beit cait swin swinv2)
if [ $# -gt 0 ]; then ORDER=("$@"); fi
for name in "${ORDER[@]}"; do
  [ -n "${FAMILIES[$name]:-}" ] || { echo "error: unknown family $name (known: ${!FAMILIES[*]})" >&2; exit 2; }
  IFS='|' read -r model kwargs <<< "${FAMILIES[$name]}"
  common=(--model "$model" --model_kwargs $kwargs --input_size 32 --nb_classes 10 --data_set DIGITS
          --num_workers 0)
  python fintune_model.py "${common[@]}" --epochs "$EPOCHS" --lr 1e-3 --batch_size 64 --warmup_epochs 2 \
      --no-save_every_epoch --output_dir "$OUT" --savename "$name" > "$OUT/$name.train.log" 2>&1
  python run_class_finetuning.py "${common[@]}" --model_path "$OUT/${name}_best.pth" --test_mode ann \
      --no_progress --log_dir "$OUT" --results "$OUT/$name.ann.json" > /dev/null 2>&1
  python run_class_finetuning.py "${common[@]}" --model_path "$OUT/${name}_best.pth" --test_mode for_v \
      --no_progress --log_dir "$OUT" --output_dir "$OUT" --savename "${name}_for_v" > /dev/null 2>&1
  # shellcheck disable=SC2086  # SNN_FLAGS: words on purpose
  python run_class_finetuning.py "${common[@]}" --model_path "$OUT/${name}_for_v.pth" --test_mode snn \
      --test_T 8 ${SNN_FLAGS:-} --no_progress --log_dir "$OUT" --output_dir "$OUT" --results "$OUT/$name.snn.json" > /dev/null 2>&1
  python - "$OUT" "$name" "$model" $kwargs <<'PY'
import json, sys
import timm, torch
import datasets, model_base, utils
out, name, model_name, *kwargs = sys.argv[1:]
ann = json.load(open(f'{out}/{name}.ann.json'))
snn = json.load(open(f'{out}/{name}.snn.json'))
steps = ' '.join(f'{a:.2f}' for a in snn['acc1'])
print(f"{name:24s} ANN {ann['acc1']:.2f}  SNN t=1..8: {steps}  (T=8 - ANN: {snn['acc1'][-1] - ann['acc1']:+.2f})")
# The trained weights in plain timm and in the convertible model, on the evaluation images
# (the published transform, as the runs above): the ANN the command line evaluated is timm's.
kwargs = dict(utils.parse_model_kwargs(kwargs), num_classes=10, img_size=32)
state = torch.load(f'{out}/{name}_best.pth', weights_only=True)['model']
plain, ours = timm.create_model(model_name, **kwargs).eval(), model_base.create_model(model_name, **kwargs).eval()
plain.load_state_dict(state)
ours.load_state_dict(state)
args = type('Args', (), dict(data_set='DIGITS', input_size=32, data_config='published'))()
data = datasets.DigitsDataset(train=False, transform=datasets.build_transform(False, args))
images, labels = torch.stack([data[i][0] for i in range(len(data))]), torch.tensor(data.targets)
with torch.no_grad():
    want, got = plain(images), ours(images)
top1 = (want.argmax(1) == labels).double().mean().item() * 100
error = ((got - want).norm() / want.norm()).item()
print(f"{'':24s} timm ANN {top1:.2f}, relative logit error of the convertible model {error:.1e}")
PY
done
