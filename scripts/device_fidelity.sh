#!/usr/bin/env bash
# The fidelity runs of docs/fidelity.md in one device call: 60-step golf_jax
# runs from the reference's seed-314 weights (scripts/fidelity_curve.py train),
# one per spec, spread over the machine's GPUs (one queue per GPU, run side by
# side), optionally N runs of the PyTorch reference itself (REFERENCE=N, each
# stopped once its post-EMA evaluation is logged; on each GPU before its golf_jax
# runs) and its dtype probe (PROBE=1), then the comparison table of every run:
# against the H100 reference curves (the fixtures) and, with REFERENCE, against
# the mean of this machine's reference runs. Results in $OUT/fidelity.tgz.
# DEADLINE (s, default 450): each run is given what is left of it, less 25 s for
# the comparison. Needs .shared (data, reference, fixtures) and .whl carried.
# Usage (device): OUT=... [REFERENCE=2 [REF_FROM=3]] [GOLF_TREE=.head] bash scripts/device_fidelity.sh "name:--config.a=1 --config.b=2" "name2:VAR=value" ...
set -uo pipefail
start=$SECONDS
source "$(dirname "$0")/device_env.sh"
export GOLF_JAX_SHARED=.shared
runs="$OUT/runs"; mkdir -p "$runs"
ngpu=$(nvidia-smi -L | wc -l)
nref=${REFERENCE:-0}
declare -a golfq refq load
for g in $(seq 0 $((ngpu - 1))); do golfq[$g]=""; refq[$g]=""; load[$g]=0; done
least_loaded() { local g=0 h; for h in $(seq 0 $((ngpu - 1))); do [ "${load[$h]}" -lt "${load[$g]}" ] && g=$h; done; echo $g; }
# The reference (its compilation included) takes about two golf_jax runs.
first=${REF_FROM:-1}  # the reference runs are ref_h200_<REF_FROM>, ... (distinct names across calls)
for i in $(seq "$first" $((first + nref - 1))); do
  g=$(least_loaded); refq[$g]+="ref_h200_$i"$'\n'; load[$g]=$((load[$g] + 2))
done
for spec in "$@"; do  # each run to the least loaded GPU
  g=$(least_loaded); golfq[$g]+="$spec"$'\n'; load[$g]=$((load[$g] + 1))
done
if [ "${PROBE:-0}" = 1 ]; then
  CUDA_VISIBLE_DEVICES=0 timeout 120 python3 scripts/reference_dtype_probe.py --reference .shared/reference/record_1019 \
    > "$runs/reference_dtype_probe.txt" 2>&1
fi
reference_run() {  # name gpu: one reference run in its own process group, stopped after its post-EMA line
  local name=$1 g=$2 limit=$((${DEADLINE:-450} - (SECONDS - start) - 25))
  mkdir -p "$runs/$name"
  [ "$limit" -lt 120 ] && { echo "$name (GPU $g): skipped, ${limit}s left"; return; }
  CUDA_VISIBLE_DEVICES=$g OUT="$runs/$name" LIMIT=$limit TORCH_LOGS=recompiles \
    setsid bash .shared/reference/record_1019/run_tinyshakespeare.sh > /dev/null 2>&1 &
  local ref=$! t0=$SECONDS
  until grep -q "DIAGNOSTIC post_ema" "$runs/$name/reference.log" 2>/dev/null || ! kill -0 $ref 2>/dev/null; do sleep 2; done
  # GNU timeout (inside the script) puts itself and python in a process group of their own: end that group,
  # then the script's (setsid made it the leader of its own).
  for c in $(cat /proc/$ref/task/*/children 2>/dev/null); do kill -- -"$c" 2>/dev/null; done
  kill -- -$ref 2>/dev/null; wait $ref
  echo "$name (GPU $g): $(grep -c train_loss "$runs/$name/reference.log") train lines in $((SECONDS - t0)) s," \
    "$(grep -o 'step:60/60 train_loss[^ ]* train_time:[0-9]*ms step_avg:[0-9.]*ms' "$runs/$name/reference.log")"
}
pids=()
for g in $(seq 0 $((ngpu - 1))); do
  ( while IFS= read -r name; do [ -n "$name" ] && reference_run "$name" "$g"; done <<< "${refq[$g]}"
    while IFS= read -r spec; do
      [ -z "$spec" ] && continue
      name=${spec%%:*}; envs=(); overrides=()
      for w in ${spec#*:}; do  # VAR=value words set the environment, the rest are overrides
        if [[ $w == --* ]]; then overrides+=("$w"); else envs+=("$w"); fi
      done
      t0=$SECONDS limit=$((${DEADLINE:-450} - (SECONDS - start) - 25))
      [ "$limit" -lt 60 ] && { echo "$name (GPU $g): skipped, ${limit}s left"; continue; }
      env "${envs[@]}" CUDA_VISIBLE_DEVICES=$g timeout "$limit" python3 scripts/fidelity_curve.py train --out "$runs/$name" \
        -- "${overrides[@]}" > "$runs/$name.out" 2>&1
      rm -rf "$runs/$name/final_model" "$runs/$name/checkpoints"
      echo "$name (GPU $g): $((SECONDS - t0)) s, $(grep -o '"step_avg_ms": [0-9.]*' "$runs/$name/summary.json" 2>/dev/null)"
      [ -f "$runs/$name/summary.json" ] || tail -5 "$runs/$name.out"
    done <<< "${golfq[$g]}" ) &
  pids+=($!)
done
wait "${pids[@]}"
names=(); for spec in "$@"; do names+=("$runs/${spec%%:*}"); done
h100=.shared/fixtures/reference/curves/record_60steps_tinyshakespeare.json
h200=(); for i in $(seq "$first" $((first + nref - 1))); do
  [ -n "$(grep -m1 'DIAGNOSTIC post_ema' "$runs/ref_h200_$i/reference.log" 2>/dev/null)" ] && h200+=("$runs/ref_h200_$i/reference.log")
done
# Against the H100 runs (this machine's reference runs are checked the same way), then against this machine's.
python3 scripts/fidelity_curve.py compare "${names[@]}" "${h200[@]}" --reference "$h100" \
  --plot "$runs/fidelity.png" --json "$runs/fidelity.json" | tee "$runs/compare.txt"
if [ "${#h200[@]}" -gt 0 ]; then
  python3 scripts/fidelity_curve.py compare "${names[@]}" --reference "$h100" "${h200[@]}" --mean-of "${h200[@]}" \
    --plot "$runs/fidelity_h200.png" --json "$runs/fidelity_h200.json" > "$runs/compare_h200.txt"
  sed -n '/vs mean of/,$p' "$runs/compare_h200.txt" | grep -v "^  val_bpb\|^wrote"
fi
grep -E "param dtypes|grad dtypes|torch" "$runs/reference_dtype_probe.txt" 2>/dev/null | cut -c1-400
tar czf "$OUT/fidelity.tgz" -C "$OUT" runs && rm -rf "$runs"
echo "device_fidelity.sh: $((SECONDS - start)) s"
