#!/usr/bin/env bash
# The main job, end to end on bundled synthetic hearts (no patient data needed):
#   synthetic label maps -> heart-prepare (+ --check) -> heart-split -> heart-train (smoke config)
#   -> heart-eval (metrics, baseline, HTML report) -> heart-complete on a partial heart, once with
#   the smoke model just trained and once with the bundled model "synthetic-demo" (trained on
#   synthetic hearts only, for trying the tools out; not for patient data).
# Sets up .venv itself (scripts/setup_env.sh). Outputs go to ${DEMO_DIR:-demo_output}/.
# A few minutes on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
OUT=${DEMO_DIR:-demo_output}
CASES=${DEMO_CASES:-8}
mkdir -p "$OUT"
echo "== 1/6 synthetic label maps -> $OUT/labelmaps"
heart-synth --overwrite --output_dir "$OUT/labelmaps" --cases "$CASES" --seed 0 --spacing 1.5 1.5 1.5 --truncate_fraction 0.3
echo "== 2/6 heart-prepare -> $OUT/prepared"
heart-prepare --input_dir "$OUT/labelmaps" --output_dir "$OUT/prepared" --workers 2
heart-prepare --check "$OUT/prepared"
echo "== 3/6 heart-split"
heart-split --data_dir "$OUT/prepared" --val_fraction 0.25 --seed 0
echo "== 4/6 heart-train (smoke config)"
heart-train --config smoke --output_dir "$OUT/train" data.datasets.0.data_dir="$OUT/prepared" optim.max_steps="${DEMO_STEPS:-300}"
CKPT="$OUT/train/model_best.safetensors"
echo "== 5/6 heart-eval"
heart-eval --checkpoint "$CKPT" --data_dir "$OUT/prepared" --split val --label_dir "$OUT/labelmaps" --output_dir "$OUT/eval" --scenarios subset_A missing_LAA drop_k
echo "== 6/6 heart-complete on a partial heart: with the smoke model trained above, then with the bundled model"
heart-synth --overwrite --output_dir "$OUT/partial" --cases 1 --seed 1000 --spacing 1.0 1.0 1.0 --drop LAA PA Coronary
PARTIAL=$(ls "$OUT"/partial/*.nii.gz | head -n 1)
NAME=$(basename "$PARTIAL")
echo "-- with the smoke model trained above ($CKPT)"
heart-complete --checkpoint "$CKPT" --input "$PARTIAL" --output "$OUT/completed/smoke_model/$NAME" \
    --meshes "$OUT/completed/smoke_model/meshes"
echo "-- with the bundled model synthetic-demo (synthetic hearts only: not for patient data)"
heart-complete --checkpoint synthetic-demo --input "$PARTIAL" --output "$OUT/completed/bundled_synthetic_demo/$NAME" \
    --meshes "$OUT/completed/bundled_synthetic_demo/meshes"
echo
echo "Outputs:"
echo "  label maps:        $OUT/labelmaps"
echo "  training data:     $OUT/prepared (manifest.json, train.csv, val.csv)"
echo "  checkpoint:        $CKPT (TensorBoard/JSONL logs in $OUT/train)"
echo "  evaluation report: $OUT/eval/report.html (CSV, summary JSON, plots beside it)"
echo "  partial heart:     $PARTIAL"
echo "  completed heart, smoke model trained above:  $OUT/completed/smoke_model/$NAME (meshes beside it)"
echo "  completed heart, bundled synthetic-demo:     $OUT/completed/bundled_synthetic_demo/$NAME (meshes beside it)"
