#!/usr/bin/env bash
# The README's main job, exactly as written, for SECONDS wall seconds on an idle machine and then beside one other
# CPU-bound process (a Python busy loop): the median steps/s of its progress lines after the first (warm-up).
#   bash benchmark/busy_check.sh [SECONDS] [extra flags, e.g. --threads 2]
set -uo pipefail
cd "$(dirname "$0")/.."
secs=${1:-90}
shift || true
median() { grep -oE '[0-9]+ SPS' | awk 'NR > 1 {print $1}' | sort -n | awk '{a[NR] = $1} END {print NR ? a[int((NR + 1) / 2)] : "n/a"}'; }
run() { timeout "$secs" python iql.py --dataset lunarlander-medium --beta 0.3 --total-steps 20000 --exp-name busy-check "$@" 2>/dev/null | median; }
idle=$(run "$@")
python3 -c "while True: pass" &
busy_pid=$!
busy=$(run "$@")
kill "$busy_pid"
echo "README main job ($*): idle $idle steps/s, beside one busy process $busy steps/s"
