#!/usr/bin/env bash
# Trains the Fashion-MNIST models behind weights/ and the HOLD vs CLD vs VP comparison.
#
#   tools/train_weights.sh [RUNS_DIR]        (default: runs/)
#
# Every run is resumable: run the script again after a kill and each stage continues where it
# stopped. Stages: HOLD, CLD and VP side by side with the same network, batch and step budget (COMPARE_STEPS);
# a copy of the HOLD run at that budget is kept for the comparison; then HOLD continues to
# SHIP_STEPS for the shipped model. BACKEND/DEVICE choose the trainer (torch on CPU was the fastest
# on the 2-core machines this was made on; use DEVICE=cuda on a GPU).
set -euo pipefail
RUNS=${1:-runs}
BACKEND=${BACKEND:-torch}
DEVICE=${DEVICE:-cpu}
COMPARE_STEPS=${COMPARE_STEPS:-4000}
SHIP_STEPS=${SHIP_STEPS:-6000}
COMPARE_THREADS=${COMPARE_THREADS:-1}
common=(--dataset fashion-mnist --net fashion-mnist --batch-size 64 --lr 5e-4 --warmup 500
        --ema-decay 0.999 --save-every 250 --sample-every 2000 --seed 0 --backend "$BACKEND" --device "$DEVICE")

stage() { echo "[$(date -u +%FT%TZ)] $*"; "$@"; }
# The three comparison runs go side by side, one CPU thread each (on a shared 2-core machine this
# beat one 2-thread run after another: torch's OpenMP threads spin when the cores are oversubscribed).
pids=()
for sde in hold cld vp; do
  OMP_NUM_THREADS=$COMPARE_THREADS stage hold-mlx train "${common[@]}" --sde "$sde" --steps "$COMPARE_STEPS" \
      --out "$RUNS/fmnist-$sde" > "$RUNS/fmnist-$sde.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
if [ ! -d "$RUNS/fmnist-hold-$COMPARE_STEPS" ]; then
  cp -r "$RUNS/fmnist-hold" "$RUNS/fmnist-hold-$COMPARE_STEPS.tmp"
  mv "$RUNS/fmnist-hold-$COMPARE_STEPS.tmp" "$RUNS/fmnist-hold-$COMPARE_STEPS"
fi
stage hold-mlx train --out "$RUNS/fmnist-hold" --steps "$SHIP_STEPS"
echo "[$(date -u +%FT%TZ)] done"
