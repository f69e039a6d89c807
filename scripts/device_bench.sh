#!/usr/bin/env bash
# Issue 5's measurements in one device call (one GPU): the GPU tests, the
# whole bench (every section but ttt; more with an argument, e.g. profile),
# then a short record-config training run for launch-to-first-step,
# recompilations (validation at step 0, as in a real run, so it is compiled
# before the first step) and the whole training step's peak memory.
# jax-triton travels as a wheel in .whl (../shared/notes/reference_numbers.md).
# Usage (device): OUT=/some/dir DATA=.shared/data bash scripts/device_bench.sh [extra bench sections]
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tail -3
timeout 480 python3 -m golf_jax.tools.bench --config configs/record.py --sections "eval,grad,train,attention,mlp,after${1:+,$1}" \
  $D --out "$OUT/bench" 2>&1 | grep -v "^WARNING\|^I0000" | tail -45
timeout 240 python3 train.py --config configs/record.py $D --config.iterations=40 \
  --config.output_dir="$OUT/run" --no-quantize --no-progress 2>&1 | grep -v "train_loss" | tail -8
python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print({k: s[k] for k in s if k in ('launch_to_first_step_s','peak_memory_bytes','recompilations_after_first_step','step_avg_ms','steps_this_run','wall_s')})" "$OUT/run/summary.json"
rm -rf "$OUT/run/checkpoints" "$OUT/run/final_model" "$OUT"/bench/traces/*/plugins
