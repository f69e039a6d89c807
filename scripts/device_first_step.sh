#!/usr/bin/env bash
# The first-step measurement of docs/fidelity.md ("first-step gap") in one device call (one GPU):
# the reference's first step eager and torch.compile'd, side by side in the background, golf_jax's
# against both (scripts/first_step_gpu.py), then each reference's forward at golf_jax's weights and
# the group swaps. Logs, first_step.json and tables.npz in $OUT. Needs .shared and .whl carried.
# LIMIT (s, default 260) bounds every process. GOLF_OPT="optimizer.x=1 model.y=2" overrides golf_jax's
# config; VARIANT="section.key=value ..." runs a second golf_jax process with those overrides too
# (results first_step_variant.json), if at least 100 s of LIMIT are left.
# Usage (device): OUT=... bash scripts/device_first_step.sh
set -uo pipefail
start=$SECONDS
source "$(dirname "$0")/device_env.sh"
export GOLF_JAX_SHARED=.shared
S=scripts/first_step_gpu.py
L=${LIMIT:-260}
SIZE=${SIZE:-}      # a CPU check: SIZE="--seqs 2 --seq-len 128" REFDEV="--device cpu"
REFDEV=${REFDEV:-}
rm -rf /tmp/fe /tmp/fc
timeout $L python3 $S ref --work /tmp/fc --compile --eval-golf --wait $((L - 20)) $SIZE $REFDEV > "$OUT/ref_compiled.log" 2>&1 &
pc=$!
timeout $L python3 $S ref --work /tmp/fe --eval-golf --wait $((L - 20)) $SIZE $REFDEV > "$OUT/ref_eager.log" 2>&1 &
pe=$!
opts=(); for o in ${GOLF_OPT:-}; do opts+=(--golf-opt "$o"); done
XLA_PYTHON_CLIENT_MEM_FRACTION=0.35 timeout $L python3 $S golf --refs /tmp/fe /tmp/fc --out "$OUT" \
  --wait $((L - 20)) $SIZE "${opts[@]}" > "$OUT/golf.log" 2>&1
echo "golf_jax: rc $? at $((SECONDS - start)) s"
if [ -n "${VARIANT:-}" ] && [ $((L - (SECONDS - start))) -ge 100 ]; then
  vo=(); for o in $VARIANT; do vo+=(--golf-opt "$o"); done
  mkdir -p /tmp/variant
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 timeout $((L - (SECONDS - start))) python3 $S golf --refs /tmp/fe /tmp/fc \
    --out /tmp/variant --wait 5 --no-share $SIZE "${opts[@]}" "${vo[@]}" > "$OUT/golf_variant.log" 2>&1
  rc=$?; cp /tmp/variant/first_step.json "$OUT/first_step_variant.json" 2>/dev/null
  echo "variant ($VARIANT): rc $rc at $((SECONDS - start)) s"
fi
# the references finish their evaluations of golf.npz (or time out, if golf_jax failed)
for p in $pe $pc; do
  for _ in $(seq 60); do kill -0 $p 2>/dev/null || break; sleep 1; done
  kill $p 2>/dev/null; wait $p
done
echo "all done at $((SECONDS - start)) s"
grep -h -E "^=====|^batch-2|^golf_jax|^  golf_jax|^\| [a-z_.*]+ \| [-+]|^\| (tok_emb|bigram.embed|ve_shared.embed)[a-z.]* \| [0-9]|^the reference|^golf_jax forward: " "$OUT/golf.log" | cut -c1-220
grep -h -E "^reference|^  (own|golf_jax)" "$OUT/ref_eager.log" "$OUT/ref_compiled.log" | cut -c1-160
[ -f "$OUT/golf_variant.log" ] && grep -h -E "^golf_jax|^=====|^  golf_jax|^\| tok_emb" "$OUT/golf_variant.log" | cut -c1-160
