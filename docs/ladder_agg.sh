#!/usr/bin/env bash
# Issue 35's order-within-a-patch test (docs/results.md section 10): K=4, lam=2/3 with a learned patch
# aggregation (docs/extending.md exercise 1, started as the mean) at three rungs and three rates each (one
# more beyond an edge), then 30M at 10M's best rate and at its half and quarter (the mean's best at 30M was
# 8e-3), into the ladder's run folders. In a worktree of its own
# (the patch changes patchgpt.py), beside the ladder's data:
#   git apply docs/ladder_agg.patch && bash docs/ladder_agg.sh <the ladder's out/ladder>
set -u
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
R=$1
COMMON="--data_dir data/ladder_chars --n_head 4 --n_embd 64 --block_size 64 --warmup_iters 50
 --eval_interval 2000 --log_interval 500 --device cpu --n_layer 2 --k 4 --lam 0.6667 --seed 1337"
for spec in "n1M 1000000 768 12 400 0.001 0.002 0.004 0.008" "n3M 3000000 3072 48 100 0.002 0.004 0.008 0.016" \
  "n10M 10000000 3072 48 100 0.008 0.016 0.032" "n30M 30000000 3072 48 100 0.016 0.008 0.004"; do
  read -r point n tps mb ei lrs <<< "$spec"
  for lr in $lrs; do
    name="${point}__k4_lam0.6667_agg_lr${lr}_s1337"
    [ -f "$R/$name/summary.json" ] && continue
    while [ -e /work/TESTS_RUNNING ]; do sleep 10; done
    mkdir -p "$R/$name"
    echo "== $(date -u +%FT%TZ) $name $(git rev-parse --short HEAD)"
    min=$(python -c "print(f'{$lr / 10:.4g}')")
    # shellcheck disable=SC2086
    python patchgpt.py $COMMON --tokens "$n" --tokens_per_step "$tps" --micro_batch "$mb" --eval_iters "$ei" \
      --lr "$lr" --min_lr "$min" --out_dir "$R/$name" >> "$R/$name/log.txt" 2>&1
    tail -n 2 "$R/$name/log.txt"
  done
done
