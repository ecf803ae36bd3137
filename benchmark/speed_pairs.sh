#!/usr/bin/env bash
# Steps/second of ours against d3rlpy, measured in pairs: each algorithm runs beside its d3rlpy twin, one torch
# thread each, nothing else on the machine, so both see the same load. No evaluation; the second SPS window
# (after warm-up) is the figure. Usage: bash benchmark/speed_pairs.sh [OUT_DIR]   (about 6 minutes on 2 cores)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$ROOT/benchmark/results/speed-pairs}
PY=${PYTHON:-$ROOT/.venv/bin/python}
D3=${D3RLPY_PYTHON:-$ROOT/.venv-d3rlpy/bin/python}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$OUT" && cd "$OUT"
pair() {  # algo dataset steps
  local half=$(($3 / 2))
  "$PY" "$ROOT/$1.py" --dataset "$2" --total-steps "$3" --log-every "$half" --eval-episodes 0 \
    --exp-name "$1-speed" > "$1-$2.log" 2>&1 &
  "$D3" "$ROOT/benchmark/d3rlpy_run.py" --algo "$1" --dataset "$2" --total-steps "$3" --eval-every "$half" \
    --eval-episodes 0 --exp-name "d3rlpy_$1-speed" > "d3rlpy_$1-$2.log" 2>&1 &
  wait
}
pair iql lunarlander-continuous-medium 4000
pair cql lunarlander-continuous-medium 400
pair cql lunarlander-medium 4000
pair bcq lunarlander-continuous-medium 800
pair bcq lunarlander-medium 8000
# the last SPS each run logged (TensorBoard tag charts/SPS)
"$PY" - <<'PY'
from pathlib import Path
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
for run in sorted(Path("runs").iterdir()):
    sps = EventAccumulator(str(run)).Reload().Scalars("charts/SPS")
    print(f"{run.name.split('__')[0]:32s} {run.name.split('__')[1]:20s} {sps[-1].value:8.1f} steps/s")
PY
