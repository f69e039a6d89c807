#!/usr/bin/env bash
# Issue 17's measurements in one device call (one GPU): the loss+grad
# micro-batch (48 x 2048) with its profile, the attention kernels side by
# side, then the micro-batch under each XLA flag variant (one process each:
# XLA_FLAGS is read at start-up), the default last again for drift.
# Usage (device): OUT=/some/dir bash scripts/device_throughput.sh ["flags1" "flags2" ...]
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
bench() { timeout 300 python3 -m golf_jax.tools.bench --config configs/record.py $D "$@" 2>&1 \
  | grep -v "^WARNING\|^I0000\|^W0000" | tail -60; }
mgpu=$(python3 -c "import jax.experimental.pallas.ops.gpu.attention_mgpu as m; print(m.__file__)")
grep -n "not supported in the backwards" "$mgpu" || echo "the Mosaic GPU attention has a causal backward"
bench --sections grad,attention,profile --out "$OUT/base"
for flags in "$@"; do
  echo "=== XLA_FLAGS=$flags"
  XLA_FLAGS="$flags" bench --sections grad --no-jnp-mlp --repeats 20 --out "$OUT/flags_$(echo "$flags" | tr -c 'a-z0-9' _ | cut -c1-60)"
done
echo "=== default again"
bench --sections grad --no-jnp-mlp --repeats 20 --out "$OUT/base_again"
rm -rf "$OUT"/*/traces/*/plugins
