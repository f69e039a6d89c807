#!/usr/bin/env bash
# One and two GPUs of one machine, as recorded in docs/performance.md: the record config for
# ITER steps (full global batch, 8 // n micro-steps per device) on 1 GPU (two seeds) and on
# 2 GPUs, no wall-clock cap, then the bench's profile of the 2-GPU optimizer step (Parallel
# Muon's collectives and what overlaps them). PARTS picks what runs, so the whole fits in two
# device calls. Usage (device, 2 GPUs):
#   OUT=/some/dir DATA=.shared/data bash scripts/device_scaling.sh ITER "g2 g1"
#   OUT=/some/dir DATA=.shared/data bash scripts/device_scaling.sh ITER "g1_seed2 profile"
set -uo pipefail
ITER=${1:-200}
PARTS=${2:-"g2 g1 g1_seed2 profile"}
source "$(dirname "$0")/device_env.sh"
R="--config.iterations=$ITER --config.max_wallclock_seconds=0 --config.warmdown_iters=50 --config.val_loss_every=50 \
   --config.warmup_steps=2 --config.train_log_every=1 --config.checkpoint_every=0 --no-progress --no-quantize"
run() {  # name devices seed
  timeout 300 python train.py --config configs/record.py $D $R --config.num_devices=$2 --config.seed=$3 \
    --config.output_dir="$OUT/$1" 2>&1 | grep -E "devices:|warmup|val_loss|steps in" | tail -8
  rm -rf "$OUT/$1/final_model" "$OUT/$1/checkpoints"
}
for part in $PARTS; do
  case $part in
    g2) run g2 2 314 ;;
    g1) run g1 1 314 ;;
    g1_seed2) run g1_seed2 1 315 ;;
    profile) timeout 200 python -m golf_jax.bench --config configs/record.py --sections profile $D \
               --out "$OUT/profile2" 2>&1 | tail -24
             rm -rf "$OUT/profile2/traces" ;;
  esac
done
