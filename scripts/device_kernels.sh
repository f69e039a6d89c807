#!/usr/bin/env bash
# The fused MLP kernels on one GPU: their GPU tests, then the bench's kernel,
# evaluation, gradient and profile sections (eval and grad also with the jnp
# MLP, for the comparison). jax-triton travels as a wheel in .whl (see
# ../shared/notes/reference_numbers.md).
# Usage (device): [SWEEP=1] OUT=/some/dir DATA=.shared/data bash scripts/device_kernels.sh [sections] [pytest -k expr]
set -uo pipefail
SECTIONS=${1:-mlp,eval,grad,profile}
source "$(dirname "$0")/device_env.sh"
if [ -n "${SWEEP:-}" ]; then  # the block-size sweep of the kernels first
  timeout 300 python3 scripts/mlp_kernel_sweep.py --out "$OUT/sweep" 2>&1 | grep -v "^WARNING\|^I0000" | tail -60
fi
if [ -n "${2:-}" ]; then
  timeout 300 python3 -m pytest -q -x -p no:cacheprovider -rs tests/kernels_mlp_test.py -k "$2" 2>&1 | tail -25
fi
timeout 420 python3 -m golf_jax.tools.bench --config configs/record.py --sections "$SECTIONS" $D --out "$OUT/bench" 2>&1 \
  | grep -v "^WARNING\|^I0000" | tail -60
rm -rf "$OUT"/bench/traces/*/plugins 2>/dev/null; true
