#!/bin/bash
# HeartCompletion: one training phase on one node with 4 x A100 40 GB (torchrun, DDP, NCCL, bf16).
#
#   sbatch training/slurm/train_4xa100.sh phase1
#   sbatch training/slurm/train_4xa100.sh phase2 optim.max_steps=40000      # extra key=value overrides
#
# Data layout (set DATA_DIR): the heart-prepare output, one .npz per case, plus heart-split's lists
#   $DATA_DIR/*.npz  $DATA_DIR/train.csv  $DATA_DIR/val.csv  (manifest.json from heart-prepare)
# Outputs (RUN_ROOT/<phase>/): config.yaml, log.jsonl, tensorboard/, state_last.pt (resumable),
#   model_best.safetensors (best validation IoU), model_final.safetensors (inference checkpoints);
#   Slurm's own log goes to RUN_ROOT/slurm-<jobid>.out.
# Resume: the script always passes --resume, so re-submitting the same command (or a requeue after
#   pre-emption / the time limit) continues from state_last.pt exactly. Slurm sends SIGTERM ten
#   minutes before the time limit; torchrun forwards it to every rank, which saves the state after
#   the current step and exits; the script then requeues itself.
# Phases 2-4 start from the previous phase's model_best.safetensors (model.init_from in the configs,
#   relative to the working directory = RUN_ROOT's parent by default; override with
#   model.init_from=PATH).
#
#SBATCH --job-name=heart-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --mem=200G
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@600
#SBATCH --requeue
#SBATCH --output=runs/slurm-%j.out

set -euo pipefail

PHASE="${1:-phase1}"
shift || true
DATA_DIR="${DATA_DIR:-$PWD/data/imagecas_npz}"
RUN_ROOT="${RUN_ROOT:-$PWD/runs}"
NGPU="${NGPU:-4}"
# the project's virtual environment (pip install -e .[train]) with a CUDA build of torch
if [ -n "${VENV:-}" ]; then source "$VENV/bin/activate"; fi

mkdir -p "$RUN_ROOT/$PHASE"
export OMP_NUM_THREADS=4           # per process; the data loader workers do the heavy CPU work
export NCCL_ASYNC_ERROR_HANDLING=1
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1

echo "heart-train $PHASE on $(hostname): $NGPU GPUs, data $DATA_DIR, output $RUN_ROOT/$PHASE"
nvidia-smi --query-gpu=name,memory.total --format=csv || true

srun --kill-on-bad-exit=1 torchrun --standalone --nproc_per_node="$NGPU" \
    -m heart_training.train.trainer --config "$PHASE" --output_dir "$RUN_ROOT/$PHASE" --resume \
    "data.datasets.0.data_dir=$DATA_DIR" "$@"

# stopped early (signal) without reaching max_steps: requeue to continue from state_last.pt
if [ ! -f "$RUN_ROOT/$PHASE/model_final.safetensors" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    echo "not finished yet: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
