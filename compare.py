"""
compare.py: patch-level runs against token-level baselines on the same data, seed and model: the baseline
on the same tokens (equal data) and a baseline on cost x the tokens (equal compute: cost is the patch run's
compute as it reports it, counted in FLOPs: lam/K + 1 - lam to whole steps for the paper's method).
Prints a table, writes results.json and, with matplotlib installed, compare.png (token-level val loss
against tokens and against compute, like the paper's Figure 1).

  python compare.py --k 4 --lam 0.67           # 3 runs: baseline, K=4 lam=0.67, equal-compute baseline
  python compare.py --k 2,4 --lam 0.25,0.5,0.67 --schedule restart,wsd --out_dir out/grid --resume
--k, --lam and --schedule take comma-separated lists; every other patchgpt.py flag passes through to all
runs (--tokens, --data_dir, --val_bin, the model's size, ...). With --resume, finished runs with the same
settings are reused and unfinished ones continue, so an interrupted grid picks up where it stopped.
"""

import json
import math
import os
from dataclasses import asdict, replace

import numpy as np

import guards
import patchgpt as P

LISTS = {"k": "patch sizes", "lam": "fractions of the tokens at patch level", "schedule": "schedules"}


def build_parser():
    p = P.build_parser("Patch-level training against token-level baselines of equal data and equal compute.")
    for name, what in LISTS.items():
        p.add_argument(
            f"--{name}",
            default=str(getattr(P.TrainConfig, name)),
            help=f"comma-separated {what} (default: %(default)s)",
        )
    p.add_argument(
        "--out_dir",
        default="out/compare",
        help="a folder per run, results.json and compare.png (default: %(default)s)",
    )
    p.add_argument(
        "--extra_val_bin",
        default="",
        help="also evaluate every run's final weights on this "
        ".bin (e.g. WikiText-103 test, the paper's metric): the table's 'extra ppl' column",
    )
    return p


def parse_lists(args):
    """Each value of a list checked as patchgpt.py checks its flag (one line, exit 2 if bad); repeats
    dropped, so that a grid never trains a run twice or meets its own folder."""
    single = P.build_parser()
    return {
        name: list(
            dict.fromkeys(
                getattr(single.parse_args([f"--{name}", text.strip()]), name)
                for text in str(getattr(args, name)).split(",")
            )
        )
        for name in LISTS
    }


def family(schedule):
    """A one-stage baseline trains the same under restart and global; wsd is a schedule of its own."""
    return "wsd" if schedule == "wsd" else "restart"


def cost(compute):
    """A patch run's compute (guards.plan_cost, of the FLOPs its code computes) rounded as the equal-compute
    baselines' names and token counts use it: a change to the stages or the steps changes its baselines."""
    return round(compute, 4)


def plan_runs(mc, tc, lists):
    """(name, schedule, K, lam, tokens) of every run: per schedule family the baseline, the patch runs and
    one equal-compute baseline per distinct cost. A one-stage run is the same under restart and global."""
    N, runs = tc.tokens, []
    for schedule in lists["schedule"]:
        pre = "" if schedule == "restart" else f"{schedule}_"
        base = "" if family(schedule) == "restart" else "wsd_"
        runs.append((f"{base}baseline", family(schedule), 1, 0.0, N))
        costs = []
        for K in lists["k"]:
            for lam in lists["lam"]:
                if K > 1 and lam > 0:
                    runs.append((f"{pre}patch_k{K}_lam{lam:g}", schedule, K, lam, N))
                    run = P.Run(mc, replace(tc, k=K, lam=lam, schedule=schedule), log=lambda *a: None)
                    # the cost the run will report
                    costs.append(cost(guards.plan_cost(run.stages, run.flops)))
        runs += [
            (f"{base}baseline_cost{c:g}", family(schedule), 1, 0.0, round(c * N)) for c in sorted(set(costs))
        ]
    return list(dict((r[0], r) for r in runs).values())  # a baseline shared by restart and global runs once


def compare(mc, tc, lists, root, log=print, extra_val_bin=""):
    tc = guards.resolve_dtype(tc)  # as train() saves it, so that finished runs are recognized
    mc = P.fit_vocab(mc, guards.read_vocab(tc.data_dir))  # likewise: the data's vocabulary, as Run sets it
    for name, values in lists.items():  # refuse a bad value or plan before the first run, not in the grid
        for value in values:
            guards.validate(mc, replace(tc, **{name: value}))
    runs, results = plan_runs(mc, tc, lists), []
    configs = [
        (name, replace(tc, schedule=s, k=K, lam=lam, tokens=n, out_dir=os.path.join(root, name)))
        for name, s, K, lam, n in runs
    ]
    for _, sub in configs:
        P.plan_stages(sub, mc.block_size)
    for name, sub in configs:
        summary = finished(mc, sub) if tc.resume else None
        if summary:
            log(f"== {name}: finished earlier, reusing {sub.out_dir}/summary.json")
        else:
            log(f"== {name}: K={sub.k} lam={sub.lam:g} schedule={sub.schedule} tokens={sub.tokens:,}")
            resume = tc.resume and os.path.exists(os.path.join(sub.out_dir, "ckpt.pt"))
            summary = P.train(mc, replace(sub, resume=resume), log)
        results.append(
            {
                "name": name,
                "k": sub.k,
                "lam": sub.lam,
                "schedule": sub.schedule,
                "tokens": sub.tokens,
                "summary": summary,
            }
        )
        if extra_val_bin:
            results[-1]["extra_val_loss"] = evaluate_on(mc, sub, extra_val_bin)
    for line in table(results):
        log(line)
    os.makedirs(root, exist_ok=True)
    guards.atomic_write(
        os.path.join(root, "results.json"),
        json.dumps({"model": asdict(mc), "train": asdict(tc), "results": results}, indent=1).encode(),
    )
    plot(results, tc, os.path.join(root, "compare.png"), log)
    return results


def evaluate_on(mc, tc, val_bin):
    """Token-level loss of a finished run's final weights on the fixed windows of another token file."""
    run = P.Run(mc, replace(tc, val_bin=val_bin), log=lambda *a: None)
    run.raw_model.load_state_dict(guards.load_checkpoint(os.path.join(tc.out_dir, "ckpt.pt"))["model"])
    run.evaluate(run.stages[-1])
    return run.history[-1]["val_loss"]


def finished(mc, tc):
    """The summary of a finished run in tc.out_dir with exactly these settings, else None."""
    path = os.path.join(tc.out_dir, "summary.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        summary = json.load(f)
    return summary if summary.get("identity") == json.loads(json.dumps(guards.identity(mc, tc))) else None


def baselines(r, results):
    """r's token-level baselines of its schedule family: on the same tokens, of equal compute, and the
    family's largest (what the compute and time columns are relative to)."""
    runs = [b for b in results if b["k"] == 1 and b["schedule"] == family(r["schedule"])]
    cheap = round(cost(r["summary"]["compute_cost"]) * r["tokens"])
    return [next((b for b in runs if b["tokens"] == n), None) for n in (r["tokens"], cheap)] + [
        max(runs, key=lambda b: b["tokens"], default=None)
    ]


def table(results):
    """val loss; compute and training time relative to the full baseline; the gaps to the baselines of
    equal data and of equal compute (negative: the patch run is better)."""
    extra = any("extra_val_loss" in r for r in results)
    lines = [
        f"{'run':<30}{'tokens':>11}{'val loss':>10}{'ppl':>9}{'compute':>9}{'time':>7}"
        f"{'gap same data':>15}{'gap same compute':>18}" + (f"{'extra ppl':>11}" if extra else "")
    ]
    for r in results:
        s, (same, cheap, full) = r["summary"], baselines(r, results)
        gap = [
            f"{s['val_loss'] - b['summary']['val_loss']:+.4f}" if b and r["k"] > 1 else "-"
            for b in (same, cheap)
        ]
        rel = (
            f"{s['compute_cost'] * sum(s['tokens']) / sum(full['summary']['tokens']):>9.3f}"
            f"{sum(s['time']) / sum(full['summary']['time']):>7.3f}"
            if full
            else f"{'-':>9}{'-':>7}"
        )
        lines.append(
            f"{r['name']:<30}{sum(s['tokens']):>11,}{s['val_loss']:>10.4f}"
            f"{math.exp(s['val_loss']):>9.2f}{rel}{gap[0]:>15}{gap[1]:>18}"
            + (f"{math.exp(r['extra_val_loss']):>11.2f}" if extra else "")
        )
    return lines


def curve(r):
    """(tokens, compute in positions, val loss) at each evaluation of a run; a patch is one position."""
    s = r["summary"]
    patch_tokens = s["tokens"][0] if len(s["tokens"]) == 2 else 0
    return [
        (
            h["tokens"],
            min(h["tokens"], patch_tokens) / r["k"] + max(0, h["tokens"] - patch_tokens),
            h["val_loss"],
        )
        for h in s["history"]
    ]


def unigram_loss(data_dir):
    """The training tokens' unigram entropy (nats): the loss of predicting each token by its frequency."""
    counts = np.bincount(np.memmap(os.path.join(data_dir, "train.bin"), dtype=np.uint16, mode="r"))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def plot(results, tc, path, log=print):
    """Token-level val loss against training tokens and against compute. The y axis starts just above
    the loss of the training data's unigram distribution, so the curves' differences are not squashed
    (for runs that never went below it, at their highest loss)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot (pip install matplotlib); results.json has the curves")
        return
    unigram = unigram_loss(tc.data_dir)
    losses = [h["val_loss"] for r in results for h in r["summary"]["history"]]
    lowest = min(losses)
    # runs that never got below the unigram loss (short ones) would be off the plot, upside down: all of it
    top = unigram + 0.3 if lowest < unigram else max(losses) + 0.05
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for i, r in enumerate(results):
        pts = curve(r)
        switch = next((j for j, h in enumerate(r["summary"]["history"]) if h["stage"] == "token"), 0)
        for ax, x in zip(axes, (0, 1)):
            style = dict(color=f"C{i % 10}", label=r["name"])
            if switch:  # the patch stage dotted, joined to the token stage at the switch
                ax.plot(
                    [q[x] for q in pts[: switch + 1]],
                    [q[2] for q in pts[: switch + 1]],
                    ":",
                    color=style["color"],
                )
            ax.plot([q[x] for q in pts[switch:]], [q[2] for q in pts[switch:]], "-", **style)
    for ax, xlabel in zip(axes, ("training tokens", "training compute (positions: a patch is one)")):
        ax.set(xlabel=xlabel, ylabel="token-level val loss", ylim=(lowest - 0.05, top))
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.suptitle(
        f"patch-level training (dotted: patch stage) vs token-level baselines; "
        f"y from the unigram loss ({unigram:.2f}) down"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log(f"wrote {path}")


def run(args):
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise guards.UserError("compare.py runs one process; launch it without torchrun")
    lists = parse_lists(args)
    for name in LISTS:
        setattr(args, name, lists[name][0])
    mc, tc = P.configs(args)  # every run gets its own folder inside --out_dir
    return compare(mc, tc, lists, args.out_dir, extra_val_bin=args.extra_val_bin)


if __name__ == "__main__":
    P.main(parser=build_parser(), action=run)
