#!/usr/bin/env bash
# Launch train.py with torchrun: copy this file, edit the block marked EDIT, run it.
#
#   bash launch.sh                                        # as shipped: the built-in demo on this machine
#   cp launch.sh launch_food.sh; vi launch_food.sh; bash launch_food.sh
#   MBS=4 GBS=256 DIST=fsdp bash launch.sh                # any variable below can come from the environment
#   NNODES=4 DIST=hsdp bash launch.sh                     # shard within each node, replicate across nodes
#   DRY_RUN=1 bash launch.sh                              # check paths and print the torchrun line only
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash launch.sh # multi-node: the same line on every node,
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 bash launch.sh #   NODE_RANK 0..NNODES-1
#   sbatch --nodes 2 --ntasks-per-node 1 --gpus-per-node 8 --wrap "srun bash launch.sh"   # Slurm
#
# Run it again with the same SAVE_CKPT_PATH and it resumes from the newest complete checkpoint.
# Multi-node runs need SAVE_CKPT_PATH on a filesystem every node sees (each rank writes its shard).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

# Under Slurm (srun, one task per node) the node count, node rank and first node come from Slurm.
if [[ -n "${SLURM_NODEID:-}" ]]; then
    if [[ "${SLURM_NTASKS:-1}" != "${SLURM_NNODES:-1}" ]]; then
        echo "error: launch.sh starts one torchrun per node; run it with srun --ntasks-per-node 1" \
             "(got SLURM_NTASKS=${SLURM_NTASKS:-?} on SLURM_NNODES=${SLURM_NNODES:-?} nodes)" >&2
        exit 1
    fi
    : "${NNODES:=$SLURM_NNODES}" "${NODE_RANK:=$SLURM_NODEID}" "${GPUS_PER_NODE:=${SLURM_GPUS_ON_NODE:-auto}}"
    [[ -n "${MASTER_ADDR:-}" ]] || MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
fi

# ================================ EDIT ================================
EXP_DIR=${EXP_DIR:-runs}                                # parent folder of your runs
SAVE_CKPT_PATH=${SAVE_CKPT_PATH:-$EXP_DIR/demo_$(date +%m%d)}  # this run: checkpoints, metrics.jsonl, run_*.log
MODEL=${MODEL:-preset:resnet-tiny}                      # local HF folder, e.g. /models/Qwen2.5-VL-7B-Instruct
# data specs, space-separated: FILE.jsonl or NAME=PATH (image folder, Parquet, .tar shards; docs/data.md)
TRAIN_DATA=${TRAIN_DATA:-${TRAIN_JSONL:-"demo_data/digits/train.jsonl demo_data/faces/train.jsonl"}}
VAL_DATA=${VAL_DATA-${VAL_JSONL-"demo_data/digits/val.jsonl demo_data/faces/val.jsonl"}}  # empty: no evaluation
DATASETS=${DATASETS:-demo_data/datasets.json}           # registry file (num_classes, eval_ratio per dataset)
CONFIG=${CONFIG-configs/demo.yaml}                      # every other setting; the flags below win. Empty: none
MBS=${MBS:-32}                                          # micro batch per GPU (per process)
GBS=${GBS:-32}                                          # global batch = MBS x GPUS_PER_NODE x NNODES x grad_accum
NSTEP=${NSTEP:-1500}                                    # optimizer steps (about samples x epochs / GBS)
LR=${LR:-2e-3}
PRECISION=${PRECISION:-fp32}                            # bf16 on GPUs
DIST=${DIST:-ddp}                                       # ddp: full replicas; fsdp: FSDP2 sharding over all GPUs;
                                                        #   hsdp: sharded within SHARD_SIZE GPUs, replicated across
SHARD_SIZE=${SHARD_SIZE:-}                              # hsdp: GPUs per model copy (default: GPUS_PER_NODE)
GPUS_PER_NODE=${GPUS_PER_NODE:-auto}                    # auto: every GPU nvidia-smi lists; 1 process without GPUs
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}                   # node 0's address, the same on every node
MASTER_PORT=${MASTER_PORT:-29500}
EXTRA_ARGS=${EXTRA_ARGS:-}                              # other train.py flags, e.g. "--gradient_checkpointing"
MAKE_DEMO_DATA=${MAKE_DEMO_DATA:-1}                     # 1: write demo_data/ when missing; 0 for your own data
# ======================================================================
DRY_RUN=${DRY_RUN:-0}

fail() { echo "error: $*" >&2; exit 1; }

if [[ "$GPUS_PER_NODE" == auto ]]; then
    GPUS_PER_NODE=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
    (( GPUS_PER_NODE > 0 )) || GPUS_PER_NODE=1
fi
for name in MBS GBS NSTEP GPUS_PER_NODE NNODES; do
    [[ "${!name}" =~ ^[1-9][0-9]*$ ]] || fail "$name must be a positive integer, got '${!name}'"
done
[[ "$NODE_RANK" =~ ^[0-9]+$ ]] && (( NODE_RANK < NNODES )) || fail "NODE_RANK must be in 0..$((NNODES - 1)), got '$NODE_RANK'"
[[ "$DIST" == ddp || "$DIST" == fsdp || "$DIST" == hsdp ]] || fail "DIST must be ddp, fsdp or hsdp, got '$DIST'"

PROCS=$((GPUS_PER_NODE * NNODES))
if [[ "$DIST" == hsdp ]]; then
    SHARD_SIZE=${SHARD_SIZE:-$GPUS_PER_NODE}
    [[ "$SHARD_SIZE" =~ ^[1-9][0-9]*$ ]] && (( PROCS % SHARD_SIZE == 0 )) \
        || fail "SHARD_SIZE must be a positive integer that divides GPUS_PER_NODE x NNODES = $PROCS, got '$SHARD_SIZE'"
elif [[ -n "$SHARD_SIZE" ]]; then
    fail "SHARD_SIZE is for DIST=hsdp (got DIST=$DIST)"
fi
PER_MICRO_STEP=$((MBS * PROCS))
if (( GBS % PER_MICRO_STEP != 0 )); then
    fail "GBS=$GBS is not a multiple of MBS x GPUS_PER_NODE x NNODES = $MBS x $GPUS_PER_NODE x $NNODES = $PER_MICRO_STEP"
fi
GRAD_ACCUM=$((GBS / PER_MICRO_STEP))

if [[ "$MAKE_DEMO_DATA" == 1 && ! -f demo_data/datasets.json ]]; then
    echo "writing the demo data: python dataset.py --make-demo demo_data"
    python dataset.py --make-demo demo_data
fi

# Pre-flight: every input path exists (all missing ones reported at once).
missing=()
[[ "$MODEL" == preset:* || -e "$MODEL" ]] || missing+=("MODEL=$MODEL")
spec_path() {  # the path of a data spec: without NAME= and a kind prefix
    local path=${1#*=}
    [[ "$1" == *=* ]] || path=$1
    for kind in folder hf wds jsonl; do path=${path#"$kind":}; done
    echo "$path"
}
for name in TRAIN_DATA VAL_DATA; do
    for spec in ${!name}; do
        path=$(spec_path "$spec")
        # globs, {000..099} ranges and URLs are train.py's to check
        [[ "$path" == *[*?[{]* || "$path" == *://* || -e "$path" ]] || missing+=("$name: $spec")
    done
done
[[ -f "$DATASETS" ]] || missing+=("DATASETS=$DATASETS")
[[ -z "$CONFIG" || -f "$CONFIG" ]] || missing+=("CONFIG=$CONFIG")
if (( ${#missing[@]} )); then
    printf 'error: not found: %s\n' "${missing[@]}" >&2
    exit 1
fi

if (( NNODES == 1 )); then
    LAUNCH=(torchrun --standalone --nproc_per_node "$GPUS_PER_NODE")
else
    LAUNCH=(torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE"
            --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
fi
CMD=("${LAUNCH[@]}" train.py)
[[ -z "$CONFIG" ]] || CMD+=(--config "$CONFIG")
# shellcheck disable=SC2206  # file lists and EXTRA_ARGS are space-separated on purpose
CMD+=(--model "$MODEL" --train_data $TRAIN_DATA --datasets "$DATASETS" --output_dir "$SAVE_CKPT_PATH"
      --batch_size "$MBS" --grad_accum "$GRAD_ACCUM" --max_steps "$NSTEP" --lr "$LR" --precision "$PRECISION"
      --dist "$DIST")
[[ "$DIST" != hsdp ]] || CMD+=(--shard_size "$SHARD_SIZE")
# shellcheck disable=SC2206
[[ -z "$VAL_DATA" ]] || CMD+=(--val_data $VAL_DATA)
if compgen -G "$SAVE_CKPT_PATH/checkpoint-*/training_info.json" > /dev/null; then
    CMD+=(--resume latest)
fi
# shellcheck disable=SC2206
CMD+=($EXTRA_ARGS)

echo "global batch $GBS = MBS $MBS x $GPUS_PER_NODE GPU(s) x $NNODES node(s) x grad_accum $GRAD_ACCUM"
printf "%q " "${CMD[@]}"; echo
[[ "$DRY_RUN" == 1 ]] && exit 0

mkdir -p "$SAVE_CKPT_PATH"
LOG="$SAVE_CKPT_PATH/run_$(date +%Y-%m-%d_%H%M%S)_node$NODE_RANK.log"
echo "log: $LOG"
# Preemption (SIGTERM) and Slurm's time-limit warning (SIGUSR1, sbatch --signal=USR1@120) reach every process:
# train.py finishes its step, writes a checkpoint and exits 0. This shell and tee ignore them so that the
# log stays open and the outcome is reported; torchrun installs its own SIGTERM handler (it forwards it).
trap '' TERM USR1
set +e
"${CMD[@]}" 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
if (( status != 0 )) && tail -n 1 "$SAVE_CKPT_PATH/metrics.jsonl" 2>/dev/null | grep -q '"event": "stopped"'; then
    echo "stopped by a signal with a checkpoint written: run this script again to resume"
    exit 0
fi
exit "$status"
