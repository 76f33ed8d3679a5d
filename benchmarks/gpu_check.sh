#!/usr/bin/env bash
# The GPU checks of the training and completion issues, as one prepared script for a lent
# single-GPU machine (PyTorch with CUDA already installed there, no network). Parts, run in the
# order PARTS lists them (default: all, in this order):
#
#   fps       benchmarks/fps_speed.py: farthest-point sampling as a Triton kernel and a CUDA graph against
#             the eager loop (same indices, times); if it fails, both are turned off (HEART_FPS_TRITON=0
#             HEART_FPS_CUDA_GRAPH=0) and the study's phase 1 is shortened to FPS_FALLBACK_STEPS;
#   sweep     learning speed: benchmarks/overfit_iou.py recipes in parallel on the one GPU (fp32,
#             as the CPU test runs): near-surface IoU per structure against steps (SWEEP_NAMES,
#             SWEEP_STEPS, SWEEP_SPACING: voxel size of the two synthetic hearts, default 1.5 mm);
#   data      synthetic sample data for the phase-1 run (heart-synth, heart-prepare, heart-split);
#   speed     benchmarks/train_speed.py: GFLOP per sample, samples/s, MFU against PEAK_TFLOPS
#             (default 989: H100 SXM / H200 dense bf16), CUDA memory and the largest batch for 40 GiB
#             of `small` and `base` (bf16, batch 16, the phase-1 sizes), the loader with 8 workers
#             against the device-resident cache (data.device_cache=true); SPEED_COMPILE=1 adds a
#             run.compile=true pass on the device cache;
#   steps     the training step's options A/B (issue 13): train_speed.py on the device cache at batch
#             STEPS_BATCH (default 64) for STEPS_CONFIGS (default small base), the STEPS_VARIANTS in
#             their order (default "default graphs model blocks"; NAME@BATCH for another batch):
#             default: the default step with --profile (GPU busy share, kernels and host syncs per
#             step, top kernels); graphs: run.compile of the whole model with CUDA graphs
#             (run.compile_mode=reduce-overhead); model: of the whole model; blocks: of the attention
#             blocks; both: graphs on the loader (12 workers) and on the device cache, with their
#             ratio, on prepared synthetic hearts (part data, run first if needed); each with its
#             samples/s and MFU;
#   phase1    a short phase-1 run on that data through torchrun (NCCL process group, DDP wrapper,
#             bf16 autocast, validation, export): loss curve, IoU and samples/s in log.jsonl;
#   complete  benchmarks/complete_speed.py on CUDA with that run's checkpoint (1 mm output);
#   studydata the study's hearts and prepared data only (completion_study.py --stages hearts prepare), for
#             parts that train on them while the study trains (bg:small);
#   study     benchmarks/completion_study.py --budget gpu (hearts, prepare, phases 1-3, held-out
#             evaluation against the nearest-heart baseline, study.md), limit STUDY_LIMIT_S (default
#             540 s); results and checkpoints copied to $OUT. Not in the default PARTS;
#   small     a phase-1 run of the named `small` config (width 256) on the study's prepared hearts
#             with the device cache (SMALL_STEPS of SMALL_BATCH, limit SMALL_LIMIT_S), its best checkpoint to $OUT
#             (in parts of 15 MB: cat small_best.safetensors.part* > small_best.safetensors);
#   ct        benchmarks/complete_speed.py --ct on $DEVICE with that checkpoint, or CT_CHECKPOINT (e.g.
#             the bundled model: CT_CHECKPOINT=HeartCompletionLib/model/bundled/synthetic_demo.safetensors)
#             (CT grid and 1 mm);
#   worker    benchmarks/worker_latency.py --ct on $DEVICE with the same checkpoint: what the Slicer panel's user
#             waits for per Apply, a fresh heart-complete process against the panel's warm worker (--serve);
#   real      benchmarks/real_study.py --budget gpu (issue 11: phase 4 on the real partial labels of
#             REAL_DIR from REAL_INIT, held-out patients' figures, whole hearts from single structures),
#             limit REAL_LIMIT_S (default 330 s; a report of what finished is written either way), further
#             real_study.py arguments in REAL_ARGS (e.g. --steps 2500 --overrides data.datasets.2.weight=0.4);
#             results, figures and the phase-4 checkpoint to $OUT;
#   pack      every text result in $OUT into texts.tgz (the machine returns at most 8 files).
#
# A part named bg:PART runs in the background, next to the parts after it (the GPU is launch-bound at these
# sizes, so two or three trainings share it well; their samples/s are then not the card's); `wait` waits
# for every background part. The parts left running at the end are waited for.
#   PARTS="fps bg:real studydata bg:small study wait ct pack"     # issues 10, 11 and 13 in one call
# Every part's time limit is cut to what is left of DEADLINE_S (default 580 s) from the start.
# Set-up on the machine: the wheels in .whl/ (this project's wheel + nibabel, pynrrd, edt, cc3d; see
# docs/benchmarks.md, "GPU checks") are installed to /tmp/site. Results go to $OUT (default /tmp/gpu_check).
#   DEVICE=cpu OUT=/tmp/x SWEEP_STEPS=20 PHASE1_STEPS=10 PHASE1_CASES=3 SPEED_CONFIGS=tiny BATCH=2 \
#       SPEED_STEPS=1 bash benchmarks/gpu_check.sh                          # a dry run on CPU
set -u
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0" | sed 's/^# \{0,1\}//'; exit 0; fi
OUT="${OUT:-/tmp/gpu_check}"
PARTS="${PARTS:-sweep data speed phase1 complete}"
SWEEP_STEPS="${SWEEP_STEPS:-2500}"
SWEEP_EVERY="${SWEEP_EVERY:-500}"
SWEEP_LIMIT_S="${SWEEP_LIMIT_S:-170}"
SWEEP_SPACING="${SWEEP_SPACING:-1.5}"
SWEEP_NAMES="${SWEEP_NAMES:-test balanced bal_f8 bal_w128 bal_b8 bal_near2 bal_lr1e3 bal_small}"
PHASE1_STEPS="${PHASE1_STEPS:-1200}"
PHASE1_LIMIT_S="${PHASE1_LIMIT_S:-130}"
PHASE1_CASES="${PHASE1_CASES:-24}"
STUDY_LIMIT_S="${STUDY_LIMIT_S:-540}"
STUDY_ARGS="${STUDY_ARGS:-}"
FPS_FALLBACK_STEPS="${FPS_FALLBACK_STEPS:-1500 6000 3000}"
REAL_LIMIT_S="${REAL_LIMIT_S:-330}"
REAL_DIR="${REAL_DIR:-../shared/data/real}"
REAL_INIT="${REAL_INIT:-synthetic-demo}"
REAL_BUDGET="${REAL_BUDGET:-gpu}"
SMALL_STEPS="${SMALL_STEPS:-3000}"
SMALL_LIMIT_S="${SMALL_LIMIT_S:-70}"
SMALL_BATCH="${SMALL_BATCH:-32}"
REAL_ARGS="${REAL_ARGS:-}"
STUDY_EVAL_WORKERS="${STUDY_EVAL_WORKERS:-$(nproc)}"
DEADLINE_S="${DEADLINE_S:-580}"
SPEED_STEPS="${SPEED_STEPS:-10}"
SPEED_CONFIGS="${SPEED_CONFIGS:-small base}"
PEAK_TFLOPS="${PEAK_TFLOPS:-989}"
SPEED_COMPILE="${SPEED_COMPILE:-}"
BATCH="${BATCH:-16}"
STEPS_BATCH="${STEPS_BATCH:-64}"
STEPS_CONFIGS="${STEPS_CONFIGS:-small base}"
STEPS_STEPS="${STEPS_STEPS:-8}"
STEPS_VARIANTS="${STEPS_VARIANTS:-default graphs model blocks}"
CT_CHECKPOINT="${CT_CHECKPOINT:-}"
DEVICE="${DEVICE:-cuda}"
WORK="${WORK:-/tmp/gpu_work}"
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && [ -z "${SKIP_INSTALL:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site PATH="/tmp/site/bin:$PATH"
fi
T0=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
# limit LIMIT_S: the smaller of LIMIT_S and the seconds left before DEADLINE_S (at least 1)
limit() { local left=$(( DEADLINE_S - ($(date +%s) - T0) )); [ "$left" -lt "$1" ] && echo $(( left > 1 ? left : 1 )) || echo "$1"; }

BAL="data.query_balance=structure"   # recipes build on these: queries shared equally among structures,
W128="$BAL model.overrides.width=128" # + a 128-wide tiny model
declare -A RECIPES=(
    [test]=""
    [balanced]="$BAL"
    [bal_f8]="$BAL model.overrides.num_frequencies=8"
    [bal_w128]="$W128"
    [bal_w128_lr5e3]="$W128 optim.lr=0.005"
    [bal_b8]="$BAL optim.batch_size=8"
    [bal_near2]="$BAL loss.near=2.0 loss.volume=0.5"
    [bal_lr1e3]="$BAL optim.lr=0.001"
    [bal_small]="$BAL model.config=small model.overrides.num_latents=256 optim.lr=0.0005"
    [bal_w128_lr2e3]="$W128 optim.lr=0.002"
    [bal_w128_lr5e3_fps]="$W128 optim.lr=0.005 model.overrides.latent_queries=fps"
    [bal_w128_lr5e3_b2q4]="$W128 optim.lr=0.005 optim.batch_size=2 data.num_near_queries=1536 data.num_volume_queries=512 data.num_surface_queries=1024"
)

part_fps() {
    stamp "fps: farthest-point sampling, Triton kernel and CUDA graph against the eager loop"
    timeout "$(limit 60)" python3 benchmarks/fps_speed.py --device "$DEVICE" > "$OUT/fps_speed.txt" 2>&1
    local rc=$?
    cat "$OUT/fps_speed.txt"
    if [ "$rc" -eq 0 ]; then
        echo "fps: Triton kernel and CUDA graph on"
    else
        echo "fps: FAILED here; HEART_FPS_TRITON=0 HEART_FPS_CUDA_GRAPH=0, study steps $FPS_FALLBACK_STEPS"
        export HEART_FPS_TRITON=0 HEART_FPS_CUDA_GRAPH=0
        STUDY_ARGS="--steps $FPS_FALLBACK_STEPS --train_seconds 400 $STUDY_ARGS"
    fi
}

part_sweep() {
    stamp "sweep: overfit_iou recipes in parallel ($SWEEP_NAMES; $SWEEP_STEPS steps, limit $SWEEP_LIMIT_S s)"
    python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; \
from overfit_iou import make_hearts; make_hearts(Path('$WORK/hearts_$SWEEP_SPACING'), $SWEEP_SPACING)" \
        || echo "hearts FAILED"
    local pids=()
    for name in $SWEEP_NAMES; do
        # shellcheck disable=SC2086
        timeout "$SWEEP_LIMIT_S" python3 benchmarks/overfit_iou.py --device "$DEVICE" --steps "$SWEEP_STEPS" \
            --eval_every "$SWEEP_EVERY" --data_dir "$WORK/hearts_$SWEEP_SPACING" --json "$OUT/sweep_$name.json" run.amp=off \
            ${RECIPES[$name]} > "$OUT/sweep_$name.txt" 2>&1 &
        pids+=($!)
    done
    wait "${pids[@]}"  # its own runs, not the background parts
    for name in $SWEEP_NAMES; do echo "--- $name"; tail -n 12 "$OUT/sweep_$name.txt"; done
}

part_data() {
    stamp "data: $PHASE1_CASES synthetic hearts"
    ( heart-synth --output_dir "$WORK/synth" --cases "$PHASE1_CASES" --seed 7 \
      && heart-prepare --input_dir "$WORK/synth" --output_dir "$WORK/synth_npz" --workers 12 --quiet \
      && heart-split --data_dir "$WORK/synth_npz" --val_fraction 0.15 ) > "$OUT/phase1_data.txt" 2>&1
    tail -n 3 "$OUT/phase1_data.txt"
}

part_speed() {
    stamp "speed: train_speed ($SPEED_CONFIGS; batch $BATCH; loader with 8 workers vs device cache; peak $PEAK_TFLOPS TFLOP/s)"
    # shellcheck disable=SC2086
    timeout "$(limit 240)" python3 benchmarks/train_speed.py --configs $SPEED_CONFIGS --batch_size "$BATCH" --steps "$SPEED_STEPS" \
        --warmup 3 --workers 8 --data both --peak_tflops "$PEAK_TFLOPS" --max_batch_for_gib 40 2>&1 \
        | grep -v Warning | tee "$OUT/train_speed.txt"
    if [ -n "$SPEED_COMPILE" ]; then
        stamp "speed: the same with run.compile=true on the device cache"
        # shellcheck disable=SC2086
        timeout "$(limit 300)" python3 benchmarks/train_speed.py --configs $SPEED_CONFIGS --batch_size "$BATCH" \
            --steps "$SPEED_STEPS" --warmup 3 --data device --compile --peak_tflops "$PEAK_TFLOPS" --no_flops 2>&1 \
            | grep -v Warning | tee "$OUT/train_speed_compile.txt"
    fi
}

part_steps() {
    local variant
    for variant in $STEPS_VARIANTS; do  # most telling first: a part may be cut by DEADLINE_S
        local name=${variant%@*} batch=$STEPS_BATCH extra=() seconds=150
        [ "$variant" != "$name" ] && batch=${variant#*@}
        local common=(--batch_size "$batch" --steps "$STEPS_STEPS" --warmup 3 --data device --peak_tflops "$PEAK_TFLOPS")
        case $name in
            default) extra=(--profile 3); seconds=120 ;;
            graphs) extra=(--compile --no_flops --overrides run.compile_scope=model run.compile_mode=reduce-overhead) ;;
            model) extra=(--compile --no_flops --overrides run.compile_scope=model) ;;
            blocks) extra=(--compile --no_flops) ;;
            both) [ -f "$WORK/synth_npz/train.csv" ] || part_data  # prepared hearts: the loader's real work
                  extra=(--compile --no_flops --data both --workers 12 --data_dir "$WORK/synth_npz"
                         --overrides run.compile_scope=model run.compile_mode=reduce-overhead) ;;
            *) echo "steps: unknown variant $variant (default graphs model blocks both, each with an optional @BATCH)"; continue ;;
        esac
        local data_path="device cache"
        [ "$name" = both ] && data_path="loader and device cache, prepared hearts"
        stamp "steps: $name ($STEPS_CONFIGS, $data_path, batch $batch; limit $(limit "$seconds") s)"
        # shellcheck disable=SC2086
        timeout "$(limit "$seconds")" python3 benchmarks/train_speed.py --configs $STEPS_CONFIGS "${common[@]}" "${extra[@]}" \
            2>&1 | grep -v Warning | tee "$OUT/train_steps_${name}_$batch.txt"
    done
}

part_phase1() {
    stamp "phase1: torchrun, small, $PHASE1_STEPS steps (limit $PHASE1_LIMIT_S s)"
    timeout "$PHASE1_LIMIT_S" torchrun --standalone --nproc_per_node=1 -m heart_training.train.trainer --config phase1 \
        --output_dir "$WORK/phase1" "data.datasets.0.data_dir=$WORK/synth_npz" model.config=small \
        "optim.batch_size=$BATCH" "optim.max_steps=$PHASE1_STEPS" optim.warmup_steps=100 optim.lr=0.0005 \
        run.log_every=25 run.val_every=100 run.checkpoint_every=200 data.num_workers=12 run.progress=false \
        > "$OUT/phase1_console.txt" 2>&1
    echo "exit $?"
    grep -v "^ \|Warning\|warn" "$OUT/phase1_console.txt" | tail -n 8
    cp "$WORK/phase1/log.jsonl" "$OUT/phase1_log.jsonl" 2>/dev/null || ls "$WORK/phase1"
}

part_complete() {
    stamp "complete: complete_speed on $DEVICE with the phase-1 checkpoint"
    CK=$(ls "$WORK"/phase1/model_final.safetensors "$WORK"/phase1/model_best.safetensors 2>/dev/null | head -n 1)
    if [ -n "$CK" ]; then
        echo "checkpoint $CK"
        timeout 120 python3 benchmarks/complete_speed.py --checkpoint "$CK" --device "$DEVICE" --repeats 3 --threads 8 \
            > "$OUT/complete_speed.txt" 2>&1
        grep -v "^ " "$OUT/complete_speed.txt" | tail -n 12
    else
        echo "no checkpoint from the phase-1 run"
    fi
}

part_studydata() {
    stamp "studydata: the study's hearts and prepared data (limit $(limit 120) s)"
    # shellcheck disable=SC2086
    timeout "$(limit 120)" python3 benchmarks/completion_study.py --budget gpu --device "$DEVICE" \
        --output_dir "$WORK/study" --workers "$(nproc)" $STUDY_ARGS --stages hearts prepare \
        > "$OUT/studydata_console.txt" 2>&1
    echo "studydata: exit $?"
    grep -v "it/s\|s/it\|case/s\|heart/s" "$OUT/studydata_console.txt" | tail -n 4
}

part_study() {
    stamp "study: completion_study.py --budget gpu (limit $STUDY_LIMIT_S s) $STUDY_ARGS"
    # shellcheck disable=SC2086
    timeout "$(limit "$STUDY_LIMIT_S")" python3 benchmarks/completion_study.py --budget gpu --device "$DEVICE" \
        --output_dir "$WORK/study" --workers "$(nproc)" --eval_workers "$STUDY_EVAL_WORKERS" $STUDY_ARGS \
        > "$OUT/study_console.txt" 2>&1
    rc=$?
    echo "exit $rc"
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ]; then  # e.g. the device cache failing on this card: say so, use the loader
        grep -v "it/s\|s/it\|case/s\|heart/s" "$OUT/study_console.txt" | tail -n 15
        for phase in 1 2 3; do [ -f "$WORK/study/phase$phase/DONE" ] || rm -rf "$WORK/study/phase$phase"; done
        stamp "study FAILED (exit $rc); again with --data_path loader (limit $(limit "$STUDY_LIMIT_S") s)"
        SMALL_CACHE=false
        # shellcheck disable=SC2086
        timeout "$(limit "$STUDY_LIMIT_S")" python3 benchmarks/completion_study.py --budget gpu --device "$DEVICE" \
            --output_dir "$WORK/study" --workers "$(nproc)" --eval_workers "$STUDY_EVAL_WORKERS" --data_path loader \
            $STUDY_ARGS > "$OUT/study_console2.txt" 2>&1
        echo "exit $?"
        grep -v "it/s\|s/it\|case/s\|heart/s" "$OUT/study_console2.txt" | tail -n 40
    else
        grep -v "it/s\|s/it\|case/s\|heart/s" "$OUT/study_console.txt" | tail -n 40
    fi
    for phase in 1 2 3; do
        cp "$WORK/study/phase$phase/model_best.safetensors" "$OUT/study_phase${phase}_best.safetensors" 2>/dev/null
    done
    (cd "$OUT" && tar czf study_phase12.tgz study_phase1_best.safetensors study_phase2_best.safetensors \
        && rm -f study_phase1_best.safetensors study_phase2_best.safetensors) 2>/dev/null
    (cd "$WORK/study" && tar czf "$OUT/study_files.tgz" --ignore-failed-read study.md study.json timings.json \
        steps.json hearts/hearts.json phase*/log.jsonl phase*/stdout.log phase*/config.yaml eval/summary.json \
        eval/metrics.csv eval/report.html eval/shards/*/stdout.log 2>/dev/null)
}

part_small() {
    stamp "small: phase 1 of the named small config, device cache, $SMALL_STEPS steps (limit $(limit "$SMALL_LIMIT_S") s)"
    timeout "$(limit "$SMALL_LIMIT_S")" python3 -m heart_training.train.trainer --config phase1 --output_dir "$WORK/small" \
        "data.datasets.0.data_dir=$WORK/study/prepared" model.config=small "optim.batch_size=$SMALL_BATCH" \
        "optim.max_steps=$SMALL_STEPS" optim.warmup_steps=200 optim.lr=0.001 "data.device_cache=${SMALL_CACHE:-true}" \
        data.num_workers=12 \
        run.log_every=100 run.val_every=250 run.checkpoint_every=250 data.max_val_cases=16 run.progress=false \
        > "$OUT/small_console.txt" 2>&1
    echo "exit $? (124: stopped at its time limit; the best checkpoint so far is kept)"
    cp "$WORK/small/log.jsonl" "$OUT/small_log.txt" 2>/dev/null
    grep '"split": "val"' "$WORK/small/log.jsonl" 2>/dev/null | tail -n 3
    [ -f "$WORK/small/model_best.safetensors" ] && split -b 15M -d "$WORK/small/model_best.safetensors" \
        "$OUT/small_best.safetensors.part"
}

ct_checkpoint() {  # CK: the checkpoint of parts ct and worker (CT_CHECKPOINT, else part small's); 1 if absent
    CK="${CT_CHECKPOINT:-$WORK/small/model_best.safetensors}"
    [ -f "$CK" ] || { echo "$1: no checkpoint $CK"; return 1; }
}

part_ct() {
    ct_checkpoint ct || return
    stamp "ct: complete_speed --ct on $DEVICE with $CK (limit $(limit 60) s)"
    timeout "$(limit 60)" python3 benchmarks/complete_speed.py --ct --checkpoint "$CK" --device "$DEVICE" --repeats 3 \
        --threads 8 > "$OUT/complete_ct.txt" 2>&1
    grep -v "^ " "$OUT/complete_ct.txt" | tail -n 14
    stamp "ct: the same at 1 mm (limit $(limit 30) s)"
    timeout "$(limit 30)" python3 benchmarks/complete_speed.py --checkpoint "$CK" --device "$DEVICE" --repeats 3 \
        --threads 8 > "$OUT/complete_1mm.txt" 2>&1
    grep -v "^ " "$OUT/complete_1mm.txt" | tail -n 8
}

part_worker() {
    ct_checkpoint worker || return
    stamp "worker: worker_latency --ct on $DEVICE with $CK (limit $(limit 90) s)"
    timeout "$(limit 90)" python3 benchmarks/worker_latency.py --ct --checkpoint "$CK" --device "$DEVICE" --repeats 2 \
        --threads 8 > "$OUT/worker_latency_ct.txt" 2>&1
    tail -n 8 "$OUT/worker_latency_ct.txt"
}

part_real() {
    stamp "real: real_study.py --budget gpu from $REAL_INIT on $REAL_DIR (limit $(limit "$REAL_LIMIT_S") s)"
    # shellcheck disable=SC2086
    timeout "$(limit "$REAL_LIMIT_S")" python3 benchmarks/real_study.py --budget "$REAL_BUDGET" --device "$DEVICE" \
        --init "$REAL_INIT" --real_dir "$REAL_DIR" --output_dir "$WORK/real" --workers "$(nproc)" $REAL_ARGS \
        > "$OUT/real_console.txt" 2>&1
    echo "exit $? (124: stopped at its time limit; the report covers what finished)"
    # shellcheck disable=SC2086
    timeout "$(limit 40)" python3 benchmarks/real_study.py --budget "$REAL_BUDGET" --device "$DEVICE" --init "$REAL_INIT" \
        --real_dir "$REAL_DIR" --output_dir "$WORK/real" $REAL_ARGS --stages report >> "$OUT/real_console.txt" 2>&1
    grep -v "it/s\|s/it" "$OUT/real_console.txt" | tail -n 30
    cp "$WORK/real/phase4/model_best.safetensors" "$OUT/real_phase4_best.safetensors" 2>/dev/null
    (cd "$WORK/real" && tar czf "$OUT/real_files.tgz" --ignore-failed-read real_study.md real_study.json timings.json \
        whole logs phase4/log.jsonl phase4/stdout.log phase4/config.yaml eval data/*/split.json data/*/*.csv \
        2>/dev/null)
}

part_pack() {
    (cd "$OUT" && shopt -s nullglob && files=(./*.txt ./*.json) && [ ${#files[@]} -gt 0 ] \
        && tar czf texts.tgz "${files[@]}" && rm -f "${files[@]}")
    ls -la "$OUT"
}

stamp "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/machine.txt"
python3 -c "import torch, sys, os; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', \
torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU', 'cpus', os.cpu_count())" \
    2>&1 | tee -a "$OUT/machine.txt"
for part in $PARTS; do
    case "$part" in
        bg:*) "part_${part#bg:}" & ;;
        wait) stamp "wait: for the background parts"; wait ;;
        *) "part_$part" ;;
    esac
done
wait
stamp "done"
