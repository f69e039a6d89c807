#!/usr/bin/env bash
# Scale-out runs recorded in docs/performance.md (issue 6): the record config for ITER steps
# (full global batch of 786,432 tokens, 8 // n micro-steps per device, no wall-clock cap) on
# n = 1, 2, 4 GPUs of one machine, a second seed for the noise, the 4-GPU run as two processes
# of two GPUs (the multi-host path through jax.distributed on one host), and Parallel Muon's
# overlap probe under XLA's default schedule and with the latency-hiding scheduler. PARTS
# picks what runs, so the whole fits in device calls of under 10 minutes. Usage (device):
#   OUT=/some/dir DATA=.shared/data bash scripts/device_scaling.sh 200 "g4 g4_seed2 g2 g1"
#   OUT=/some/dir DATA=.shared/data bash scripts/device_scaling.sh 200 "g4_2proc overlap overlap_lhs"
set -uo pipefail
ITER=${1:-200}
PARTS=${2:-"g4 g4_seed2 g2 g1"}
source "$(dirname "$0")/device_env.sh"
R="--config.iterations=$ITER --config.max_wallclock_seconds=0 --config.warmdown_iters=50 --config.val_loss_every=50 \
   --config.warmup_steps=2 --config.train_log_every=1 --config.checkpoint_every=0 --no-progress --no-quantize"
KEEP="devices:|warmup|val_loss|steps in"
run() {  # name devices seed
  timeout 300 python train.py --config configs/record.py $D $R --config.num_devices=$2 --config.seed=$3 \
    --config.output_dir="$OUT/$1" 2>&1 | grep -E "$KEEP" | tail -8
  rm -rf "$OUT/$1/final_model" "$OUT/$1/checkpoints"
}
two_processes() {  # name: 4 GPUs as two processes of two, coordinated through jax.distributed on localhost
  for i in 0 1; do
    timeout 300 python train.py --config configs/record.py $D $R --config.seed=314 --config.output_dir="$OUT/$1" \
      --coordinator-address localhost:12355 --num-processes 2 --process-id $i --local-device-ids $((2*i)),$((2*i+1)) \
      > "$OUT/$1.p$i.log" 2>&1 &
  done
  wait
  grep -E "$KEEP" "$OUT/$1.p0.log" | tail -8
  echo "process 1 printed $(wc -l < "$OUT/$1.p1.log") lines; its last:"; tail -2 "$OUT/$1.p1.log"
  rm -rf "$OUT/$1/final_model" "$OUT/$1/checkpoints"
}
for part in $PARTS; do
  echo "== $part"
  case $part in
    g4) run g4 4 314 ;;
    g4_seed2) run g4_seed2 4 315 ;;
    g2) run g2 2 314 ;;
    g1) run g1 1 314 ;;
    g4_2proc) two_processes g4_2proc ;;
    overlap) timeout 200 python scripts/muon_overlap.py $D --out "$OUT/overlap" 2>&1 | tail -40
             rm -rf "$OUT/overlap/trace" ;;
    overlap_lhs) XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true" timeout 200 \
                   python scripts/muon_overlap.py $D --out "$OUT/overlap_lhs" 2>&1 | tail -40
                 rm -rf "$OUT/overlap_lhs/trace" ;;
  esac
done
# At most 8 files come back from a device call: everything small in one archive.
tar czf "$OUT/scaling.tar.gz" --exclude=final_model --exclude=checkpoints --exclude=trace -C "$OUT" \
  $(cd "$OUT" && ls -d g* overlap* 2>/dev/null) && find "$OUT" -mindepth 1 -maxdepth 1 ! -name scaling.tar.gz -exec rm -rf {} +
