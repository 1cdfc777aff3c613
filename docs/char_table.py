"""The tables of docs/results.md section 8 from the runs of docs/char_queue.sh: every run's final val loss,
and per recipe its best learning rate against the best of its equal-compute baseline's, seed by seed.

  python docs/char_table.py out/chars
"""

import json
import os
import re
import sys

import numpy as np


def load(root):
    """{(recipe, lr, seed): (final val loss, compute, positions trained)}; a recipe is e.g. "k2_lam0.5", or
    "base_c0.75" for the token-level runs of a patch recipe's compute (0.75 of its tokens)."""
    runs = {}
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name, "summary.json")
        m = re.fullmatch(r"(.+)_lr([\d.e-]+)_s(\d+)", name)
        if m and os.path.exists(path):
            with open(path) as f:
                s = json.load(f)
            positions = s["compute_cost"] * sum(s["tokens"])
            runs[m[1], float(m[2]), int(m[3])] = (s["val_loss"], s["compute_cost"], positions)
    return runs


def main(root):
    runs = load(root)
    print("| run | lr | seed | positions trained | val loss |\n| --- | ---: | ---: | ---: | ---: |")
    for (recipe, lr, seed), (loss, _, positions) in sorted(runs.items()):
        print(f"| {recipe} | {lr:g} | {seed} | {positions:,.0f} | {loss:.4f} |")
    best = {}  # (recipe, seed) -> the lowest loss of the learning rates tried
    cost = {}
    for (recipe, lr, seed), (loss, c, _) in runs.items():
        best[recipe, seed] = min(best.get((recipe, seed), np.inf), loss)
        cost[recipe] = c
    print("\n| recipe | compute | lrs tried (patch; baseline) | seeds | patch | baseline | gap |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for recipe in sorted(r for r in cost if not r.startswith("base")):
        baseline = f"base_c{cost[recipe]:.4g}"  # the token-level runs of the same compute
        seeds = sorted(s for r, s in best if r == recipe and (baseline, s) in best)
        if not seeds:
            continue
        lrs = [
            ",".join(f"{lr:g}" for lr in sorted({lr for r, lr, _ in runs if r == n}))
            for n in (recipe, baseline)
        ]
        patch = np.array([best[recipe, s] for s in seeds])
        base = np.array([best[baseline, s] for s in seeds])
        gaps = patch - base
        spread = f" ± {gaps.std(ddof=1):.4f}" if len(seeds) > 1 else ""
        row = [
            recipe,
            f"{cost[recipe]:.4f}",
            "; ".join(lrs),
            len(seeds),
            f"{patch.mean():.4f}",
            f"{base.mean():.4f}",
        ]
        print("| " + " | ".join(map(str, row)) + f" | **{gaps.mean():+.4f}**{spread} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/chars")
