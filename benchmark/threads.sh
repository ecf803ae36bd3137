#!/usr/bin/env bash
# Gradient steps/s of each script with 1, 2 and 4 intra-op threads, on an idle machine and beside one other
# CPU-bound process (a Python busy loop). Each run trains for SECONDS wall seconds with evaluation off; the
# figure is the median of its progress lines after the first (warm-up).
#   bash benchmark/threads.sh [SECONDS] > benchmark/results/threads.tsv
# THREADS_ENV=1 sets the count with OMP_NUM_THREADS instead of --threads (for code older than the flag).
set -uo pipefail
cd "$(dirname "$0")/.."
secs=${1:-20}
configs=(
  "iql.py --dataset lunarlander-medium --beta 0.3 --log-every 200"
  "iql.py --dataset lunarlander-continuous-medium --log-every 200"
  "cql.py --dataset lunarlander-medium --log-every 200"
  "cql.py --dataset lunarlander-continuous-medium --log-every 10"
  "bcq.py --dataset lunarlander-medium --log-every 200"
  "bcq.py --dataset lunarlander-continuous-medium --log-every 50"
)
printf "load\tthreads\tcommand\tsteps_per_s\n"
for load in idle busy; do
  busy_pid=""
  [ "$load" = busy ] && { python3 -c "while True: pass" & busy_pid=$!; }
  for threads in 1 2 4; do
    for cfg in "${configs[@]}"; do
      if [ "${THREADS_ENV:-0}" = 1 ]; then
        out=$(OMP_NUM_THREADS=$threads timeout "$secs" python $cfg --eval-episodes 0 --exp-name threads 2>/dev/null)
      else
        out=$(timeout "$secs" python $cfg --threads "$threads" --eval-episodes 0 --exp-name threads 2>/dev/null)
      fi
      sps=$(echo "$out" | grep -oE '[0-9]+ SPS' | awk 'NR > 1 {print $1}' | sort -n |
            awk '{a[NR] = $1} END {print NR ? a[int((NR + 1) / 2)] : "n/a"}')
      printf "%s\t%s\t%s\t%s\n" "$load" "$threads" "$cfg" "$sps"
    done
  done
  [ -n "$busy_pid" ] && kill "$busy_pid"
done
