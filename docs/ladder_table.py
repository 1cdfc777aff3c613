"""The tables and the plot of docs/results.md section 10 (issue 35's tokens-per-parameter ladder) from the
runs of docs/ladder_queue.sh: every run's final val loss; per point and recipe its best learning rate
against the best of its equal-compute baseline (base_c<cost>) and of the equal-data one (base_c1), seed by
seed (seeds 1338 and 1339 ran at seed 1337's best rates); where the patch stage left the token-level loss
against the training characters' unigram level; and the gaps against characters per parameter, beside
the paper's 370M data-scaling points (per LLaMA-2 token; ours per character).

  python docs/ladder_table.py out/ladder [docs/ladder_gap.png]
"""

import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import char_table  # noqa: E402

import compare  # noqa: E402
import patchgpt as P  # noqa: E402

RECIPES = ("k2_lam0.25", "k2_lam0.5", "k4_lam0.6667", "k2_lam0.25_wsd", "k2_lam0.5_wsd", "k4_lam0.6667_agg")
LABEL = {
    "k2_lam0.25": "K=2, λ=0.25",
    "k2_lam0.5": "K=2, λ=0.5",
    "k4_lam0.6667": "K=4, λ=2/3",
    "k2_lam0.25_wsd": "K=2, λ=0.25, wsd",
    "k2_lam0.5_wsd": "K=2, λ=0.5, wsd",
    "k4_lam0.6667_agg": "K=4, λ=2/3, learned aggregation",
}
# the paper's 370M data scaling (PPL, token-level vs K=4, lam=2/3 on the same tokens; PAPER.md)
PAPER = [(45e9, 12.50, 12.84), (90e9, 11.71, 11.80), (180e9, 11.28, 11.17), (360e9, 10.94, 10.68)]
PAPER_PARAMS = 370e6
# the plot's marker for each model_of(point): the ladder's 2x64 model (""), then the smaller ones
MARKERS = {"": "o", "m1x64": "s", "m1x32": "v", "m2x32": "P"}


def model_of(point):
    """A point's model: "" for the ladder's (n1M ...), "m1x64" for m1x64_n3M, and so on."""
    return point.rpartition("_")[0]


def point_key(point):
    """n1M < n3M < ... ; the other models' points after, by amount and then by name (so that two models at one
    amount keep one order, whatever order their folders were listed in)."""
    return model_of(point) != "", float(point.rpartition("n")[2][:-1]), point


def load(root):
    """{(point, group, lr, seed): summary.json}; point e.g. n3M or m1x64_n3M: char_table.load's runs, whose
    names are <point>__<group>."""
    runs = {}
    for (name, lr, seed), summary in char_table.load(root).items():
        point, sep, group = name.partition("__")
        if sep:
            runs[point, group, lr, seed] = summary
    return runs


def n_params(s):
    mc = P.GPTConfig(**{k: v for k, v in s["identity"].items() if k in P.GPTConfig.__dataclass_fields__})
    return sum(p.numel() for p in P.GPT(mc).parameters())


def switch_loss(s):
    return [h["val_loss"] for h in s["history"] if h["stage"] == "patch"][-1]


def best_lr(runs, point, group, seed=1337):
    tried = {lr: s["val_loss"] for (p, g, lr, sd), s in runs.items() if (p, g, sd) == (point, group, seed)}
    if not tried:
        return None, {}
    lr = min(tried, key=tried.get)
    return lr, tried


def lr_cell(lr, tried):
    """The rates tried, the best in bold; "(edge)" when the best is the lowest or highest tried."""
    lrs = sorted(tried)
    edge = " (edge)" if len(lrs) < 3 or lr in (lrs[0], lrs[-1]) else ""
    return ", ".join(f"**{x:g}**" if x == lr else f"{x:g}" for x in lrs) + edge


def gap_rows(runs):
    """Per (point, recipe, baseline kind): seeds, patch and baseline losses, the gap's mean and spread."""
    points = sorted({p for p, *_ in runs}, key=point_key)
    for point in points:
        for recipe in RECIPES:
            p_lr, p_tried = best_lr(runs, point, recipe)
            if p_lr is None:
                continue
            patch = {sd: s for (p, g, lr, sd), s in runs.items() if (p, g, lr) == (point, recipe, p_lr)}
            cost = next(iter(patch.values()))["compute_cost"]
            # the learned aggregation's layer adds some compute (0.52 at K=4): it meets the mean's baseline
            plain = recipe.removesuffix("_agg")
            cost = next(
                (s["compute_cost"] for (p, g, *_), s in runs.items() if (p, g) == (point, plain)), cost
            )
            bases = [("compute", f"base_c{cost:.4g}"), ("data", "base_c1")]
            if recipe.endswith("_wsd"):  # and against baselines of the same schedule, where they ran
                bases += [("compute", f"base_c{cost:.4g}_wsd"), ("data", "base_c1_wsd")]
            for kind, base in bases:
                b_lr, b_tried = best_lr(runs, point, base)
                if b_lr is None:
                    continue
                bs = {sd: s for (p, g, lr, sd), s in runs.items() if (p, g, lr) == (point, base, b_lr)}
                seeds = sorted(set(patch) & set(bs))
                pl = np.array([patch[sd]["val_loss"] for sd in seeds])
                bl = np.array([bs[sd]["val_loss"] for sd in seeds])
                g = pl - bl
                yield dict(
                    point=point,
                    recipe=recipe,
                    kind=kind,
                    cost=cost,
                    base=base,
                    seeds=seeds,
                    p_lr=(p_lr, p_tried),
                    b_lr=(b_lr, b_tried),
                    patch=pl.mean(),
                    baseline=bl.mean(),
                    gap=g.mean(),
                    sd=g.std(ddof=1) if len(g) > 1 else None,
                    gaps=g,
                    switch=np.mean([switch_loss(patch[sd]) for sd in seeds]),
                    tokens=sum(next(iter(patch.values()))["tokens"]),
                    params=n_params(next(iter(patch.values()))),
                )


def trend(rows, last=3):
    """Where each gap's trend would cross zero: a straight line through the gap against log10(characters per
    parameter) at the last three rungs of the ladder's model (cosine baselines), with the range that the
    slope's standard error gives (one degree of freedom: a direction, not a prediction)."""
    print("\n| recipe | vs | rungs (chars/param) | gap per decade | crosses zero at (chars/param) |")
    print("| --- | --- | --- | ---: | --- |")
    for recipe in RECIPES:
        for kind in ("compute", "data"):
            rs = [
                r
                for r in rows
                if (r["recipe"], r["kind"]) == (recipe, kind)
                and model_of(r["point"]) == ""
                and not r["base"].endswith("_wsd")
            ][-last:]
            if len(rs) < last:
                continue
            x = np.log10([r["tokens"] / r["params"] for r in rs])
            y = np.array([r["gap"] for r in rs])
            (slope, _), cov = np.polyfit(x, y, 1, cov=True)
            se = math.sqrt(cov[0, 0])
            # the line turns about the rungs' centre, so the range is the slope's alone
            cross = [
                10 ** (x.mean() - y.mean() / m) if m < 0 else math.inf
                for m in (slope - se, slope, slope + se)
            ]
            show = ["over 100,000" if c > 1e5 else f"{c:,.0f}" for c in cross]
            at = "never (the gap does not fall)" if slope >= 0 else f"{show[1]} ({show[0]} to {show[2]})"
            pts = ", ".join(f"{r['tokens'] / r['params']:.0f}" for r in rs)
            print(f"| {LABEL[recipe]} | equal {kind} | {pts} | {slope:+.3f} ± {se:.3f} | {at} |")


def speed(runs):
    """Item 4: each stage's characters a second (wall clock, as the runs logged them) and a run's measured
    wall cost against its compute cost (patchgpt.py's own count: each stage's time at its own speed), per
    recipe over the ladder model's runs of 3,072 characters a step. Runs shared 2 vCPUs with one or two
    others."""
    print(
        "\n| recipe | runs | patch stage chars/s | token stage chars/s | compute cost | wall cost (range) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for recipe in RECIPES:
        ss = [
            s
            for (p, g, *_), s in runs.items()
            if g == recipe and model_of(p) == "" and s["identity"]["tokens_per_step"] == 3072
        ]
        if not ss:
            continue
        wall = [s["measured_cost"] for s in ss]
        patch = np.median([s["tok_s"][0] for s in ss])
        token = np.median([s["tok_s"][1] for s in ss])
        cost = np.median([s["compute_cost"] for s in ss])
        print(
            f"| {LABEL[recipe]} | {len(ss)} | {patch:,.0f} | {token:,.0f} | {cost:.3f} | "
            f"{np.median(wall):.3f} ({min(wall):.3f}-{max(wall):.3f}) |"
        )


def main(root, png=None):
    runs = load(root)
    uni = compare.unigram_loss("data/ladder_chars")
    print("| point | run | lr | seed | characters | val loss | at the switch |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for (point, group, lr, seed), s in sorted(runs.items(), key=lambda kv: (point_key(kv[0][0]), kv[0][1:])):
        sw = f"{switch_loss(s):.4f}" if s["k"] > 1 else ""
        print(f"| {point} | {group} | {lr:g} | {seed} | {sum(s['tokens']):,} | {s['val_loss']:.4f} | {sw} |")
    rows = list(gap_rows(runs))
    print(f"\nunigram level of the training characters: {uni:.4f} nats")
    print(
        "\n| point | chars/param | recipe | vs | lrs tried: patch; baseline | seeds | patch | baseline "
        "| gap | at the switch |"
    )
    print("| --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        spread = f" ± {r['sd']:.4f}" if r["sd"] is not None else ""
        per = ", ".join(f"{x:+.4f}" for x in r["gaps"]) if len(r["gaps"]) > 1 else ""
        vs = f"{r['base'].replace('base_c', 'equal compute ')}" if r["kind"] == "compute" else "equal data"
        vs = vs.replace("_wsd", "") + (", wsd" if r["base"].endswith("_wsd") else "")
        print(
            f"| {r['point']} | {r['tokens'] / r['params']:.0f} | {LABEL[r['recipe']]} | {vs} | "
            f"{lr_cell(*r['p_lr'])}; {lr_cell(*r['b_lr'])} | {len(r['seeds'])} | {r['patch']:.4f} | "
            f"{r['baseline']:.4f} | **{r['gap']:+.4f}**{spread}{' (' + per + ')' if per else ''} | "
            f"{r['switch']:.3f} |"
        )
    if rows:
        print("\nparameters: " + ", ".join(sorted({f"{r['point']}: {r['params']:,}" for r in rows})))
        trend(rows)
        speed(runs)
    if png and rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
        colors = {
            "k2_lam0.25": "tab:blue",
            "k2_lam0.5": "tab:orange",
            "k4_lam0.6667": "tab:green",
            "k2_lam0.25_wsd": "tab:blue",
            "k2_lam0.5_wsd": "tab:orange",
            "k4_lam0.6667_agg": "tab:green",
        }
        for ax, kind in zip(axes, ("compute", "data")):
            for recipe in RECIPES:
                for model, marker in MARKERS.items():
                    for wsd_base in (False, True):
                        rs = [
                            r
                            for r in rows
                            if r["recipe"] == recipe
                            and r["kind"] == kind
                            and model_of(r["point"]) == model
                            and r["base"].endswith("_wsd") == wsd_base
                        ]
                        if not rs:
                            continue
                        label = LABEL[recipe] + (f", {model[1:]} model" if model else "")
                        label += ", against wsd baselines" if wsd_base else ""
                        variant = recipe.endswith(("_wsd", "_agg"))
                        ax.errorbar(
                            [r["tokens"] / r["params"] for r in rs],
                            [r["gap"] for r in rs],
                            yerr=[r["sd"] or 0 for r in rs],
                            marker={"_wsd": "^", "_agg": "D"}.get(recipe[-4:], marker),
                            mfc="none" if model or wsd_base else None,
                            ls=":" if model or wsd_base else ("--" if variant else "-"),
                            capsize=3,
                            color=colors[recipe],
                            alpha=0.6 if variant else 1,
                            label=label,
                        )
            if kind == "data":
                px = [t / PAPER_PARAMS for t, _, _ in PAPER]
                py = [math.log(pp / bp) for _, bp, pp in PAPER]
                ax.plot(px, py, "k*--", ms=9, label="paper, 370M, K=4, λ=2/3 (nats per token)")
            ax.axhline(0, color="gray", lw=0.8)
            # linear within ±0.05, where the crossover is; logarithmic beyond, for the small rungs' losses
            ax.set_yscale("symlog", linthresh=0.05, linscale=2)
            ax.set_yticks([-0.05, -0.02, 0, 0.02, 0.05, 0.1, 0.2, 0.5])
            ax.set_yticklabels(["-0.05", "-0.02", "0", "0.02", "0.05", "0.1", "0.2", "0.5"])
            ax.set_xscale("log")
            ax.set_xlim(4, 4000)
            ax.set_xlabel("training characters (paper: tokens) per parameter")
            ax.set_title(f"gap at equal {kind}: patch − token-level (nats)")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("val loss gap (nats per character)")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(png, dpi=110)
        print(f"\nplot: {png}")


if __name__ == "__main__":
    main(*sys.argv[1:])
