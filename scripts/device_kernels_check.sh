#!/usr/bin/env bash
# The Pallas kernels on the GPU (issue 17), one call: their GPU tests against
# XLA's compiled jnp path; the loss+grad micro-batch without them, with the
# default set (norm_rope,xsa) and with all three, back to back; a 40-step
# record-config train.py run as the default runs (launch to first step,
# recompilations, peak memory); the first step's gradient against float32 for
# each kernel set (scripts/residual_grad_probe.py); then fidelity runs of the
# default, two at a time (scripts/device_fidelity.sh), named by the arguments.
# Usage (device): OUT=/some/dir [FIDELITY_DEADLINE=200] bash scripts/device_kernels_check.sh N3 N4
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels_qk_norm_rope_test.py \
  tests/kernels_residual_norm_test.py tests/kernels_xsa_test.py 2>&1 | grep "passed\|failed\|assert\|XPASS" | tail -8
bench() { timeout 150 python3 -m golf_jax.tools.bench --config configs/record.py $D --no-jnp-mlp --sections grad \
  --repeats 20 "$@" 2>&1 | grep "micro-batch\|Error"; }
bench --config.fusion_impl=jnp --out "$OUT/jnp"
bench --out "$OUT/default"
bench --config.fusion_kernels=norm_rope,xsa,residual_norm --out "$OUT/all3"
timeout 150 python3 train.py --config configs/record.py $D --config.iterations=40 \
  --config.output_dir="$OUT/run" --no-quantize --no-progress 2>&1 | grep -v "train_loss" | tail -3
python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print({k: s[k] for k in s if k in ('launch_to_first_step_s','peak_memory_bytes','recompilations_after_first_step','step_avg_ms','steps_this_run','wall_s')})" "$OUT/run/summary.json"
rm -rf "$OUT/run/checkpoints" "$OUT/run/final_model"
timeout 150 python3 scripts/residual_grad_probe.py --config configs/record.py $D \
  --init .shared/fixtures/reference/record_init_seed314_bf16bits.npz 2>&1 | tee "$OUT/grad_probe.txt" | tail -40
specs=(); for name in "$@"; do specs+=("$name:"); done
[ ${#specs[@]} -gt 0 ] && OUT="$OUT/fidelity" DEADLINE=${FIDELITY_DEADLINE:-200} SLOTS=2 \
  bash "$(dirname "$0")/device_fidelity.sh" "${specs[@]}" 2>&1 | tail -24
