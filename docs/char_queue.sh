#!/usr/bin/env bash
# Issue 28's runs (docs/results.md sections 8 and 9), one at a time on one thread, in the order of
# docs/char_queue.txt (read anew before each run, so the queue can change while it works): a line is a
# run's name and its flags; a finished run (its summary.json) is skipped, an interrupted one resumed, and
# one that failed (exit code 2: a diverged loss, say) is marked failed and skipped. Each run's log: log.txt.
#   nohup bash docs/char_queue.sh > out/chars/queue.log 2>&1 &
# Section 9's runs read data/grid/, which python docs/grid_data.py <Gutenberg folder> makes first.
set -u
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
D=data/tinyshakespeare_char
[ -f $D/train.bin ] || python prepare_data.py --chars --out_dir $D
# nanoGPT's shakespeare_char model on a laptop: 4 layers, 4 heads, 128 wide, 64 positions, 768 chars a step
COMMON="--data_dir $D --n_layer 4 --n_head 4 --n_embd 128 --block_size 64 --tokens_per_step 768 --micro_batch 12
 --warmup_iters 100 --eval_interval 250 --eval_iters 50 --log_interval 250 --device cpu"
while true; do
  next=""
  while read -r name flags; do
    [ -z "$name" ] || [ "${name:0:1}" = "#" ] && continue
    [ -f "out/chars/$name/summary.json" ] || [ -f "out/chars/$name/failed" ] || { next="$name"; args="$flags"; break; }
  done < docs/char_queue.txt
  [ -n "$next" ] || break
  resume=""; [ -f "out/chars/$next/ckpt.pt" ] && resume="--resume"
  echo "== $(date -u +%FT%TZ) $next $(git rev-parse --short HEAD)"
  # shellcheck disable=SC2086
  mkdir -p "out/chars/$next"
  python patchgpt.py $COMMON $args --out_dir "out/chars/$next" $resume >> "out/chars/$next/log.txt" 2>&1
  code=$?
  tail -n 2 "out/chars/$next/log.txt"
  [ $code = 2 ] && touch "out/chars/$next/failed"
  [ $code = 0 ] || [ $code = 2 ] || break  # Ctrl-C or a crash: stop the queue
done
echo "== $(date -u +%FT%TZ) queue done"
