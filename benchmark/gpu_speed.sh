#!/usr/bin/env bash
# GPU speed, one short call on a lent device (the `device` tool; #20): our three scripts eager vs --compile on
# synthetic MuJoCo-sized data (17-dim observations, 6 action dims / 6 actions), then d3rlpy 2.8.1 with and without
# compile_graph=True on the same data when it is importable. Writes under ${OUT:-benchmark/results/gpu-speed}.
#   bash benchmark/gpu_speed.sh            (about 8 minutes on an H100; needs torch with CUDA)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=${OUT:-$ROOT/benchmark/results/gpu-speed}
PY=${PYTHON:-python}
mkdir -p "$DEST"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$DEST/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$DEST/gpu.txt"
# ours: eager vs --compile, 20x the CPU step counts (IQL 20k steps, Box CQL 2k, ...)
"$PY" "$ROOT/benchmark/compile_speed.py" --device cuda --gpu-scale 20 --out "$DEST" 2>&1 | tee "$DEST/ours.log"
# d3rlpy, the same data and settings, when installed (pip install d3rlpy==2.8.1)
if "$PY" -c "import d3rlpy" 2>/dev/null; then
  cd "$DEST"
  for algo in iql cql bcq; do
    for kind in box discrete; do
      steps=$([ "$algo" = cql ] && [ "$kind" = box ] && echo 2000 || echo 20000)
      for cg in "" "--compile-graph"; do
        "$PY" "$ROOT/benchmark/d3rlpy_run.py" --algo $algo --dataset "synthetic-$kind.npz" --device cuda:0 $cg \
          --total-steps $steps --eval-every $((steps / 2)) --eval-episodes 0 \
          --exp-name "d3rlpy_${algo}-${kind}${cg:+-graph}" 2>&1 | tail -2 | tee -a d3rlpy.log || true
      done
    done
  done
else
  echo "d3rlpy not importable: pip install d3rlpy==2.8.1 for the side-by-side rows" | tee -a "$DEST/ours.log"
fi
