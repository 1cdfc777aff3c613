#!/usr/bin/env bash
# Issue 35, item 4: the tiny model's speed per stage, on one thread, apart from the ladder's runs. The
# machine's other work pauses processes (SIGSTOP) at times, so besides patchgpt.py's wall-clock tok_s each
# run's CPU time (user + system, /usr/bin/time) is kept: a pause stops the CPU clock too. Per recipe and
# step size: token-level runs of S and 2S steps (their difference: the token stage's CPU per step, and the
# fixed cost of a run: start, data, evaluation), and the patch run of K=2, lam=0.5 (S + S steps) and K=4,
# lam=2/3 (2S + S steps); its patch stage's CPU is its total less the fixed cost and its token steps.
#   bash docs/ladder_timing.sh out/timing 300     # then: python docs/ladder_timing.py out/timing 300
set -eu
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
O=${1:-out/timing}
S=${2:-300}
mkdir -p "$O"
for step in "768 12" "3072 48"; do
  set -- $step
  for r in "1 0 1 a" "1 0 2 b" "2 0.5 2 a" "4 0.6667 3 a"; do
    set -- $1 $2 $r
    d="$O/t$1_k$3$6"
    /usr/bin/time -f "%U %S %e" -o "$d.time" python patchgpt.py --data_dir data/ladder_chars --n_layer 2 \
      --n_head 4 --n_embd 64 --block_size 64 --k $3 --lam $4 --tokens $(($1 * S * $5)) --tokens_per_step $1 \
      --micro_batch $2 --warmup_iters 50 --lr 4e-3 --min_lr 4e-4 --eval_interval 100000 --eval_iters 1 \
      --log_interval 100000 --device cpu --out_dir "$d" --overwrite | tail -n 1
  done
done
