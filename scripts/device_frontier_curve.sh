#!/usr/bin/env bash
# The 1.0611 record's short training curve, golf_jax against its PyTorch reference on one GPU
# (issue 19), in one device call: the tiled CaseOps data (scripts/frontier_throughput_data.py),
# the reference's initial state and the curve's settings (scripts/frontier_curve.py init: its
# docstring lists every setting that differs from the record's run, and why), then side by side
# on the GPU: the reference's own main() from that state (eager: TORCHDYNAMO_DISABLE=1, its
# compilation would not fit beside golf_jax's), golf_jax's train.py with configs/frontier.py set
# to uncompiled PyTorch's rounding (the matched run, "golf"), and with AS_CONFIG=1 (default) a
# second golf_jax run with the config's own rounding, that of the record's torch.compile'd code
# ("golf_as_config"); meanwhile, on the CPU, the check that golf_jax's packed rows are the
# reference loader's. Then the per-step table and the plot. Side by side, the runs' step times
# mean nothing; each process is stopped at DEADLINE less the comparison's time.
# Results: $OUT/compare.txt, $OUT/curve.png, and everything in $OUT/frontier_curve.tgz.
# Needs .shared (data, reference) and .whl carried.
# GOLF_EXTRA: golf_jax overrides given to every golf_jax run (e.g. a kernel's curve:
# GOLF_EXTRA="--config.fusion_kernels=norm_rope,xsa,softcap_ce"). MATCHED=0 leaves out the matched
# run. AS_CONFIG_VARIANT: overrides for one more run with the config's own rounding
# ("golf_as_config_variant", beside "golf_as_config"): a change that acts only with that rounding
# (the residual-mix and q/k kernels step aside without scales_in_float32), against the same run
# without it, each against the reference.
# REFERENCE_FROM: the curve folder of an earlier call (its frontier_curve.tgz unpacked here and
# carried, e.g. .refcurve/curve): its reference run is compared instead of running one in this
# call. Its init/settings.json must equal this call's (the same INIT_FLAGS, and the same initial
# weights: settings.json holds their hash). So the compiled reference, whose compilation does not
# fit beside golf_jax's runs, takes one call of its own
# (INIT_FLAGS=--compile-reference MATCHED=0 AS_CONFIG=0), and golf_jax's runs the next
# (INIT_FLAGS=--compile-reference REFERENCE_FROM=.refcurve/curve AS_CONFIG=0: the matched run then has the
# config's own rounding).
# Usage (device): OUT=... [STEPS=60] [ROW=16384] [WARMUP=20] [VAL_EVERY=20] [AS_CONFIG=1] [DEADLINE=520] \
#   [GOLF_EXTRA=...] [MATCHED=1] [AS_CONFIG_VARIANT=...] [REFERENCE_FROM=...] bash scripts/device_frontier_curve.sh
# The same script on a CPU, tiny (a dry run of the call): REF_DEVICE=cpu TOKENS=600000 VAL_TOKENS=20000 \
#   INIT_FLAGS="--tiny --float32 --train-seq-len 128 --eval-seq-len 128" STEPS=12 ROW=512 WARMUP=2 VAL_EVERY=6
set -uo pipefail
start=$SECONDS
source "$(dirname "$0")/device_env.sh"
export GOLF_JAX_REFERENCE=.shared/reference
work="$OUT/curve"; data=/tmp/fdata; mkdir -p "$work"
python3 scripts/frontier_throughput_data.py --out "$data" --tokens "${TOKENS:-12000000}" \
  --val-tokens "${VAL_TOKENS:-524289}" | tee "$work/data.txt"
# shellcheck disable=SC2086  # INIT_FLAGS: several flags
python3 scripts/frontier_curve.py init --out "$work/init" --steps "${STEPS:-60}" --row-tokens "${ROW:-16384}" \
  --warmup "${WARMUP:-20}" --val-every "${VAL_EVERY:-20}" ${INIT_FLAGS:-} 2>&1 | tail -1 | tee "$work/init.txt"
[ -f "$work/init/init.npz" ] || { echo "init failed"; exit 1; }
echo "prepared in $((SECONDS - start)) s"
limit=$(( ${DEADLINE:-520} - (SECONDS - start) - 30 ))
# JAX takes 75% of the GPU by default: a share each, the rest for the reference (16k-token rows: a few GB each).
golf_mem=0.3; [ -n "${AS_CONFIG_VARIANT:-}" ] && golf_mem=0.25
run() {  # name, command...: one process, stopped at the limit
  local name=$1 t0=$SECONDS; shift
  timeout "$limit" "$@" > "$work/$name.out" 2>&1
  echo "$name: exit $? after $((SECONDS - t0)) s"
}
CUDA_VISIBLE_DEVICES= JAX_PLATFORMS=cpu run check_data python3 scripts/frontier_curve.py check-data \
  --init "$work/init" --data "$data" &
if [ -n "${REFERENCE_FROM:-}" ]; then
  cmp -s "$REFERENCE_FROM/init/settings.json" "$work/init/settings.json" \
    || { echo "REFERENCE_FROM=$REFERENCE_FROM: its init/settings.json differs from this call's"; \
         diff "$REFERENCE_FROM/init/settings.json" "$work/init/settings.json"; exit 1; }
  cp -r "$REFERENCE_FROM/reference" "$work/reference" && echo "reference: from $REFERENCE_FROM"
else
  run reference python3 scripts/frontier_curve.py reference --init "$work/init" --data "$data" \
    --out "$work/reference" --device "${REF_DEVICE:-cuda}" &
fi
# shellcheck disable=SC2086  # GOLF_EXTRA: several overrides
if [ "${MATCHED:-1}" = 1 ]; then
  XLA_PYTHON_CLIENT_MEM_FRACTION=$golf_mem run golf python3 scripts/frontier_curve.py golf --init "$work/init" \
    --data "$data" --out "$work/golf" -- ${GOLF_EXTRA:-} &
fi
as_config() {  # name, overrides...: a run with the config's own rounding
  local name=$1; shift
  XLA_PYTHON_CLIENT_MEM_FRACTION=$golf_mem run "$name" python3 scripts/frontier_curve.py golf \
    --init "$work/init" --data "$data" --out "$work/$name" \
    -- --config.model.scales_in_float32=true --config.optimizer.muon_ns_rounding=compiled "$@" &
}
# shellcheck disable=SC2086  # several overrides
[ "${AS_CONFIG:-1}" = 1 ] && as_config golf_as_config ${GOLF_EXTRA:-}
# shellcheck disable=SC2086
[ -n "${AS_CONFIG_VARIANT:-}" ] && as_config golf_as_config_variant ${GOLF_EXTRA:-} ${AS_CONFIG_VARIANT}
wait
tail -1 "$work/check_data.out"
grep -h "fused_kernels\|layer_loop_on_at_step\|log_mismatches" "$work/reference/reference.json" 2>/dev/null \
  | tr -d '\n '; echo
[ -f "$work/reference.out" ] && tail -3 "$work/reference.out"
for r in "$work"/golf*.out; do [ -f "$r" ] && tail -2 "$r"; done
runs=(); for r in golf golf_as_config golf_as_config_variant; do [ -f "$work/$r/train.jsonl" ] && runs+=("$work/$r"); done
if [ ${#runs[@]} -gt 0 ]; then
  python3 scripts/frontier_curve.py compare "${runs[@]}" --reference "$work/reference" --plot "$OUT/curve.png" \
    --json "$work/compare.json" > "$OUT/compare.txt" 2>&1
  cat "$OUT/compare.txt"
fi
rm -rf "$work"/golf*/final_model "$work"/golf*/checkpoints "$work/init/init.npz"  # 144 MB of known weights
tar czf "$OUT/frontier_curve.tgz" -C "$OUT" curve && rm -rf "$work"
echo "device_frontier_curve.sh: $((SECONDS - start)) s"
