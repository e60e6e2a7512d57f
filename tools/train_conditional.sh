#!/usr/bin/env bash
# Trains and measures the class-conditional HOLD Fashion-MNIST model (docs/results.md, "Class-conditional").
#
#   tools/train_conditional.sh [RUNS_DIR]        (default: runs/)
#
# Resumable: run it again after a kill and training continues bitwise where it stopped (batches,
# noise, label dropout and dropout masks are functions of the seed and the step). Stages:
#   1. train   HOLD order 3, the same network, batch, optimiser and seed as the shipped unconditional
#              model (weights/README.md), with --conditional (label dropout 0.1), to COND_STEPS steps;
#   2. sweep   tools/guidance_sweep.py: class agreement (the project's classifier) and FD for
#              w in {0, 0.5, 1, 2, 4}, 100 samples per class, 3 seeds -> docs/guidance_sweep.{json,png};
#   3. eval    unconditional ("no label") FD/KD of the new model and of today's shipped model, 1000
#              samples at 100 steps, seeds 0 1 2 -> RUNS/eval-*.json.
# BACKEND/DEVICE choose the trainer (torch on one CPU thread was the fastest on the 2-core machine
# the shipped model was trained on; DEVICE=cuda AMP=bf16 on an NVIDIA GPU). STAGES picks stages.
set -euo pipefail
RUNS=${1:-runs}
BACKEND=${BACKEND:-torch}
DEVICE=${DEVICE:-cpu}
AMP=${AMP:-none}
COND_STEPS=${COND_STEPS:-30000}
STAGES=${STAGES:-"train sweep eval"}
OUT="$RUNS/fmnist-hold-cond"
mkdir -p "$RUNS"

stage() { echo "[$(date -u +%FT%TZ)] $*"; "$@"; }
wants() { [[ " $STAGES " == *" $1 "* ]]; }

if wants train; then
  stage hold-mlx train --dataset fashion-mnist --net fashion-mnist --sde hold --conditional --label-dropout 0.1 \
      --batch-size 64 --lr 5e-4 --warmup 500 --ema-decay 0.999 --save-every 250 --sample-every 2000 --seed 0 \
      --backend "$BACKEND" --device "$DEVICE" --amp "$AMP" --steps "$COND_STEPS" --out "$OUT"
fi
if wants sweep; then
  stage python tools/guidance_sweep.py --checkpoint "$OUT" --guidance 0 0.5 1 2 4 --n-per-class 100 \
      --steps 100 --seeds 0 1 2 --json docs/guidance_sweep.json --plot docs/guidance_sweep.png
fi
if wants eval; then
  for seed in 0 1 2; do
    stage hold-mlx eval --checkpoint "$OUT" --quality --n-samples 1000 --steps 100 --seed "$seed" \
        --out "$RUNS/eval-cond-nolabel-seed$seed.json"
    stage hold-mlx eval --quality --n-samples 1000 --steps 100 --seed "$seed" \
        --out "$RUNS/eval-shipped-seed$seed.json"
  done
fi
echo "[$(date -u +%FT%TZ)] done"
