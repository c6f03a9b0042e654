#!/usr/bin/env bash
# The attention-map study end to end on a synthetic format twin (Kvasir v2 or MURA v1.1), all four
# initialisations: write the twin and stand-in sup/DINO/MAE checkpoints (random weights in the
# released key layouts) -> train -> evaluate -> explain (every method) -> score the maps against the
# twin's masks -> one HTML report. Usage: bash scripts/demo_attention_maps.sh [kvasir|mura]
# Outputs go to demo/attention_maps_<dataset> (override with DEMO_DIR). A few minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
DATASET=${1:-kvasir}
DEMO_DIR=${DEMO_DIR:-$REPO/demo/attention_maps_$DATASET}
DATA=$DEMO_DIR/raw
ROOT=$DEMO_DIR/bundle
rm -rf "$ROOT"  # a fresh run: training would otherwise resume from the previous demo's checkpoints
mkdir -p "$DEMO_DIR"

case "$DATASET" in
  kvasir)
    python3 scripts/make_synthetic.py kvasir "$DATA" --n_per_class 16 --size 240,192
    gt=(--masks_dir masks) ;;
  mura)
    python3 scripts/make_synthetic.py mura "$DATA" --n_patients 16 --size 128,160
    gt=(--boxes_json "$DATA/mura_boxes.json") ;;
  *) echo "error: dataset must be kvasir or mura, got '$DATASET'" >&2; exit 2 ;;
esac
# the demo network of configs/demo.json: ViT with patch 16 at 64x64, 2 blocks, width 64
python3 scripts/make_synthetic.py vit_checkpoints "$DEMO_DIR/checkpoints" --img_size 64 --hidden_size 64 \
    --num_layers 2 --num_heads 4 --mlp_dim 128

cd "bundles/vit_attention_maps_$DATASET"
for init in random sup dino mae; do
  base="'configs/train.json','configs/init/$init.json','configs/demo.json'"
  args=(--bundle_root "$ROOT" --dataset_dir "$DATA" "${gt[@]}")
  [ "$init" != random ] && args+=(--pretrained_path "$DEMO_DIR/checkpoints/$init.pth")
  echo "== init $init"
  python3 -m monai.bundle run training --config_file "[$base]" "${args[@]}" --num_epochs 3
  python3 -m monai.bundle run evaluating --config_file "[$base,'configs/evaluate.json']" "${args[@]}"
  python3 -m monai.bundle run explaining --config_file "[$base,'configs/explain.json']" "${args[@]}"
  python3 -m monai.bundle run evaluating_explanations --config_file "[$base,'configs/evaluate_explanations.json']" \
      "${args[@]}" --faithfulness_steps 5
done
cd "$REPO"
python3 scripts/explanation_report.py --eval_dir "$ROOT/eval" --out "$ROOT/eval/report.html" --n_examples 6
echo
for init in random sup dino mae; do cat "$ROOT/eval/$init/explanation_metrics.md"; echo; done
echo "TensorBoard: tensorboard --logdir $ROOT/eval"
