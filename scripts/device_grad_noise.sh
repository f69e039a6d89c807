#!/usr/bin/env bash
# Whose loss+grad varies more from process to process on this GPU, golf_jax's or
# the reference's? scripts/grad_noise_probe.py snap twice per implementation, each
# in its own process, REPEAT calls in each; the reference on the first GPU and
# golf_jax on the last, side by side; then the table. Output: $OUT/grad_noise.txt.
# Needs .shared and .whl carried. Usage (device): OUT=... [GOLF_TREE=.head] bash scripts/device_grad_noise.sh
set -uo pipefail
start=$SECONDS
source "$(dirname "$0")/device_env.sh" > /dev/null
export GOLF_JAX_SHARED=.shared
last=$(($(nvidia-smi -L | wc -l) - 1))
log=$OUT/grad_noise.txt
root=$PWD
snap() {  # impl gpu i: golf_jax from GOLF_TREE (default: this tree), as scripts/fidelity_curve.py train
  ( cd "$([ "$1" = golf ] && echo "${GOLF_TREE:-.}" || echo .)" && GOLF_JAX_SHARED=$root/.shared \
    CUDA_VISIBLE_DEVICES=$2 timeout "${SNAP_LIMIT:-200}" python3 "$root/scripts/grad_noise_probe.py" snap "$1" \
    --out "/tmp/grad_$1$3.npz" --repeat "${REPEAT:-3}" 2>&1 | grep -v "^WARNING\|^I0000\|^W0000" | tail -2 )
}
( snap ref 0 1; snap ref 0 2 ) >> "$log" &
a=$!
( snap golf "$last" 1; snap golf "$last" 2 ) >> "$log" &
b=$!
wait $a $b
JAX_PLATFORMS=cpu python3 scripts/grad_noise_probe.py compare --golf /tmp/grad_golf1.npz /tmp/grad_golf2.npz \
  --ref /tmp/grad_ref1.npz /tmp/grad_ref2.npz >> "$log" 2>&1
echo "device_grad_noise.sh: $((SECONDS - start)) s" >> "$log"
cat "$log"
