#!/usr/bin/env bash
# The fidelity runs of docs/fidelity.md in one device call: 60-step golf_jax
# runs from the reference's seed-314 weights (scripts/fidelity_curve.py train),
# one per spec, spread over the machine's GPUs (one queue per GPU, run side by
# side), optionally the PyTorch reference itself (REFERENCE=1, on the last GPU,
# stopped once its post-EMA evaluation is logged) and its dtype probe (PROBE=1),
# then the comparison table of every run. Results in one archive, $OUT/fidelity.tgz.
# Needs .shared (data, reference, fixtures) and .whl carried.
# Usage (device): OUT=... bash scripts/device_fidelity.sh "name:--config.a=1 --config.b=2" "name2:VAR=value" ...
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
export GOLF_JAX_SHARED=.shared
runs="$OUT/runs"; mkdir -p "$runs"
ngpu=$(nvidia-smi -L | wc -l)
declare -a queue load
for g in $(seq 0 $((ngpu - 1))); do queue[$g]=""; load[$g]=0; done
# The reference (its compilation included) takes about two golf_jax runs.
[ "${REFERENCE:-0}" = 1 ] && load[$((ngpu - 1))]=2
for spec in "$@"; do  # each run to the least loaded GPU
  g=0; for h in $(seq 0 $((ngpu - 1))); do [ "${load[$h]}" -lt "${load[$g]}" ] && g=$h; done
  queue[$g]+="$spec"$'\n'; load[$g]=$((load[$g] + 1))
done
pids=()
if [ "${PROBE:-0}" = 1 ]; then
  CUDA_VISIBLE_DEVICES=0 timeout 120 python3 scripts/reference_dtype_probe.py --reference .shared/reference/record_1019 \
    > "$runs/reference_dtype_probe.txt" 2>&1
fi
if [ "${REFERENCE:-0}" = 1 ]; then
  ( g=$((ngpu - 1)); mkdir -p "$runs/reference"
    CUDA_VISIBLE_DEVICES=$g OUT="$runs/reference" LIMIT=400 TORCH_LOGS=recompiles \
      bash .shared/reference/record_1019/run_tinyshakespeare.sh > /dev/null 2>&1 &
    ref=$!
    until grep -q "DIAGNOSTIC post_ema" "$runs/reference/reference.log" 2>/dev/null || ! kill -0 $ref 2>/dev/null; do sleep 2; done
    pkill -f drive.py; wait $ref
    echo "reference done: $(grep -c train_loss "$runs/reference/reference.log") train lines" ) &
  pids+=($!)
fi
for g in $(seq 0 $((ngpu - 1))); do
  ( while IFS= read -r spec; do
      [ -z "$spec" ] && continue
      name=${spec%%:*}; envs=(); overrides=()
      for w in ${spec#*:}; do  # VAR=value words set the environment, the rest are overrides
        if [[ $w == --* ]]; then overrides+=("$w"); else envs+=("$w"); fi
      done
      env "${envs[@]}" CUDA_VISIBLE_DEVICES=$g python3 scripts/fidelity_curve.py train --out "$runs/$name" \
        -- "${overrides[@]}" > "$runs/$name.out" 2>&1
      rm -rf "$runs/$name/final_model" "$runs/$name/checkpoints"
      echo "$name (GPU $g): $(grep -o '"step_avg_ms": [0-9.]*' "$runs/$name/summary.json" 2>/dev/null)"
      [ -f "$runs/$name/summary.json" ] || tail -5 "$runs/$name.out"
    done <<< "${queue[$g]}" ) &
  pids+=($!)
done
wait "${pids[@]}"
names=(); for spec in "$@"; do names+=("$runs/${spec%%:*}"); done
refs=(.shared/fixtures/reference/curves/record_60steps_tinyshakespeare.json)
[ -f "$runs/reference/reference.log" ] && refs+=("$runs/reference/reference.log")
python3 scripts/fidelity_curve.py compare "${names[@]}" --reference "${refs[@]}" --plot "$runs/fidelity.png" \
  --json "$runs/fidelity.json" | tee "$runs/compare.txt"
grep -E "param dtypes|grad dtypes|torch" "$runs/reference_dtype_probe.txt" 2>/dev/null | cut -c1-400
tar czf "$OUT/fidelity.tgz" -C "$OUT" runs && rm -rf "$runs"
