#!/usr/bin/env bash
# Issue 35, item 4: the tiny model's speed per stage, on one thread, apart from the ladder's runs (whose
# times include other work and pauses). Short runs of each recipe at both of the ladder's step sizes;
# each stage is timed from its second step (patchgpt.py's tok_s), evaluation excluded.
#   bash docs/ladder_timing.sh out/timing      # then: python docs/ladder_timing.py out/timing
set -eu
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
O=${1:-out/timing}
mkdir -p "$O"
for step in "768 12" "3072 48"; do
  set -- $step
  for r in "1 0" "2 0.5" "4 0.6667"; do
    set -- $1 $2 $r
    python patchgpt.py --data_dir data/ladder_chars --n_layer 2 --n_head 4 --n_embd 64 --block_size 64 \
      --k $3 --lam $4 --tokens $(($1 * 600)) --tokens_per_step $1 --micro_batch $2 --warmup_iters 50 \
      --lr 4e-3 --min_lr 4e-4 --eval_interval 100000 --eval_iters 1 --log_interval 1000 --device cpu \
      --out_dir "$O/t$1_k$3" --overwrite | tail -n 2
  done
done
