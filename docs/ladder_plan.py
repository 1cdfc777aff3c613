"""The plan of issue 35's ladder (docs/results.md section 10): appends to docs/ladder_queue.txt the runs the
finished ones call for next, so that docs/ladder_queue.sh, which calls it before each run, works through
the ladder unattended. A queue line is "priority name flags"; the queue runs the lowest priority first.

Runs are named <point>__<recipe>_lr<lr>_s<seed>: point n1M ... n100M (characters read, once), or
m1x64_n3M for another model; recipe k2_lam0.25, k2_lam0.5, k4_lam0.6667, their baselines of equal compute
base_c<cost> (the patch run's compute x its characters, in whole steps) and base_c1 (equal data).

Rules. At a swept point each recipe and baseline tries three peak learning rates a factor 2 apart (centred
on its best at the point below, where that one is settled), and one more beyond an edge while the best is
at an edge; min_lr = lr/10. Where a settled gap (patch minus either baseline) is within 0.02, seeds 1338
and 1339 run at the best rates. At a carried point (30M, 100M) each runs first at the best rate of the
point below, then at half and double it.
"""

import json
import math
import os
import sys

QUEUE = "docs/ladder_queue.txt"
ROOT = "out/ladder"
RECIPES = {"k2_lam0.25": (2, 0.25), "k2_lam0.5": (2, 0.5), "k4_lam0.6667": (4, 0.6667)}
POINTS = {
    "n1M": 1_000_000,
    "n3M": 3_000_000,
    "n10M": 10_000_000,
    "n30M": 30_000_000,
    "n100M": 99_000_000,
}  # the training books hold 99.4M
SWEPT = ("n1M", "n3M")  # 10M was to be swept too: too slow on the shared machine (see section 10)
DEFAULT_LR = 8e-3
LR_RANGE = (1.25e-4, 0.128)


def step_rule(n):
    """Characters per optimizer step and sequences per pass: 768 (12 x 64) at 1M, 3,072 (48 x 64) above;
    eval windows: 4,800 of 64 (307,200 characters, the same ones at every point for one seed)."""
    return (768, 12, 400) if n <= 1_000_000 else (3072, 48, 100)


def cost(n, k, lam):
    tps = step_rule(n)[0]
    total = max(1, round(n / tps))
    patch = round(lam * total)
    return (patch / k + total - patch) / total, total


def role(point, group):
    """What a group is, the same at every point: base_c1, a recipe, or base:<recipe> (its equal compute)."""
    if group == "base_c1" or group in RECIPES:
        return group
    n = POINTS[point.rpartition("_")[2]]
    return next(f"base:{r}" for r, (k, lam) in RECIPES.items() if group == f"base_c{cost(n, k, lam)[0]:.4g}")


ORDER = {
    "base_c1": 0,
    "k2_lam0.25": 0,
    "base:k2_lam0.25": 0,
    "k2_lam0.5": 0.4,
    "base:k2_lam0.5": 0.4,
    "k4_lam0.6667": 0.6,
    "base:k4_lam0.6667": 0.6,
}  # within a point: the recipe closest to a tie first


def groups(point):
    """{group: flags without lr and seed} of one point: the recipes, their baselines, equal data."""
    prefix, _, p = point.rpartition("_")
    n = POINTS[p]
    tps, mb, ei = step_rule(n)
    model = "--n_layer 1" if prefix == "m1x64" else "--n_layer 2"
    common = f"{model} --tokens_per_step {tps} --micro_batch {mb} --eval_iters {ei}"
    out = {"base_c1": f"--k 1 --tokens {n} {common}"}
    for recipe, (k, lam) in RECIPES.items():
        out[recipe] = f"--k {k} --lam {lam} --tokens {n} {common}"
        c, total = cost(n, k, lam)
        out[f"base_c{c:.4g}"] = f"--k 1 --tokens {round(c * total) * tps} {common}"
    return out


def lr_name(lr):
    return f"{lr:.4g}"


def results():
    res = {}
    if os.path.isdir(ROOT):
        for name in os.listdir(ROOT):
            path = os.path.join(ROOT, name, "summary.json")
            if os.path.exists(path):
                with open(path) as f:
                    res[name] = json.load(f)["val_loss"]
            elif os.path.exists(os.path.join(ROOT, name, "failed")):
                res[name] = math.inf
    return res


def best(res, point, group, seed=1337):
    """(best lr, settled): settled when >= 3 rates ran and the best is not at an edge."""
    tried = {}
    for name, loss in res.items():
        pre, _, rest = name.partition(f"{point}__{group}_lr")
        if pre == "" and rest.endswith(f"_s{seed}"):
            tried[float(rest[: -len(f"_s{seed}")])] = loss
    if not tried:
        return None, False, tried
    lr = min(tried, key=tried.get)
    lrs = sorted(tried)
    settled = len(lrs) >= 3 and lrs[0] < lr < lrs[-1]
    return lr, settled, tried


def below(point):
    prefix, sep, p = point.rpartition("_")
    names = list(POINTS)
    i = names.index(p)
    return f"{prefix}{sep}{names[i - 1]}" if i else None


def plan(res, queued):
    new = []

    def want(prio, point, group, lr, seed, flags):
        if not LR_RANGE[0] <= lr <= LR_RANGE[1]:
            return
        name = f"{point}__{group}_lr{lr_name(lr)}_s{seed}"
        prio = f"{prio + ORDER[role(point, group)]:g}"
        if name not in queued:
            queued.add(name)
            new.append(f"{prio} {name} {flags} --lr {lr_name(lr)} --min_lr {lr_name(lr / 10)} --seed {seed}")

    points = [(10 + i, p, True) for i, p in enumerate(SWEPT)]
    points += [(12, "n10M", False), (30, "n30M", False), (40, "n100M", False)]
    points += [(50, "m1x64_n3M", True), (51, "m1x64_n10M", True)]
    for prio, point, swept in points:
        for group, flags in groups(point).items():
            lr, settled, tried = best(res, point, group)
            prev = below(point)
            prev_group = (
                next((g for g in groups(prev) if role(prev, g) == role(point, group)), None) if prev else None
            )
            c_lr, c_settled, _ = best(res, prev, prev_group) if prev else (None, False, {})
            if point == "m1x64_n3M":  # the other model starts from the 2x64 model's best at the same point
                c_lr, c_settled, _ = best(res, "n3M", group)
            if swept and prev and not c_settled and point != "m1x64_n3M":
                continue  # wait for the point below to settle its rate
            if point == "m1x64_n3M" and not c_settled:
                continue
            centre = c_lr if c_settled or (not swept and c_lr) else DEFAULT_LR
            if not swept:
                if not c_settled:
                    continue
                # first the rate carried over, then half and double
                want(prio, point, group, centre, 1337, flags)
                want(prio + 2, point, group, centre / 2, 1337, flags)
                want(prio + 2, point, group, centre * 2, 1337, flags)
                if lr and len(tried) >= 3 and not settled:
                    lrs = sorted(tried)
                    want(prio + 2, point, group, lr / 2 if lr == lrs[0] else lr * 2, 1337, flags)
                continue
            for f in (0.5, 1, 2):
                want(prio, point, group, centre * f, 1337, flags)
            if lr and len(tried) >= 3 and not settled:
                lrs = sorted(tried)
                want(prio, point, group, lr / 2 if lr == lrs[0] else lr * 2, 1337, flags)
    # seeds where a settled gap is within 0.02
    for i, point in enumerate(SWEPT + ("n10M", "n30M", "n100M")):
        g = groups(point)
        for recipe, (k, lam) in RECIPES.items():
            c, _ = cost(POINTS[point], k, lam)
            p_lr, p_ok, p_tried = best(res, point, recipe)
            for base in (f"base_c{c:.4g}", "base_c1"):
                b_lr, b_ok, b_tried = best(res, point, base)
                ok = p_ok and b_ok
                if p_lr and b_lr and ok and abs(p_tried[p_lr] - b_tried[b_lr]) <= 0.02:
                    for seed in (1338, 1339):
                        want(20 + i, point, recipe, p_lr, seed, g[recipe])
                        want(20 + i, point, base, b_lr, seed, g[base])
    return new


def main():
    queued = set()
    if os.path.exists(QUEUE):
        with open(QUEUE) as f:
            queued = {line.split()[1] for line in f if line.strip() and not line.startswith("#")}
    new = plan(results(), queued)
    if new:
        with open(QUEUE, "a") as f:
            f.write("\n".join(new) + "\n")
    print(f"{len(new)} runs added", file=sys.stderr)


if __name__ == "__main__":
    main()
