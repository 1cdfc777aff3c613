"""
docs/trend.py: the gap between patch-level training and its token-level baselines against tokens per
parameter, from compare.py's results.json files of one model at several budgets, with the paper's
data-scaling points (arXiv 2407.12665 v1: 370M parameters, WikiText-103 perplexity, K=4, lambda=2/3,
equal data) as ln of their perplexity ratio, marked as the paper's. --recipes_plot draws only the gaps at
equal compute, of the given runs and of section 5's paper recipe, against training tokens.

  python docs/trend.py out/gut_trend_2.5e5/results.json out/gut_grid_1M/results.json ... \\
      --plot docs/gutenberg_trend.png
"""

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import compare  # noqa: E402
import patchgpt as P  # noqa: E402

# the paper's 370M model: (training tokens, token-level baseline PPL, patch K=4 lambda=2/3 PPL)
PAPER = [(45e9, 12.50, 12.84), (90e9, 11.71, 11.80), (180e9, 11.28, 11.17), (360e9, 10.94, 10.68)]
PAPER_PARAMS = 370e6

# docs/results.md section 5: the paper's recipe (restart, K=4, lr 1e-3, 2,048 tokens per step), its gaps at
# equal compute on Gutenberg as measured there (2026-11-28/29); those runs' folders were not kept
SECTION5 = {
    "restart K=4 lam=0.25": [(0.25e6, 0.002), (1e6, 0.060), (2e6, 0.256), (4e6, 0.208)],
    "restart K=4 lam=0.67": [(0.25e6, -0.194), (1e6, 0.257), (2e6, 0.183), (4e6, 0.236)],
}


def rows(paths):
    """One row per patch run: recipe, tokens, tokens/param (all and non-embedding), both gaps."""
    out = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        model = P.GPT(P.GPTConfig(**data["model"]))
        n_all = sum(p.numel() for p in model.parameters())
        n_body = n_all - model.transformer.wte.weight.numel() - model.transformer.wpe.weight.numel()
        results = data["results"]
        for r in results:
            if r["k"] == 1:
                continue
            same, cheap, _ = compare.baselines(r, results)
            loss = r["summary"]["val_loss"]
            tying = " untied" if data["model"].get("untied") else ""
            out.append(
                {
                    "recipe": f"{r['schedule']} K={r['k']} lam={r['lam']:g}{tying}",
                    "tokens": r["tokens"],
                    "per_param": r["tokens"] / n_all,
                    "per_body_param": r["tokens"] / n_body,
                    "gap_data": loss - same["summary"]["val_loss"] if same else None,
                    "gap_compute": loss - cheap["summary"]["val_loss"] if cheap else None,
                    "extra_gap_data": (
                        r["extra_val_loss"] - same["extra_val_loss"]
                        if same and "extra_val_loss" in r
                        else None
                    ),
                }
            )
    return sorted(out, key=lambda x: (x["recipe"], x["tokens"]))


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("results", nargs="+", help="compare.py results.json files")
    p.add_argument("--plot", default="", help="write the plot here (needs matplotlib)")
    p.add_argument("--recipes_plot", default="", help="write the equal-compute plot here (needs matplotlib)")
    args = p.parse_args()
    table = rows(args.results)
    fmt = lambda v: f"{v:+.4f}" if v is not None else "-"  # noqa: E731
    print(
        f"{'recipe':<26}{'tokens':>11}{'tok/param':>11}{'(non-emb)':>11}{'gap data':>10}"
        f"{'gap compute':>13}{'gap data WT103':>16}"
    )
    for r in table:
        print(
            f"{r['recipe']:<26}{r['tokens']:>11,}{r['per_param']:>11.3f}{r['per_body_param']:>11.2f}"
            f"{fmt(r['gap_data']):>10}{fmt(r['gap_compute']):>13}{fmt(r['extra_gap_data']):>16}"
        )
    for tokens, base, patch in PAPER:
        label = f"{tokens / 1e9:.0f}B"
        print(
            f"{'paper 370M restart lam=2/3':<26}{label:>11}{tokens / PAPER_PARAMS:>11.0f}{'':>11}"
            f"{math.log(patch / base):>+10.4f}{'-':>13}{'(WikiText-103)':>16}"
        )
    if args.plot or args.recipes_plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    if args.recipes_plot:
        recipes_plot(plt, table, args.recipes_plot)
    if args.plot:
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for i, recipe in enumerate(sorted({r["recipe"] for r in table})):
            pts = [r for r in table if r["recipe"] == recipe]
            for key, style, what in (
                ("gap_data", "o-", "equal data"),
                ("gap_compute", "s--", "equal compute"),
            ):
                ax.plot(
                    [r["per_param"] for r in pts],
                    [r[key] for r in pts],
                    style,
                    color=f"C{i}",
                    label=f"ours, {recipe}, {what}",
                )
        ax.plot(
            [t / PAPER_PARAMS for t, _, _ in PAPER],
            [math.log(pt / b) for _, b, pt in PAPER],
            "k^:",
            label="the paper's 370M, K=4 lam=2/3, equal data (WikiText-103)",
        )
        save(
            fig,
            ax,
            args.plot,
            xlabel="training tokens per parameter (all parameters, embeddings included)",
            ylabel="val loss gap, nats (patch - baseline)",
        )


def recipes_plot(plt, table, path):
    """The gap at equal compute against training tokens: the given runs' recipes, and section 5's."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (recipe, pts) in enumerate(SECTION5.items()):
        ax.plot(*zip(*pts), "s--", color=f"C{i}", label=f"{recipe} (paper's recipe, section 5)")
    for i, recipe in enumerate(sorted({r["recipe"] for r in table if r["gap_compute"] is not None})):
        pts = [
            (r["tokens"], r["gap_compute"])
            for r in table
            if r["recipe"] == recipe and r["gap_compute"] is not None
        ]
        ax.plot(*zip(*pts), "o-", color=f"C{i + len(SECTION5)}", label=f"{recipe} (TST-style, section 6)")
    save(
        fig,
        ax,
        path,
        xlabel="training tokens (Gutenberg, the default 7.25M-parameter model)",
        ylabel="val loss gap at equal compute, nats (patch - baseline)",
    )


def save(fig, ax, path, xlabel, ylabel):
    """Both plots: a zero line (below it the patch run is better), log x, a grid and the legend."""
    ax.axhline(0, color="gray", lw=0.8)
    ax.set(xscale="log", xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
