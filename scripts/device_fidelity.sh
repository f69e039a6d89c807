#!/usr/bin/env bash
# The fidelity runs of docs/fidelity.md in one device call: 60-step golf_jax
# runs from the reference's seed-314 weights (scripts/fidelity_curve.py train),
# one per spec, and runs of the PyTorch reference itself (run_tinyshakespeare.sh,
# each stopped once its post-EMA evaluation is logged), spread over queues, one
# per GPU (SLOTS=K: K queues per GPU, run side by side on it), optionally with its
# dtype probe (PROBE=1), then the comparison table of every run: against the H100
# reference curves (the fixtures) and, with plain reference runs, against the
# mean of this machine's plain reference runs. Results in $OUT/fidelity.tgz.
# A spec is "name:words". VAR=value words set the run's environment; the other
# words (--config...) are golf_jax overrides. A name starting with "ref_" makes it
# a reference run (VAR=value words only), e.g. "ref_eager_1:TORCHDYNAMO_DISABLE=1";
# REFERENCE=N puts N plain ones first, ref_<gpu>_<REF_FROM>, ... (gpu: h100, h200, a100, as
# nvidia-smi names it; distinct names across calls). An XLA_FLAGS=... word is added to
# the XLA_FLAGS already set.
# Each spec goes to the least loaded queue (a compiled reference run counts as two
# golf_jax runs, an eager one as one), and each queue runs its specs in that order.
# DEADLINE (s, default 450): each run is given what is left of it, less 25 s for
# the comparison. Needs .shared (data, reference, fixtures) and .whl carried.
# Usage (device): OUT=... [REFERENCE=2 [REF_FROM=3]] [SLOTS=2] [GOLF_TREE=.head] bash scripts/device_fidelity.sh \
#   "name:--config.a=1 --config.b=2" "name2:VAR=value" "ref_x:VAR=value" ...
set -uo pipefail
start=$SECONDS
source "$(dirname "$0")/device_env.sh"
export GOLF_JAX_SHARED=.shared
runs="$OUT/runs"; mkdir -p "$runs"
ngpu=$(nvidia-smi -L | wc -l)
slots=${SLOTS:-1}; nq=$((ngpu * slots))
if [ "$slots" -gt 1 ]; then  # JAX takes 75% of the GPU by default: leave room for the queue beside it
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-$(awk "BEGIN{print 0.7/$slots}")}
fi
nref=${REFERENCE:-0} first=${REF_FROM:-1}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oE "\b[A-Z]+[0-9]+\b" | head -1 | tr A-Z a-z)
specs=(); for i in $(seq "$first" $((first + nref - 1))); do specs+=("ref_${gpu:-gpu}_$i:"); done
specs+=("$@")
declare -a queue load
for q in $(seq 0 $((nq - 1))); do queue[$q]=""; load[$q]=0; done
least_loaded() { local q=0 h; for h in $(seq 0 $((nq - 1))); do [ "${load[$h]}" -lt "${load[$q]}" ] && q=$h; done; echo $q; }
weight() {  # a compiled reference run (its compilation included) takes about two golf_jax runs
  [[ ${1%%:*} == ref_* ]] || { echo 1; return; }
  [[ " ${1#*:} " == *" TORCHDYNAMO_DISABLE=1 "* ]] && echo 1 || echo 2
}
for spec in "${specs[@]}"; do
  q=$(least_loaded); queue[$q]+="$spec"$'\n'; load[$q]=$((load[$q] + $(weight "$spec")))
done
if [ "${PROBE:-0}" = 1 ]; then
  CUDA_VISIBLE_DEVICES=0 timeout 120 python3 scripts/reference_dtype_probe.py --reference .shared/reference/record_1019 \
    > "$runs/reference_dtype_probe.txt" 2>&1
fi
split_spec() {  # spec -> name, envs (XLA_FLAGS words added to the XLA_FLAGS set), overrides
  name=${1%%:*}; envs=(); overrides=()
  for w in ${1#*:}; do
    if [[ $w == --* ]]; then overrides+=("$w")
    elif [[ $w == XLA_FLAGS=* ]]; then envs+=("XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }${w#XLA_FLAGS=}")
    else envs+=("$w"); fi
  done
}
reference_run() {  # gpu where: one reference run in its own process group, stopped after its post-EMA line
  local g=$1 where=$2 limit=$((${DEADLINE:-450} - (SECONDS - start) - 25))
  mkdir -p "$runs/$name"
  [ "$limit" -lt 120 ] && { echo "$name ($where): skipped, ${limit}s left"; return; }
  env "${envs[@]}" CUDA_VISIBLE_DEVICES=$g OUT="$runs/$name" LIMIT=$limit TORCH_LOGS=recompiles \
    setsid bash .shared/reference/record_1019/run_tinyshakespeare.sh > /dev/null 2>&1 &
  local ref=$! t0=$SECONDS
  until grep -q "DIAGNOSTIC post_ema" "$runs/$name/reference.log" 2>/dev/null || ! kill -0 $ref 2>/dev/null; do sleep 2; done
  # GNU timeout (inside the script) puts itself and python in a process group of their own: end that group,
  # then the script's (setsid made it the leader of its own).
  for c in $(cat /proc/$ref/task/*/children 2>/dev/null); do kill -- -"$c" 2>/dev/null; done
  kill -- -$ref 2>/dev/null; wait $ref
  echo "$name ($where${envs[*]:+, ${envs[*]}}): $(grep -c train_loss "$runs/$name/reference.log") train lines in $((SECONDS - t0)) s," \
    "$(grep -o 'step:60/60 train_loss[^ ]* train_time:[0-9]*ms step_avg:[0-9.]*ms' "$runs/$name/reference.log")"
}
golf_run() {  # gpu where: one golf_jax run
  local g=$1 where=$2 t0=$SECONDS limit=$((${DEADLINE:-450} - (SECONDS - start) - 25))
  [ "$limit" -lt 60 ] && { echo "$name ($where): skipped, ${limit}s left"; return; }
  echo "env: ${envs[*]}" > "$runs/$name.out"
  env "${envs[@]}" CUDA_VISIBLE_DEVICES=$g timeout "$limit" python3 scripts/fidelity_curve.py train --out "$runs/$name" \
    -- "${overrides[@]}" >> "$runs/$name.out" 2>&1
  rm -rf "$runs/$name/final_model" "$runs/$name/checkpoints"
  echo "$name ($where${envs[*]:+, ${envs[*]}}): $((SECONDS - t0)) s, $(grep -o '"step_avg_ms": [0-9.]*' "$runs/$name/summary.json" 2>/dev/null)"
  [ -f "$runs/$name/summary.json" ] || tail -5 "$runs/$name.out"
}
pids=()
for q in $(seq 0 $((nq - 1))); do
  g=$((q % ngpu)); where="GPU $g"; [ "$slots" -gt 1 ] && where="queue $q, GPU $g"
  ( while IFS= read -r spec; do
      [ -z "$spec" ] && continue
      split_spec "$spec"
      if [[ $name == ref_* ]]; then reference_run "$g" "$where"; else golf_run "$g" "$where"; fi
    done <<< "${queue[$q]}" ) &
  pids+=($!)
done
wait "${pids[@]}"
# golf_jax runs, then the finished reference runs: those with VAR=value words, and the plain ones (this machine's mean)
names=(); variants=(); plain=()
for spec in "${specs[@]}"; do
  split_spec "$spec"
  if [[ $name != ref_* ]]; then names+=("$runs/$name")
  elif [ -n "$(grep -m1 'DIAGNOSTIC post_ema' "$runs/$name/reference.log" 2>/dev/null)" ]; then
    if [ ${#envs[@]} -gt 0 ]; then variants+=("$runs/$name/reference.log"); else plain+=("$runs/$name/reference.log"); fi
  fi
done
fixture_curves=.shared/fixtures/reference/curves/record_60steps_tinyshakespeare.json
# Against the H100 runs (this machine's reference runs are checked the same way), then against this machine's plain ones.
python3 scripts/fidelity_curve.py compare "${names[@]}" "${variants[@]}" "${plain[@]}" --reference "$fixture_curves" \
  --plot "$runs/fidelity.png" --json "$runs/fidelity.json" | tee "$runs/compare.txt"
if [ "${#plain[@]}" -gt 0 ]; then
  python3 scripts/fidelity_curve.py compare "${names[@]}" "${variants[@]}" --reference "$fixture_curves" "${plain[@]}" --mean-of "${plain[@]}" \
    --plot "$runs/fidelity_here.png" --json "$runs/fidelity_here.json" > "$runs/compare_here.txt"
  sed -n '/vs mean of/,$p' "$runs/compare_here.txt" | grep -v "^  val_bpb\|^wrote"
fi
grep -E "param dtypes|grad dtypes|torch" "$runs/reference_dtype_probe.txt" 2>/dev/null | cut -c1-400
tar czf "$OUT/fidelity.tgz" -C "$OUT" runs && rm -rf "$runs"
echo "device_fidelity.sh: $((SECONDS - start)) s"
