#!/usr/bin/env bash
# The after-training stages on one GPU at the record size, as recorded in
# docs/performance.md: the bench's "after" section (each stage twice), then a
# short record-config training run that continues into calibration, GPTQ,
# pruning, the artifact and both evaluations, then a replay from its
# checkpoint (the two artifacts must be byte-identical) and a sample.
# Usage (device): OUT=/some/dir DATA=.shared/data bash scripts/device_after_training.sh [train_seconds]
set -uo pipefail
SECONDS_CAP=${1:-60}
source "$(dirname "$0")/device_env.sh"
timeout 240 python -m golf_jax.tools.bench --sections after $D --out "$OUT/bench" 2>&1 | tail -8
timeout 420 python train.py --config configs/record.py $D --config.max_wallclock_seconds=$SECONDS_CAP \
  --config.val_loss_every=0 --config.output_dir="$OUT/run" --no-progress 2>&1 | grep -v "^step [0-9]*/.*train_loss" | tail -30
timeout 240 python -m golf_jax.quantize --checkpoint "$OUT/run" --out "$OUT/replay" --no-progress 2>&1 | tail -12
cmp "$OUT/run/final_model.int6.golf" "$OUT/replay/final_model.int6.golf" && echo "replay artifact: byte-identical"
timeout 90 python -m golf_jax.generate --artifact "$OUT/run/final_model.int6.golf" --prompt "First Citizen:" \
  --tokens 120 --samples 2 2>&1 | tail -12
rm -rf "$OUT/run/checkpoints" "$OUT/run/final_model" "$OUT/replay/final_model.int6.golf"
