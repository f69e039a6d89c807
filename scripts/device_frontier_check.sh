#!/usr/bin/env bash
# The 1.0611 record's training path on one GPU (issue 19), one call: the packed cuDNN
# attention's GPU tests (tests/attention_test.py -m gpu) and its bench against dense masks
# (scripts/packed_attention_bench.py); then a capped train.py run of configs/frontier.py on
# the tiled CaseOps data (scripts/frontier_throughput_data.py: throughput, not learning), its
# step time before and after the layer loop, peak memory and recompilations; then, with
# PROBE=1, the residual kernel's gradient probe (issue 17).
# Usage (device): OUT=/some/dir [CAP=150] [ATTENTION=0] [PROBE=1] [NAME=frontier] [EXTRA="--config.x=y ..."] \
#   bash scripts/device_frontier_check.sh
# e.g. the slot layouts against each other, back to back (data.segments_per_fold_fast; "8,16" in configs/frontier.py):
#   OUT=$OUT CAP=120 ATTENTION=0 bash scripts/device_frontier_check.sh; \
#   OUT=$OUT CAP=120 ATTENTION=0 NAME=fast16 EXTRA="--config.data.segments_per_fold_fast=16" bash scripts/device_frontier_check.sh
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
export GOLF_JAX_REFERENCE=.shared/reference
[ "${ATTENTION:-1}" = 1 ] && timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/attention_test.py 2>&1 | grep "passed\|failed\|Error\|assert" | tail -12
[ "${ATTENTION:-1}" = 1 ] && timeout 150 python3 scripts/packed_attention_bench.py --out "$OUT/packed" 2>&1 | tail -30
# 600,000 validation tokens: each of the 8 document-eval ranks needs a whole batch (32 x 2,048)
python3 scripts/frontier_throughput_data.py --out /tmp/fdata --tokens 12000000 --val-tokens 600000
# the launch (~50 s) and, after the cap, two evaluations that compile (~30 s each alone; in train.py
# 70-90 s for the first, 2026-12-03) and the final checkpoint's save
timeout $(( ${CAP:-150} + 300 )) python3 train.py --config configs/frontier.py --config.data.data_dir=/tmp/fdata \
  --config.data.tokenizer_path=/tmp/fdata/tokenizer.model --config.max_wallclock_seconds=${CAP:-150} \
  --config.train_log_every=10 --config.output_dir="$OUT/${NAME:-frontier}" --no-quantize --no-progress ${EXTRA:-} 2>&1 \
  | grep -v "^step [0-9]*/" | tail -25
python3 - "$OUT/${NAME:-frontier}" <<'PY'
import json, re, sys
d = sys.argv[1]
try:  # written at the run's end: absent when it stopped before (its train.jsonl still tells the steps)
    s = json.load(open(f"{d}/summary.json"))
except FileNotFoundError:
    s = {}
    print("no summary.json: the run stopped before its end")
print({k: s[k] for k in s if k in ("launch_to_first_step_s", "peak_memory_bytes", "recompilations_after_first_step",
                                   "step_avg_ms", "tokens_per_s", "layer_loop_on_at_step", "wall_s",
                                   "packed_steps_by_slots")})
rows = [json.loads(l) for l in open(f"{d}/train.jsonl")]
print("validations (step, eval_s):", [(r["step"], round(r.get("eval_s", -1), 1)) for r in rows if r.get("kind") == "val"])
pts = [(r["step"], r["training_s"]) for r in rows if r.get("kind") == "train" and r["step"] >= 10]
logged = re.search(r"layer loop on at step (\d+)", open(f"{d}/train.log").read())
on = s.get("layer_loop_on_at_step") or (int(logged.group(1)) if logged else 10 ** 9)
for name, sel in (("before the loop", [p for p in pts if p[0] < on]), ("after the loop", [p for p in pts if p[0] > on + 10])):
    if len(sel) > 1:
        ms = 1000 * (sel[-1][1] - sel[0][1]) / (sel[-1][0] - sel[0][0])
        print(f"{name}: steps {sel[0][0]}-{sel[-1][0]}: {ms:.1f} ms/step, {786432 / ms / 1e3:.3f} M tokens/s, "
              f"{ms / 8:.1f} ms per 98,304-token micro-batch")
PY
rm -rf "$OUT/${NAME:-frontier}/checkpoints" "$OUT/${NAME:-frontier}/final_model"
[ "${PROBE:-0}" = 1 ] && timeout 150 python3 scripts/residual_grad_probe.py --config configs/record.py $D \
  --init .shared/fixtures/reference/record_init_seed314_bf16bits.npz 2>&1 | tee "$OUT/grad_probe.txt" | tail -40
