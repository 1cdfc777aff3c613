"""The tables of docs/results.md sections 8 and 9 from the runs of docs/char_queue.sh: every run's final val
loss; per recipe its best learning rate against the best of its equal-compute baseline's, seed by seed; and
per cell of the vocabulary x repetition grid (runs named <cell>__<recipe>_lr<lr>_s<seed>) the same, with
where the patch stage left the loss against the unigram level of the cell's data, and the embedding's share.

  python docs/char_table.py out/chars [docs/char_grid.png]   # and the grid's gaps as a plot (matplotlib)
"""

import json
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import compare  # noqa: E402
import patchgpt as P  # noqa: E402


def load(root):
    """{(recipe, lr, seed): summary.json}; a recipe is e.g. "k2_lam0.5", or "base_c0.75" for the token-level
    runs of a patch recipe's compute (0.75 of its tokens), after "<cell>__" for a grid run."""
    runs = {}
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name, "summary.json")
        m = re.fullmatch(r"(.+)_lr([\d.e-]+)_s(\d+)", name)
        if m and os.path.exists(path):
            with open(path) as f:
                runs[m[1], float(m[2]), int(m[3])] = json.load(f)
    return runs


def switch_loss(s):
    """The token-level val loss at the end of the patch stage."""
    return [h["val_loss"] for h in s["history"] if h["stage"] == "patch"][-1]


def embedding_share(s):
    mc = P.GPTConfig(**{k: v for k, v in s["identity"].items() if k in P.GPTConfig.__dataclass_fields__})
    n = sum(p.numel() for p in P.GPT(mc).parameters())
    return mc.vocab_size * mc.n_embd / n, n


def gaps(runs):
    """Per patch recipe: its baseline, lrs tried, seeds, and the best loss of each seed for both."""
    best = {}  # (recipe, seed) -> the run with the lowest loss of the learning rates tried
    for (recipe, lr, seed), s in runs.items():
        if (recipe, seed) not in best or s["val_loss"] < best[recipe, seed]["val_loss"]:
            best[recipe, seed] = s
    for recipe in sorted({r for r, _, _ in runs if not r.rpartition("__")[2].startswith("base")}):
        cell, sep, _ = recipe.rpartition("__")
        cost = next(s["compute_cost"] for (r, _, _), s in runs.items() if r == recipe)
        baseline = f"{cell}{sep}base_c{cost:.4g}"  # the token-level runs of the same compute
        seeds = sorted(s for r, s in best if r == recipe and (baseline, s) in best)
        if seeds:
            lrs = [
                ",".join(f"{lr:g}" for lr in sorted({lr for r, lr, _ in runs if r == n}))
                for n in (recipe, baseline)
            ]
            yield recipe, cost, lrs, [best[recipe, s] for s in seeds], [best[baseline, s] for s in seeds]


def gap_cells(patch, base):
    loss = np.array([[s["val_loss"] for s in patch], [s["val_loss"] for s in base]])
    g = loss[0] - loss[1]
    spread = f" ± {g.std(ddof=1):.4f}" if len(g) > 1 else ""
    return [len(g), f"{loss[0].mean():.4f}", f"{loss[1].mean():.4f}", f"**{g.mean():+.4f}**{spread}"]


def main(root):
    runs = load(root)
    print("| run | lr | seed | positions trained | val loss |\n| --- | ---: | ---: | ---: | ---: |")
    for (recipe, lr, seed), s in sorted(runs.items()):
        positions = s["compute_cost"] * sum(s["tokens"])
        print(f"| {recipe} | {lr:g} | {seed} | {positions:,.0f} | {s['val_loss']:.4f} |")
    rows = list(gaps(runs))
    print("\n| recipe | compute | lrs tried (patch; baseline) | seeds | patch | baseline | gap |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for recipe, cost, lrs, patch, base in rows:
        if "__" not in recipe:
            print(
                "| "
                + " | ".join(map(str, [recipe, f"{cost:.4f}", "; ".join(lrs), *gap_cells(patch, base)]))
                + " |"
            )
    print(
        "\n| cell | epochs | embedding | best lr (patch; baseline) | seeds | patch | baseline | gap "
        "| at the switch | unigram |\n| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    points = {}  # (text, vocabulary) -> [(epochs, gap of each seed)] of the grid's K=2, lam=0.5 runs
    for recipe, cost, lrs, patch, base in rows:
        cell, _, name = recipe.partition("__")
        if name:
            data_dir = patch[0]["identity"]["data_dir"]
            with open(os.path.join(data_dir, "meta.json")) as f:
                epochs = sum(patch[0]["tokens"]) / json.load(f)["train_tokens"]
            share, n = embedding_share(patch[0])
            switch = np.mean([switch_loss(s) for s in patch])
            chosen = f"{patch[0]['identity']['lr']:g}; {base[0]['identity']['lr']:g}"  # seed 1337's best
            label = cell if name == "k2_lam0.5" else f"{cell} {name}"  # the grid's recipe, or another
            row = [label, f"{epochs:.2f}", f"{share:.0%} of {n / 1e6:.2f}M", chosen, *gap_cells(patch, base)]
            print(
                "| " + " | ".join(map(str, row)) + f" | {switch:.2f} | {compare.unigram_loss(data_dir):.2f} |"
            )
            if name == "k2_lam0.5":
                g = [p["val_loss"] - b["val_loss"] for p, b in zip(patch, base)]
                points.setdefault(tuple(cell.split("_")[:2]), []).append((epochs, g))
    return points


def plot(points, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"ts": "Tiny Shakespeare", "gut": "Gutenberg", "chars": "characters", "gpt2": "GPT-2 tokens"}
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for (text, vocab), pts in sorted(points.items()):
        pts.sort()
        line = ax.plot([e for e, _ in pts], [np.mean(g) for _, g in pts], "o-" if vocab == "chars" else "s--")
        for e, g in pts:
            ax.scatter([e] * len(g), g, s=10, color=line[0].get_color())
        line[0].set_label(f"{names[text]}, {names[vocab]}")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ticks = sorted({e for pts in points.values() for e, _ in pts})
    ax.set_xticks(ticks, [f"{e:.2g}" for e in ticks])
    ax.minorticks_off()
    ax.set_xlabel("epochs of the training text in a run (768,000 characters of text)")
    ax.set_ylabel("patch minus baseline, val loss (nats)")
    ax.set_title("K=2, λ=0.5 against equal compute (above 0: the baseline wins)")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")


if __name__ == "__main__":
    points = main(sys.argv[1] if len(sys.argv) > 1 else "out/chars")
    if len(sys.argv) > 2:
        plot(points, sys.argv[2])
