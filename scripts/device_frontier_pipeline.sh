#!/usr/bin/env bash
# The 1.0611 record's whole pipeline at record size on the GPU (issue 20), in two calls, each
# under the device tool's 600 s (one call did not fit: 540 s ran out in the reload after the
# 168 s lrzip compression, 2026-12-01):
#   PART=train  a capped train.py run of configs/frontier.py on the tiled CaseOps data
#               (scripts/frontier_throughput_data.py, FineWeb-like documents in train and val:
#               timing, not learning), then every stage after training up to the int6 round
#               trip (train-shard calibration, Hessians, GPTQ with SDClip + LQER, the per-group
#               artifact, its reload), each timed; the artifact comes back in $OUT.
#   PART=ttt    the phased LoRA TTT's steps timed on one GPU and projected to the record's
#               validation set on GPUS GPUs (scripts/ttt_step_bench.py, scripts/ttt_projection.py;
#               RELOAD_S: the artifact's reload time, added), then the whole TTT on the artifact
#               (carried back as ARTIFACT, e.g. under the git-excluded .artifacts/), on one GPU.
# Usage (device): OUT=/some/dir PART=train [CAP=60] [VAL_TOKENS=1000000] bash scripts/device_frontier_pipeline.sh [overrides]
#                 OUT=/some/dir PART=ttt ARTIFACT=.artifacts/final_model.int6.golf VAL_TOKENS=300000 MEAN_DOC_TOKENS=957 \
#                   [GPUS=8] [RELOAD_S=33.1] bash scripts/device_frontier_pipeline.sh
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
export GOLF_JAX_REFERENCE=.shared/reference
python3 scripts/frontier_throughput_data.py --out /tmp/fdata --tokens 12000000 --val-tokens ${VAL_TOKENS:-1000000} \
  --mean-doc-tokens ${MEAN_DOC_TOKENS:-700}
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
  # the device tool returns 8 files at most: the artifact, and the run's logs as one archive
  rm -rf "$OUT/pipeline/checkpoints" "$OUT/pipeline/final_model"
  mv "$OUT"/pipeline/*.golf "$OUT"/; tar -czf "$OUT/pipeline.tgz" -C "$OUT" pipeline && rm -rf "$OUT/pipeline"
  ;;
ttt)
  # The chunk and global steps timed one program at a time (one GPU's share of GPUS: 64 / GPUS
  # rows a step), their sum over the record's schedule (scripts/ttt_projection.py), then the
  # whole phased TTT from the artifact on a short validation text (VAL_TOKENS), each stage timed.
  # (2026-12-02: two whole runs on 2 M validation tokens did not finish in 270 s each. One rank of
  # the document-masked evaluation before it: VAL_TOKENS holds fewer than 8 ranks' batches.)
  # BENCH: the bench's arguments (e.g. "--rows 8 64 --widths 2048 --widths-other-rows 2048 1024 512 --no-global")
  timeout 300 python3 scripts/ttt_step_bench.py --out "$OUT/ttt_steps.json" \
    ${BENCH:---rows $((64 / ${GPUS:-8})) 64 --profile /tmp/ttt_profile} --parallel-widths 2>&1 | grep -v "^ *$" \
    | cut -c1-400 | tail -8
  for ranks in 1 ${GPUS:-8}; do  # one rank (each batch split over the GPUs); one rank a GPU (its 64-row steps)
    python3 scripts/ttt_projection.py "$OUT/ttt_steps.json" --gpus ${GPUS:-8} --ranks $ranks --reload-s ${RELOAD_S:-0}
  done 2>&1 | tee "$OUT/ttt_projection.txt"
  timeout ${RUN_TIMEOUT:-240} python3 -m golf_jax.ttt --artifact "$ARTIFACT" $DATA_ARGS --config.ttt.mode=lora_phased \
    --config.run.num_devices=1 --config.eval.document_eval_ranks=1 --out "$OUT/ttt.json" --no-progress "$@" 2>&1 | tail -3
  ;;
*) echo "PART must be train or ttt" >&2; exit 2 ;;
esac
