#!/usr/bin/env bash
# The Pallas kernels' GPU tests (each against XLA's compiled jnp path), then
# fidelity runs with kernels on (model.fusion_impl=auto), two at a time.
# A spec is NAME or NAME:kernels (model.fusion_kernels, default all three).
# Run on 2026-12-01 as `DEADLINE=275 ... K2 K3 K4 K5` when the kernels were the default.
# Usage (device): OUT=/some/dir [DEADLINE=280] bash scripts/device_fidelity_kernels.sh K1 N1:norm_rope,xsa ...
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels_qk_norm_rope_test.py \
  tests/kernels_residual_norm_test.py tests/kernels_xsa_test.py 2>&1 | grep "passed\|failed\|assert\|XPASS" | tail -8
specs=(); for spec in "$@"; do
  kernels=${spec#*:}; [ "$kernels" = "$spec" ] && kernels=norm_rope,xsa,residual_norm
  specs+=("${spec%%:*}:--config.fusion_impl=auto --config.fusion_kernels=$kernels")
done
OUT="$OUT/fidelity" DEADLINE=${DEADLINE:-280} SLOTS=2 bash "$(dirname "$0")/device_fidelity.sh" "${specs[@]}" 2>&1 | tail -40
