#!/usr/bin/env bash
# The 1.0611 record's whole pipeline at record size on one GPU (issue 20), one call: a capped
# train.py run of configs/frontier.py on the tiled CaseOps data (scripts/frontier_throughput_data.py,
# FineWeb-like documents in train and val: timing, not learning), then every stage after
# training (train-shard calibration, Hessians, GPTQ with SDClip + LQER, the artifact, the int6
# round trip, the phased LoRA TTT), each timed; prints the stage times and the TTT's throughput.
# Usage (device): OUT=/some/dir [CAP=60] [VAL_TOKENS=1000000] bash scripts/device_frontier_pipeline.sh [overrides]
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
export GOLF_JAX_REFERENCE=.shared/reference
python3 scripts/frontier_throughput_data.py --out /tmp/fdata --tokens 12000000 --val-tokens ${VAL_TOKENS:-1000000}
timeout 540 python3 train.py --config configs/frontier.py --config.data.data_dir=/tmp/fdata \
  --config.data.tokenizer_path=/tmp/fdata/tokenizer.model --config.max_wallclock_seconds=${CAP:-60} \
  --config.train_log_every=50 --config.output_dir="$OUT/pipeline" --no-progress "$@" 2>&1 \
  | grep -v "^step [0-9]*/\|^[a-z_/]* *[0-9]*x\|^blocks (module)\|^smear" | tail -40
python3 - "$OUT/pipeline" <<'PY'
import json, sys
q = json.load(open(f"{sys.argv[1]}/quantize.json"))
print("stage times (s):", {k: round(v, 1) for k, v in q["times_s"].items()})
print("compilations per stage:", q.get("compilations"))
t = q.get("ttt")
if t:
    print("ttt:", {k: t[k] for k in t})
    tok_s = t["tokens"] / q["times_s"]["ttt"]
    print(f"ttt: {t['tokens']:,} tokens, {t['documents']:,} documents in {q['times_s']['ttt']:.1f} s (compilation "
          f"included): {tok_s:,.0f} tokens/s; 47,851,520 val tokens on 8 such GPUs: {47851520 / tok_s / 8:.0f} s")
PY
rm -rf "$OUT/pipeline/checkpoints" "$OUT/pipeline/final_model"
