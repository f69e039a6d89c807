#!/usr/bin/env bash
# The Pallas kernels on the GPU (issue 17), one call: their rounding against
# XLA's jnp path (scripts/fusion_kernel_sweep.py), the loss+grad micro-batch
# with the kernels (model.fusion_impl=auto) and without (the default "jnp"), back to back,
# a 40-step record-config train.py run (launch to first step, recompilations,
# peak memory) with the kernels, then one fidelity run with them (scripts/device_fidelity.sh).
# (Run on 2026-12-01 when the kernels were the default, without the fusion_impl words.)
# Usage (device): OUT=/some/dir bash scripts/device_kernels_check.sh
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
timeout 150 python3 scripts/fusion_kernel_sweep.py --parts rounding --out "$OUT/rounding" 2>&1 | grep "^rounding\|Error"
bench() { timeout 200 python3 -m golf_jax.tools.bench --config configs/record.py $D --no-jnp-mlp "$@" 2>&1 \
  | grep "micro-batch\|Error"; }
bench --sections grad --repeats 20 --config.fusion_impl=auto --out "$OUT/fused"
bench --sections grad --repeats 20 --out "$OUT/jnp"
timeout 200 python3 train.py --config configs/record.py $D --config.iterations=40 --config.fusion_impl=auto \
  --config.output_dir="$OUT/run" --no-quantize --no-progress 2>&1 | grep -v "train_loss" | tail -4
python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print({k: s[k] for k in s if k in ('launch_to_first_step_s','peak_memory_bytes','recompilations_after_first_step','step_avg_ms','steps_this_run','wall_s')})" "$OUT/run/summary.json"
rm -rf "$OUT/run/checkpoints" "$OUT/run/final_model"
OUT="$OUT/fidelity" DEADLINE=${FIDELITY_DEADLINE:-200} bash "$(dirname "$0")/device_fidelity.sh" "K1:--config.fusion_impl=auto" 2>&1 | tail -12
