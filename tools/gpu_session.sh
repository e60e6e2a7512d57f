#!/usr/bin/env bash
# One prepared session on a lent CUDA machine (run from the repo root; results go to $OUT):
# the CUDA tests, tools/bench_cuda.py (docs/torch.md's CUDA section), a DDP run through torchrun,
# a smoke test of hold_mlx.load(..., "torch", device="cuda"), then the class-conditional
# Fashion-MNIST HOLD model trained in bf16 until the time budget runs out (SIGTERM: the trainer
# saves and stops; the run resumes anywhere with the same command).
#
#   OUT=/tmp/out BUDGET_S=400 tools/gpu_session.sh            # on the GPU machine
#   OUT=/tmp/out DEVICE=cpu BUDGET_S=120 AMP=none tools/gpu_session.sh   # a dry run on the CPU
#
# Needs: .whl/ with the mlx wheels for the machine's Python (carried), .gpudata/ with the
# Fashion-MNIST IDX files (carried; /usr/share/datasets/fashion-mnist elsewhere).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT}
DEVICE=${DEVICE:-cuda}
AMP=${AMP:-bf16}
BUDGET_S=${BUDGET_S:-400}
DATA=${DATA:-.gpudata}
START=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
log=$OUT/gpu_session.log
say() { echo "[$(date -u +%T) +$(( $(date +%s) - START ))s] $*" | tee -a "$log"; }

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
mkdir -p /tmp/hold_pp && ln -sfn "$PWD/export" /tmp/hold_pp/hold_export
export PYTHONPATH=$PWD:/tmp/hold_pp${PYTHONPATH:+:$PYTHONPATH}
HOLD="python3 -m hold_mlx.cli"
say "start: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo no nvidia-smi)"
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$log"

say "1. CUDA tests"
timeout 90 python3 -m pytest -q -p no:cacheprovider -m "slow or not slow" -k cuda \
  tests/test_torch_train.py tests/test_torch_bench.py tests/test_cli.py 2>&1 | tail -15 | tee -a "$log"

say "2. Model API smoke test on $DEVICE"
timeout 60 python3 - "$DEVICE" <<'PY' 2>&1 | tail -8 | tee -a "$log"
import sys, numpy as np, torch, hold_mlx
from hold_mlx.likelihood import score_probe
dev = sys.argv[1]
model = hold_mlx.load(None, "torch", device=dev)
cpu = hold_mlx.load(None, "torch", device="cpu")
a = model.sample(8, steps=10, seed=0).x
b = cpu.sample(8, steps=10, seed=0).x
print(f"shipped model, 8 samples at 10 steps: {dev} vs cpu max |diff| = {np.abs(a - b).max():.2e} (bound 1e-3)")
u = model.backend.asarray(np.random.default_rng(0).standard_normal((4, 28, 28, 3)).astype(np.float32))
t = model.backend.asarray(np.full(4, 0.5))
probe = score_probe(model.score, model.backend, 3)
print("score_probe on", dev, "ran:", type(probe).__name__)
PY

say "3. bench_cuda (fashion-mnist preset; fills docs/torch.md)"
timeout $(( $(left) > 200 ? 100 : 40 )) python3 tools/bench_cuda.py --device "$DEVICE" --presets fashion-mnist \
  $( [ "$DEVICE" = cpu ] && echo --quick ) 2>&1 | tail -30 | tee -a "$log"
cp docs/torch.md "$OUT/torch.md" 2>/dev/null

say "4. DDP through torchrun (one process on the one GPU)"
timeout 60 torchrun --standalone --nproc_per_node 1 -m hold_mlx.cli train --backend torch --device "$DEVICE" \
  --dataset 8gaussians --steps 60 --save-every 30 --out /tmp/ddp_run 2>&1 | tail -4 | tee -a "$log"

TRAIN_S=$(( $(left) - 25 ))
say "5. class-conditional HOLD on Fashion-MNIST, $DEVICE, amp $AMP, for ${TRAIN_S}s"
if [ "$TRAIN_S" -gt 20 ]; then
  timeout -s TERM -k 20 "$TRAIN_S" $HOLD train --dataset fashion-mnist --data-dir "$DATA" --conditional \
    --sde hold --net fashion-mnist --batch-size 256 --lr 5e-4 --warmup 500 --ema-decay 0.9995 \
    --save-every 500 --sample-every 0 --seed 0 --steps 200000 --backend torch --device "$DEVICE" \
    --amp "$AMP" --channels-last --no-compile --out runs/fmnist-cond 2>&1 | tr '\r' '\n' | grep -v "^ *$" | tail -6 | tee -a "$log"
fi
if [ -f runs/fmnist-cond/model.safetensors ]; then
  cp runs/fmnist-cond/model.safetensors runs/fmnist-cond/log.jsonl "$OUT/"
  split -b 15M runs/fmnist-cond/train_state.safetensors "$OUT/train_state.part."
fi
say "done"
