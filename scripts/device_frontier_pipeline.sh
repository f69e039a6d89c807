#!/usr/bin/env bash
# The 1.0611 record's whole pipeline at record size on the GPU (issue 20), in two calls, each
# under the device tool's 600 s (one call did not fit: 540 s ran out in the reload after the
# 168 s lrzip compression, 2026-12-01):
#   PART=train  a capped train.py run of configs/frontier.py on the tiled CaseOps data
#               (scripts/frontier_throughput_data.py, FineWeb-like documents in train and val:
#               timing, not learning), then every stage after training up to the int6 round
#               trip (train-shard calibration, Hessians, GPTQ with SDClip + LQER, the per-group
#               artifact, its reload), each timed; the artifact is left in $OUT/pipeline.
#   PART=ttt    the phased LoRA TTT on that artifact (carried back as ARTIFACT, e.g. under the
#               git-excluded .artifacts/), on DEVICES GPUs (0: all), its time and throughput,
#               projected to the record's 47,851,520 validation tokens on 8 GPUs.
# Usage (device): OUT=/some/dir PART=train [CAP=60] [VAL_TOKENS=1000000] bash scripts/device_frontier_pipeline.sh [overrides]
#                 OUT=/some/dir PART=ttt ARTIFACT=.artifacts/final_model.int6.golf [DEVICES=0] bash scripts/device_frontier_pipeline.sh
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
export GOLF_JAX_REFERENCE=.shared/reference
python3 scripts/frontier_throughput_data.py --out /tmp/fdata --tokens 12000000 --val-tokens ${VAL_TOKENS:-1000000}
DATA_ARGS="--config.data.data_dir=/tmp/fdata --config.data.tokenizer_path=/tmp/fdata/tokenizer.model"
case "${PART:-train}" in
train)
  timeout 570 python3 train.py --config configs/frontier.py $DATA_ARGS --config.max_wallclock_seconds=${CAP:-60} \
    --config.ttt.enabled=false --config.train_log_every=50 --config.output_dir="$OUT/pipeline" --no-progress "$@" 2>&1 \
    | grep -v "^step [0-9]*/\|^[a-z_/]* *[0-9]*x\|^blocks (module)\|^smear" | tail -40
  python3 - "$OUT/pipeline" <<'PY'
import json, sys
q = json.load(open(f"{sys.argv[1]}/quantize.json"))
print("stage times (s):", {k: round(v, 1) for k, v in q["times_s"].items()})
print("compilations per stage:", q.get("compilations"))
print("artifact:", {k: q["artifact"][k] for k in q["artifact"] if k != "path"})
PY
  rm -rf "$OUT/pipeline/checkpoints" "$OUT/pipeline/final_model"
  ;;
ttt)
  start=$(date +%s.%N)
  timeout 580 python3 -m golf_jax.ttt --artifact "$ARTIFACT" $DATA_ARGS --config.ttt.mode=lora_phased \
    --config.run.num_devices=${DEVICES:-0} --out "$OUT/ttt.json" --no-progress "$@" 2>&1 | tail -20
  python3 - "$OUT/ttt.json" "$start" "${DEVICES:-0}" <<'PY'
import json, sys, time
import jax
t = json.load(open(sys.argv[1]))
wall, n = time.time() - float(sys.argv[2]), int(sys.argv[3]) or jax.device_count()
tok_s = t["tokens"] / t["seconds"]
print("ttt:", t)
# A batch's rows split over the GPUs with no collective (golf_jax/ttt_lora.py): 8 GPUs take
# 8 / n of this time for the chunk steps; the global phases (replicated) do not shrink.
print(f"ttt: {t['tokens']:,} tokens, {t['documents']:,} documents in {t['seconds']:.1f} s on {n} GPU(s) "
      f"(compilation included; {wall:.1f} s from launch, the artifact's reload included): {tok_s:,.0f} tokens/s; "
      f"47,851,520 val tokens on 8 GPUs, rows split: {47851520 / tok_s * n / 8:.0f} s")
PY
  ;;
*) echo "PART must be train or ttt" >&2; exit 2 ;;
esac
