#!/usr/bin/env bash
# The Pallas kernels' GPU tests, then scripts/fusion_kernel_sweep.py (their
# rounding against XLA's jnp path, and the launch-parameter sweep), one GPU.
# Usage (device): OUT=/some/dir bash scripts/device_fusion_sweep.sh
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels_qk_norm_rope_test.py \
  tests/kernels_residual_norm_test.py tests/kernels_xsa_test.py tests/kernels_softcap_ce_test.py 2>&1 | grep -v "^E  *+\|^  " | tail -12
timeout 420 python3 scripts/fusion_kernel_sweep.py --out "$OUT" 2>&1 | grep "^rounding\|^sweep\|Error"
