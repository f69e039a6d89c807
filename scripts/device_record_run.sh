#!/usr/bin/env bash
# The record run on the GPUs of one machine (issue 7; on 4 GPUs while no 8-GPU kind is lent):
# `python train.py --config configs/record.py` with its 600 s training cap, then calibration,
# GPTQ, pruning, the artifact and both evaluations. A device call lasts at most 10 minutes, so
# the run spans two calls on the same warm machine: "start UNTIL" trains until UNTIL seconds
# after T0 (epoch seconds, default now), when SIGTERM makes it save a checkpoint of the step it
# is at; "resume" continues it from that checkpoint (the training time is in the checkpoint, so
# the cap still counts 600 s of training) and runs the stages after training. The run lives in
# runs/record_gpus (kept on the warm machine between calls); its logs and reports are bundled
# into $OUT/record_run.tar.gz. Usage (device):
#   OUT=... DATA=.shared/data T0=$(date +%s) bash scripts/device_record_run.sh start 575
#   OUT=... DATA=.shared/data bash scripts/device_record_run.sh resume
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
RUN=runs/record_gpus
case $1 in
  start)
    rm -rf "$RUN"
    left=$(( ${T0:-$(date +%s)} + $2 - $(date +%s) ))
    echo "training until SIGTERM in $left s"
    timeout -s TERM $left python train.py --config configs/record.py $D --config.output_dir=$RUN --no-progress \
      2>&1 | grep -vE "^step [0-9]+/[0-9]+ train_loss" | tail -12 ;;
  resume)
    python train.py --config configs/record.py $D --config.output_dir=$RUN --no-progress --resume 2>&1 \
      | grep -vE "^step [0-9]+/[0-9]+ train_loss" | tail -60
    ls -l $RUN $RUN/checkpoints
    tar czf "$OUT/record_run.tar.gz" --exclude=checkpoints --exclude=final_model --exclude='*.golf' -C runs record_gpus ;;
esac
