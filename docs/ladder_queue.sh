#!/usr/bin/env bash
# Issue 35's ladder (docs/results.md section 10): one worker; start two, one per core:
#   for w in 1 2; do nohup bash docs/ladder_queue.sh > out/ladder/queue$w.log 2>&1 & sleep 5; done
# Before each run it calls docs/ladder_plan.py, which appends to docs/ladder_queue.txt the runs that the
# finished ones call for, then it takes the unfinished line of lowest priority (then file order) that no
# other worker holds: a finished run (summary.json) is skipped, an interrupted one resumed (--resume), one
# that failed (exit code 2) marked failed. It starts nothing while /work/TESTS_RUNNING exists (the test
# suite of the machine it ran on). Data: python docs/ladder_data.py <the Gutenberg books' folder>.
set -u
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
R=out/ladder
mkdir -p $R
COMMON="--data_dir data/ladder_chars --n_head 4 --n_embd 64 --block_size 64 --warmup_iters 50
 --eval_interval 2000 --log_interval 500 --device cpu"
idle=0
while true; do
  while [ -e /work/TESTS_RUNNING ]; do sleep 10; done
  next=""
  {
    flock 9
    python docs/ladder_plan.py 2>/dev/null
    while read -r prio name flags; do
      [ -z "$prio" ] || [ "${prio:0:1}" = "#" ] && continue
      [ -f "$R/$name/summary.json" ] || [ -f "$R/$name/failed" ] && continue
      if [ -f "$R/$name/worker" ] && kill -0 "$(cat "$R/$name/worker")" 2>/dev/null; then continue; fi
      echo "$prio $name $flags"
    done < docs/ladder_queue.txt | sort -s -n -k1,1 | head -n 1 > "$R/.pick$$"
    read -r _ next args < "$R/.pick$$"
    rm -f "$R/.pick$$"
    [ -n "$next" ] && mkdir -p "$R/$next" && echo $$ > "$R/$next/worker"
  } 9> "$R/.lock"
  if [ -z "$next" ]; then  # everything queued is finished or held by the other worker
    idle=$((idle + 1)); [ $idle -gt 90 ] && break
    sleep 20; continue
  fi
  idle=0
  resume=""; [ -f "$R/$next/ckpt.pt" ] && resume="--resume"
  echo "== $(date -u +%FT%TZ) $next $(git rev-parse --short HEAD)"
  # shellcheck disable=SC2086
  python patchgpt.py $COMMON $args --out_dir "$R/$next" $resume >> "$R/$next/log.txt" 2>&1
  code=$?
  tail -n 2 "$R/$next/log.txt"
  rm -f "$R/$next/worker"
  [ $code = 2 ] && touch "$R/$next/failed"
  [ $code = 0 ] || [ $code = 2 ] || break  # Ctrl-C or a crash: stop this worker
done
echo "== $(date -u +%FT%TZ) worker done"
