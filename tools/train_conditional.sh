#!/usr/bin/env bash
# Trains and measures the class-conditional HOLD Fashion-MNIST model, the shipped default
# (weights/README.md; docs/results.md, "Class-conditional model").
#
#   tools/train_conditional.sh [RUNS_DIR]        (default: runs/)
#
# Resumable: run it again after a kill and training continues bitwise where it stopped (batches,
# noise, label dropout and dropout masks are functions of the seed and the step); the sweep and
# the quality table keep every finished cell in their JSON. Stages (STAGES picks some):
#   train   HOLD order 3, the fashion-mnist U-Net, --conditional (label dropout 0.1), batch 256,
#           to COND_STEPS steps (the shipped base run: 5750);
#   finetune  2500 more steps from the base run's weights at label dropout 0.5 (--init-from, lr 2e-4),
#           so that the "no label" score, which label dropout 0.1 trains on a tenth of the data,
#           catches up -> runs/fmnist-cond-ft, the shipped model;
#   sweep   tools/guidance_sweep.py with the 20-call recipe (gddim, 19 steps, eta 0.5): class
#           agreement (the project's classifier) and FD for w in {0, 0.5, 1, 2, 4}, 100 samples
#           per class, seeds 0 1 2 -> docs/guidance_sweep.{json,png};
#   agree   the same at w = GUIDANCE with 100 Lie-Trotter steps (the CLI default sampler)
#           -> docs/guidance_lt100.json;
#   nolabel unconditional ("no label") FD/KD with 1000 samples x seeds 0 1 2 at 100 Lie-Trotter
#           calls and 10/20 gddim calls -> docs/quality_vs_nfe.json (the cache of the quality-vs-NFE
#           table, whose default model is the shipped one), next to the same cells of the previous
#           (unconditional) default model in docs/quality_vs_nfe_uncond.json. The whole table:
#           `nice -n 10 python tools/quality_vs_nfe.py` (hours; resumable).
# BACKEND/DEVICE/AMP choose the trainer (torch on the CPU was the faster trainer on the 2-core
# x86 machine; DEVICE=cuda AMP=bf16 on an NVIDIA GPU).
set -euo pipefail
RUNS=${1:-runs}
BACKEND=${BACKEND:-torch}
DEVICE=${DEVICE:-cpu}
AMP=${AMP:-none}
COND_STEPS=${COND_STEPS:-5750}
GUIDANCE=${GUIDANCE:-0.5}  # the shipped default (DEFAULT_GUIDANCE in hold_mlx/model.py)
STAGES=${STAGES:-"train finetune sweep agree nolabel"}
OUT="$RUNS/fmnist-cond"
FINETUNED="$RUNS/fmnist-cond-ft"
CKPT=${CKPT:-$FINETUNED}  # what the measuring stages read (weights/fashion-mnist-hold once shipped)
UNCOND=weights/fashion-mnist-hold-uncond
mkdir -p "$RUNS"

stage() { echo "[$(date -u +%FT%TZ)] $*"; "$@"; }
wants() { [[ " $STAGES " == *" $1 "* ]]; }

if wants train; then
  stage hold-mlx train --dataset fashion-mnist --net fashion-mnist --sde hold --conditional --label-dropout 0.1 \
      --batch-size 256 --lr 5e-4 --warmup 500 --ema-decay 0.999 --save-every 100 --seed 0 \
      --backend "$BACKEND" --device "$DEVICE" --amp "$AMP" --steps "$COND_STEPS" --out "$OUT"
fi
if wants finetune; then
  stage hold-mlx train --dataset fashion-mnist --net fashion-mnist --sde hold --conditional --label-dropout 0.5 \
      --batch-size 256 --lr 2e-4 --warmup 100 --ema-decay 0.999 --save-every 100 --seed 1 \
      --backend "$BACKEND" --device "$DEVICE" --amp "$AMP" --steps 2500 --init-from "$OUT" --out "$FINETUNED"
fi
if wants sweep; then
  stage python tools/guidance_sweep.py --checkpoint "$CKPT" --guidance 0 0.5 1 2 4 --n-per-class 100 \
      --sampler gddim --steps 19 --eta 0.5 --seeds 0 1 2 --json docs/guidance_sweep.json \
      --plot docs/guidance_sweep.png
fi
if wants agree; then
  stage python tools/guidance_sweep.py --checkpoint "$CKPT" --guidance "$GUIDANCE" --n-per-class 100 \
      --steps 100 --seeds 0 1 2 --no-unconditional --json docs/guidance_lt100.json
fi
if wants nolabel; then
  for cells in "lie-trotter 100" "gddim-2-eta0.5 10,20"; do
    set -- $cells
    stage python tools/quality_vs_nfe.py --checkpoint "$CKPT" --configs "$1" --nfe "$2" \
        --out "$RUNS/quality_vs_nfe_cond.md" --plot "$RUNS/quality_vs_nfe_cond.png"
    stage python tools/quality_vs_nfe.py --checkpoint "$UNCOND" --configs "$1" --nfe "$2" \
        --cache docs/quality_vs_nfe_uncond.json --out "$RUNS/quality_vs_nfe_uncond.md" \
        --plot "$RUNS/quality_vs_nfe_uncond.png"
  done
fi
echo "[$(date -u +%FT%TZ)] done"
