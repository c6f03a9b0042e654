#!/usr/bin/env bash
# The main job on synthetic data in the exact BraTS2020 on-disk format:
# write the format twin -> prepare (inside the bundle) -> train -> evaluate -> explanation report.
# Outputs go to demo/lgmvit_brats20 (override with DEMO_DIR). Takes a few minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
DEMO_DIR=${DEMO_DIR:-$REPO/demo/lgmvit_brats20}
DATA=$DEMO_DIR/raw
ROOT=$DEMO_DIR/bundle
mkdir -p "$DEMO_DIR"

python3 scripts/make_synthetic.py brats20 --output_dir "$DATA" --shape 96,96,40 --n_per_split 6,2,2
cd bundles/lgmvit_brats20
CONFIGS="['configs/train.json','configs/demo.json']"
common=(--bundle_root "$ROOT" --dataset_dir "$DATA/MICCAI_BraTS2020_TrainingData")
python3 -m monai.bundle run training --config_file "$CONFIGS" "${common[@]}"
python3 -m monai.bundle run evaluating --config_file "['configs/train.json','configs/demo.json','configs/evaluate.json']" "${common[@]}"
python3 -m monai.bundle run inferring --config_file "['configs/train.json','configs/demo.json','configs/inference.json']" "${common[@]}"

echo
echo "== test metrics ($ROOT/eval/metrics_test.md)"
cat "$ROOT/eval/metrics_test.md"
echo
echo "== explanation report ($ROOT/eval/inference/explanation_quality.md)"
cat "$ROOT/eval/inference/explanation_quality.md"
echo
echo "EAFEM maps: $ROOT/eval/inference/maps/ (NIfTI per scan, PNG panels)"
echo "TensorBoard: tensorboard --logdir $ROOT/eval/tensorboard"
