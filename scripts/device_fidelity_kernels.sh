#!/usr/bin/env bash
# The residual-norm kernel's GPU test (its rounding against XLA's), then
# fidelity runs with the Pallas kernels on (model.fusion_impl=auto), two at a time
# (run on 2026-12-01 when they were the default). FUSION_KERNELS=... picks some.
# Usage (device): OUT=/some/dir bash scripts/device_fidelity_kernels.sh NAME...
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
timeout 60 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels_residual_norm_test.py 2>&1 \
  | grep "passed\|failed\|assert" | tail -4
specs=(); for name in "$@"; do
  specs+=("$name:--config.fusion_impl=auto --config.fusion_kernels=${FUSION_KERNELS:-norm_rope,xsa,residual_norm}")
done
OUT="$OUT/fidelity" DEADLINE=${DEADLINE:-280} SLOTS=2 bash "$(dirname "$0")/device_fidelity.sh" "${specs[@]}" 2>&1 | tail -40
