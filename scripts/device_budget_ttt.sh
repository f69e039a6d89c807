#!/usr/bin/env bash
# Budget mode and score-first TTT on one GPU, as recorded in docs/performance.md.
#   bench: the bench's "after" and "ttt" sections for configs/approach_g.py and
#          "ttt" for configs/record.py (TTT time per chunk, projected to FineWeb val);
#   run:   configs/approach_g.py end to end with a CAP-second budget: warm-up,
#          the reserve timed on the live weights, training, calibration + Hessians
#          + GPTQ inside the cap, the artifact, both evaluations and TTT; then TTT
#          again with 4,096-token chunks (more chunks on the short embedded val set).
# Usage (device): OUT=/some/dir DATA=.shared/data bash scripts/device_budget_ttt.sh bench|run [CAP]
set -uo pipefail
PART=${1:?bench or run}
CAP=${2:-240}
source "$(dirname "$0")/device_env.sh"
if [ "$PART" = bench ]; then
  timeout 330 python -m golf_jax.tools.bench --config configs/approach_g.py --sections after,ttt $D --out "$OUT/bench_g" 2>&1 | tail -9
  timeout 200 python -m golf_jax.tools.bench --config configs/record.py --sections ttt $D --out "$OUT/bench_record" 2>&1 | tail -4
else
  # The approach-G model (33.3 M parameters) does not fit 16 MB unpruned; the
  # pruning search (one LZMA pass of ~40 s per step) is not what this measures.
  timeout 500 python train.py --config configs/approach_g.py $D --config.max_wallclock_seconds=$CAP \
    --config.artifact_budget_bytes=64000000 --config.output_dir="$OUT/run_g" --no-progress 2>&1 \
    | grep -v "^step [0-9]*/.*train_loss" | tail -40
  timeout 80 python -m golf_jax.ttt --artifact "$OUT/run_g/final_model.int6.golf" --config.ttt.chunk_tokens=4096 \
    --out "$OUT/run_g/ttt_4096.json" --no-progress 2>&1 | tail -4
  rm -rf "$OUT/run_g/checkpoints" "$OUT/run_g/final_model" "$OUT/run_g/final_model.int6.golf"
fi
