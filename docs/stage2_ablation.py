"""
Issue 25: why does stage 2 learn more slowly than a fresh model? (docs/results.md section 7)

Stage 1 is trained once per recipe and seed, with patchgpt's own Run and train_stages, and stopped at the
switch (its checkpoint: stage_idx 1, step 0). Each ablation then loads that checkpoint into a Run of the same
settings, changes ONE thing, and trains stage 2 with an evaluation every --eval_interval steps. A Run is built
with torch.manual_seed(seed) before its GPT, so the model a Run makes before loading the checkpoint is exactly
the token-level baseline's initial model: "reset part X" copies X's tensors from it.

  python docs/stage2_ablation.py stage1   --recipe P --seed 1337 [--sum_sqrt]
  python docs/stage2_ablation.py stage2   --recipe P --seed 1337 --change reset_blocks
  python docs/stage2_ablation.py baseline --recipe P --seed 1337 [--max_steps 300] [--tokens 5e5]
  python docs/stage2_ablation.py diag     --recipe P --seed 1337
  python docs/stage2_ablation.py table    [--plot docs/stage2_headstart.png]

patchgpt must be importable (PYTHONPATH=<checkout>). Everything goes under --root (default out/stage2).
Run it with OMP_NUM_THREADS=1: one thread, one run at a time, as section 6 did.
"""

import argparse
import ctypes
import glob
import json
import math
import os
import sys
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

import patchgpt as pg

# the two recipes of issue 25: section 5's paper recipe (restart) and section 6's best TST-style recipe (wsd)
RECIPES = {
    "P": dict(k=4, lam=0.67, schedule="restart", lr=1e-3, min_lr=1e-4, tokens_per_step=2048),
    "T": dict(k=6, lam=0.3, schedule="wsd", decay_frac=0.1, lr=2e-3, min_lr=2e-4, tokens_per_step=3072),
}

# parameter-name prefixes of the model's parts (tied: wte.weight and lm_head.weight are one tensor)
PARTS = {
    "wpe": ("transformer.wpe.",),
    "blocks": ("transformer.h.",),
    "lnf": ("transformer.ln_f.",),
    "wte": ("transformer.wte.", "lm_head."),
}

# one change at the switch each; the names are what section 7's table shows
CHANGES = {
    "none": "nothing changed",
    "reset_all": "everything reset (= a fresh model with stage 2's schedule; fresh AdamW)",
    "reset_wpe": "position embeddings reset",
    "reset_blocks": "blocks reset (attention, MLP, LayerNorms)",
    "reset_lnf": "final LayerNorm reset",
    "reset_blocks_lnf": "blocks and final LayerNorm reset",
    "reset_wte": "token embedding reset (tied: also the head)",
    "reset_wte_wpe": "both embeddings reset (blocks and final LN kept)",
    "lr_half": "stage 2 peak lr and min_lr halved",
    "no_warmup": "stage 2 without its warmup (restart)",
    "moments_kept": "stage 1's AdamW moments kept (restart)",
    "moments_reset": "a fresh AdamW at the switch (wsd)",
    "rewarmup": "a fresh AdamW and a 20-step warmup to the peak at the switch (wsd)",
    "shrink_blocks": "blocks' matrices scaled to the fresh model's norms (direction kept)",
    "reset_block0": "the first block reset (attention, MLP, LayerNorms), blocks 1-3 kept",
    "reset_blocks123": "blocks 1-3 reset, the first block kept",
    "shrink_block0": "the first block's output projections (attention and MLP) scaled by 1/8",
    "blocks_fresh_attn": "attention reset (c_attn, c_proj, ln_1), MLPs kept",
    "blocks_fresh_mlp": "MLPs reset (c_fc, c_proj, ln_2), attention kept",
}


def settings(recipe, seed, data_dir, out_dir, **over):
    mc = pg.GPTConfig()
    tc = pg.TrainConfig(
        **RECIPES[recipe],
        tokens=1_000_000,
        seed=seed,
        data_dir=data_dir,
        out_dir=out_dir,
        eval_interval=100_000,
        log_interval=1000,
        device="cpu",
        dtype="float32",
        **over,
    )
    pg.validate(mc, tc)
    return mc, tc


class Stop(Exception):
    pass


def sum_sqrt_patch_embed(tok_emb, K):
    """The sum of the K token embeddings over sqrt(K): the mean's direction with one token's norm."""
    B, L, C = tok_emb.shape
    return tok_emb.view(B, L // K, K, C).sum(dim=2) / math.sqrt(K)


def folder(a, *names):
    return os.path.join(a.root, f"{a.recipe}_s{a.seed}", *names)


def stage1_dir(a):
    return folder(a, "stage1_sumsqrt" if a.sum_sqrt else "stage1")


def quiet(msg):
    if msg.startswith("eval") or msg.startswith("plan") or msg.startswith("model"):
        print(msg, flush=True)


def cmd_stage1(a):
    """Stage 1 with patchgpt's own loop, stopped right after the switch's checkpoint."""
    if a.sum_sqrt:
        pg.patch_embed = sum_sqrt_patch_embed  # GPT.forward looks it up at call time; K=1 is unchanged
    out = stage1_dir(a)
    os.makedirs(out, exist_ok=True)
    mc, tc = settings(a.recipe, a.seed, a.data_dir, out)
    run = pg.Run(mc, tc, quiet)
    save = run.save

    def save_then_stop():
        save()
        if run.stage_idx == 1 and run.step == 0:
            raise Stop

    run.save = save_then_stop
    try:
        pg.train_stages(run)
    except Stop:
        pass
    ck = pg.load_checkpoint(os.path.join(out, "ckpt.pt"))
    print(f"switch checkpoint: stage_idx {ck['stage_idx']} step {ck['step']} tokens {ck['tokens_seen']:,}")


def part_names(state, part):
    return [n for n in state if n.startswith(PARTS[part])]


def apply_change(run, fresh, change, ck):
    """Change one thing in a Run that holds the switch checkpoint. Returns the Run's config for stage 2."""
    tc = run.tc
    sd = run.raw_model.state_dict()  # shares storage with the parameters
    reset = {
        "reset_all": list(sd),
        "reset_wpe": part_names(sd, "wpe"),
        "reset_blocks": part_names(sd, "blocks"),
        "reset_lnf": part_names(sd, "lnf"),
        "reset_blocks_lnf": part_names(sd, "blocks") + part_names(sd, "lnf"),
        "reset_wte": part_names(sd, "wte"),
        "reset_wte_wpe": part_names(sd, "wte") + part_names(sd, "wpe"),
        "reset_block0": [n for n in sd if n.startswith("transformer.h.0.")],
        "reset_blocks123": [n for n in part_names(sd, "blocks") if not n.startswith("transformer.h.0.")],
        "blocks_fresh_attn": [n for n in part_names(sd, "blocks") if ".attn." in n or ".ln_1." in n],
        "blocks_fresh_mlp": [n for n in part_names(sd, "blocks") if ".mlp." in n or ".ln_2." in n],
    }.get(change, [])
    with torch.no_grad():
        for n in reset:
            sd[n].copy_(fresh[n])
        if change == "shrink_block0":  # its writes to the stream, to the baseline's size at this loss
            for n in sd:
                if n.startswith("transformer.h.0.") and ".c_proj." in n:
                    sd[n].mul_(0.125)
        if change == "shrink_blocks":
            for n in part_names(sd, "blocks"):
                if sd[n].dim() >= 2:
                    sd[n].mul_(fresh[n].norm() / sd[n].norm())
    if change == "reset_all":
        run.optimizer = None  # a fresh model has no moments (restart makes a new AdamW anyway)
    if change == "lr_half":
        tc = replace(tc, lr=tc.lr / 2, min_lr=tc.min_lr / 2)
    if change == "no_warmup":
        assert tc.schedule == "restart"
        tc = replace(tc, warmup_iters=0)
    if change == "moments_kept":
        assert tc.schedule == "restart"
        opt = run.optimizer  # stage 1's AdamW, loaded from the checkpoint; train_stages would replace it
        run.raw_model.configure_optimizer = lambda tc, device_type: opt
    if change in ("moments_reset", "rewarmup"):
        assert tc.schedule == "wsd"
        run.optimizer = None
    return tc


def wsd_rewarmup_lr(stage1_steps, tc):
    """wsd's schedule with a warmup of tc.warmup_iters steps again from the switch."""
    get_lr = pg.get_lr

    def lr(step, total, tc_):
        s = step - stage1_steps
        if 0 <= s < tc.warmup_iters:
            return tc.lr * (s + 1) / (tc.warmup_iters + 1)
        return get_lr(step, total, tc_)

    return lr


def cmd_stage2(a):
    if a.change not in CHANGES:
        sys.exit(f"unknown change {a.change}; one of {', '.join(CHANGES)}")
    ck_dir = stage1_dir(a)
    name = a.change + ("_sumsqrt" if a.sum_sqrt else "")
    out = folder(a, "stage2", name)
    os.makedirs(out, exist_ok=True)
    ck = pg.load_checkpoint(os.path.join(ck_dir, "ckpt.pt"))
    mc, tc = settings(a.recipe, a.seed, a.data_dir, ck_dir)
    run = pg.Run(mc, tc, quiet)  # its model, before load, is the baseline's initial model
    fresh = {n: t.clone() for n, t in run.raw_model.state_dict().items()}
    run.load(ck)
    assert run.stage_idx == 1 and run.step == 0
    run.history = []
    tc2 = apply_change(run, fresh, a.change, ck)
    run.tc = replace(tc2, eval_interval=a.eval_interval)
    if a.change == "rewarmup":
        pg.get_lr = wsd_rewarmup_lr(run.stages[0].steps, run.tc)
    run.save = lambda: None  # no checkpoints: the curve is the result
    pg.train_stages(run)
    h = [dict(step=e["step"], val_loss=e["val_loss"]) for e in run.history]
    res = dict(
        recipe=a.recipe,
        seed=a.seed,
        change=a.change,
        sum_sqrt=a.sum_sqrt,
        what=CHANGES[a.change],
        stage1_steps=run.stages[0].steps,
        stage2_steps=run.stages[1].steps,
        history=h,
        final=h[-1]["val_loss"],
        lr=run.tc.lr,
        min_lr=run.tc.min_lr,
        warmup_iters=run.tc.warmup_iters,
    )
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"{a.recipe} seed {a.seed} {name}: final {res['final']:.4f}")


def cmd_baseline(a):
    """The token-level baseline (K=1) of the recipe's schedule, an evaluation every --eval_interval steps;
    --tokens 7.5e5 etc. gives an equal-compute baseline; --snap saves the weights at those steps."""
    over = {} if a.tokens is None else dict(tokens=int(a.tokens))
    tag = "baseline" if a.tokens is None else f"baseline_{int(a.tokens)}"
    out = folder(a, tag)
    os.makedirs(out, exist_ok=True)
    mc, tc = settings(a.recipe, a.seed, a.data_dir, out, **over)
    tc = replace(tc, k=1, lam=0.0, eval_interval=a.eval_interval)
    run = pg.Run(mc, tc, quiet)
    run.save = lambda: None
    evaluate = run.evaluate
    snaps = [int(s) for s in a.snap.split(",")] if a.snap else []

    def evaluate_and_maybe_stop(stage):
        evaluate(stage)
        if run.step in snaps:
            torch.save(run.raw_model.state_dict(), os.path.join(out, f"model_step{run.step}.pt"))
        h = [dict(step=e["step"], val_loss=e["val_loss"]) for e in run.history]
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(
                dict(
                    recipe=a.recipe,
                    seed=a.seed,
                    steps=run.stages[0].steps,
                    history=h,
                    complete=run.step == run.stages[0].steps,
                ),
                f,
                indent=1,
            )
        if a.max_steps and run.step >= a.max_steps:
            raise Stop

    run.evaluate = evaluate_and_maybe_stop
    try:
        pg.train_stages(run)
    except Stop:
        pass
    print(
        f"{a.recipe} seed {a.seed} {tag}: last eval step {run.history[-1]['step']} "
        f"val loss {run.history[-1]['val_loss']:.4f}"
    )


# ---------------------------------------------------------------------------------------------
# diagnostics: what the switch weights look like next to a fresh model and the baseline at the same loss


@torch.no_grad()
def probe(model, x, y, unigram):
    """Val loss, per-block residual norms and attention entropy, output entropy and KL to the unigram."""
    tr = model.transformer
    B, T = x.shape
    h = tr.wte(x) + tr.wpe(torch.arange(T))
    out = dict(
        emb_common_frac=(h.mean((0, 1)).norm() / h.norm(dim=-1).mean()).item(),
        common_frac=[],
        emb_norm=h.norm(dim=-1).mean().item(),
        tok_norm=tr.wte(x).norm(dim=-1).mean().item(),
        pos_norm=tr.wpe.weight[:T].norm(dim=-1).mean().item(),
        attn_entropy=[],
        block_norm=[],
        attn_update=[],
        mlp_update=[],
    )
    for blk in tr.h:
        C = h.shape[-1]
        q, k, v = blk.attn.c_attn(blk.ln_1(h)).split(C, dim=2)
        q, k, v = (t.view(B, T, blk.n_head, C // blk.n_head).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.shape[-1])
        att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf")).softmax(-1)
        ent = -(att * att.clamp_min(1e-12).log()).sum(-1)  # (B, nh, T)
        # entropy relative to uniform over the visible positions (1 = uniform attention)
        rel = (ent[..., 1:] / torch.log(torch.arange(2, T + 1, dtype=torch.float))).mean().item()
        out["attn_entropy"].append(rel)
        a_out = blk.attn.c_proj((att @ v).transpose(1, 2).reshape(B, T, C))
        out["attn_update"].append((a_out.norm(dim=-1) / h.norm(dim=-1)).mean().item())
        h = h + a_out
        m_out = blk.mlp(blk.ln_2(h))
        out["mlp_update"].append((m_out.norm(dim=-1) / h.norm(dim=-1)).mean().item())
        h = h + m_out
        out["block_norm"].append(h.norm(dim=-1).mean().item())
        # the part of the residual stream that is the same at every position of every sequence
        out["common_frac"].append((h.mean((0, 1)).norm() / h.norm(dim=-1).mean()).item())
    logits = model.lm_head(tr.ln_f(h))[..., : pg.GPT2_VOCAB]
    logp = F.log_softmax(logits, -1)
    p = logp.exp()
    out["val_loss"] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item()
    out["out_entropy"] = -(p * logp).sum(-1).mean().item()
    lu = unigram.log()
    out["kl_to_unigram"] = (p * (logp - lu)).sum(-1).mean().item()
    # how much the prediction depends on the context: KL of each position's distribution to their mean
    pm = p.reshape(-1, p.shape[-1]).mean(0)
    out["kl_to_mean"] = (p * (logp - pm.clamp_min(1e-30).log())).sum(-1).mean().item()
    return out


def weight_stats(sd):
    blocks = [n for n in sd if n.startswith("transformer.h.") and sd[n].dim() >= 2]
    ln = [n for n in sd if ".ln_" in n and n.endswith("weight")]
    wte = sd["transformer.wte.weight"][: pg.GPT2_VOCAB]
    return dict(
        wte_row_norm=wte.norm(dim=-1).mean().item(),
        wte_mean_norm=wte.mean(0).norm().item(),  # the common direction shared by all rows
        wpe_row_norm=sd["transformer.wpe.weight"].norm(dim=-1).mean().item(),
        blocks_matrix_norm=math.sqrt(sum(sd[n].norm().item() ** 2 for n in blocks)),
        ln_gain_mean=float(np.mean([sd[n].mean().item() for n in ln])),
        lnf_gain_mean=sd["transformer.ln_f.weight"].mean().item(),
        lnf_bias_norm=sd["transformer.ln_f.bias"].norm().item(),
    )


def grad_stats(model, x, y):
    """Gradient norm of the token loss per part on one batch: how hard stage 2 pushes each part."""
    model.zero_grad(set_to_none=True)
    _, loss = model(x, y)
    loss.backward()
    g = {}
    for part, pre in PARTS.items():
        sq = sum(p.grad.norm().item() ** 2 for n, p in model.named_parameters() if n.startswith(pre))
        g[f"grad_{part}"] = math.sqrt(sq)
    model.zero_grad(set_to_none=True)
    return g


def cmd_diag(a):
    mc, tc = settings(a.recipe, a.seed, a.data_dir, stage1_dir(a))
    torch.manual_seed(a.seed)
    fresh = pg.GPT(mc)
    train = np.memmap(os.path.join(a.data_dir, "train.bin"), dtype=np.uint16, mode="r")
    counts = np.bincount(train, minlength=pg.GPT2_VOCAB).astype(np.float64) + 0.5
    unigram = torch.tensor(counts / counts.sum(), dtype=torch.float32)
    val = np.memmap(os.path.join(a.data_dir, "val.bin"), dtype=np.uint16, mode="r")
    rng = np.random.default_rng(0)
    x, y = pg.get_batch(val, pg.batch_starts(rng, len(val), 1, mc.block_size, 32), 1, mc.block_size, "cpu")
    xt, yt = pg.get_batch(
        train, pg.batch_starts(rng, len(train), 1, mc.block_size, 16), 1, mc.block_size, "cpu"
    )
    models = {"fresh init": fresh.state_dict()}
    for tag in ("stage1", "stage1_sumsqrt"):
        p = folder(a, tag, "ckpt.pt")
        if os.path.exists(p):
            models[f"switch ({tag})"] = pg.load_checkpoint(p)["model"]
    for p in sorted(glob.glob(folder(a, "baseline", "model_step*.pt"))):
        models[f"baseline {os.path.basename(p)[6:-3]}"] = torch.load(p, weights_only=True)
    rows = {}
    for name, sd in models.items():
        m = pg.GPT(mc)
        m.load_state_dict(sd)
        m.eval()
        rows[name] = {**probe(m, x, y, unigram), **weight_stats(m.state_dict()), **grad_stats(m, xt, yt)}
        print(name, json.dumps({k: (v if isinstance(v, float) else v) for k, v in rows[name].items()}))
    with open(folder(a, "diag.json"), "w") as f:
        json.dump(rows, f, indent=1)


# ---------------------------------------------------------------------------------------------
# the table and the plot


def steps_to_reach(curve, loss):
    """Steps a curve needs to reach `loss` (the first crossing, linear between evaluations); inf if it
    never gets there (the run is ahead of the whole curve)."""
    if loss >= curve[0][1]:
        return 0.0
    for (s0, l0), (s1, l1) in zip(curve, curve[1:]):
        if l0 >= loss >= l1:
            return s0 + (l0 - loss) / (l0 - l1) * (s1 - s0) if l0 != l1 else s0
    return math.inf


def head_start(curve, h):
    return [(e["step"], steps_to_reach(curve, e["val_loss"]) - e["step"]) for e in h]


def at(hs, step):
    for s, v in hs:
        if s == step:
            return v
    return None


def fmt(v):
    if v is None:
        return "–"
    return "ahead" if v == math.inf else f"{v:+.0f}"


def cmd_table(a):
    rows = []
    for path in sorted(glob.glob(os.path.join(a.root, "*_s*", "stage2", "*", "result.json"))):
        r = json.load(open(path))
        base_dir = os.path.join(a.root, f"{r['recipe']}_s{r['seed']}")
        bpath = os.path.join(base_dir, "baseline", "result.json")
        ctrl = os.path.join(base_dir, "stage2", "reset_all", "result.json")
        bcurve = None
        if os.path.exists(bpath):
            bcurve = [(e["step"], e["val_loss"]) for e in json.load(open(bpath))["history"]]
        ccurve = (
            [(e["step"], e["val_loss"]) for e in json.load(open(ctrl))["history"]]
            if os.path.exists(ctrl)
            else None
        )
        hs_b = head_start(bcurve, r["history"]) if bcurve else []
        hs_c = head_start(ccurve, r["history"]) if ccurve else []
        eq = glob.glob(os.path.join(base_dir, "baseline_*", "result.json"))
        eq_loss = None
        for p in eq:
            e = json.load(open(p))
            if e.get("complete"):
                eq_loss = e["history"][-1]["val_loss"]
        eq_loss = EQ_KNOWN.get((r["recipe"], r["seed"]), eq_loss)
        last = r["history"][-1]["step"]
        rows.append(dict(r, hs_b=hs_b, hs_c=hs_c, eq=eq_loss, last=last))
    order = list(CHANGES)
    rows.sort(key=lambda r: (r["recipe"], r["seed"], r["sum_sqrt"], order.index(r["change"])))
    print(
        "| recipe | seed | change | head start vs baseline at token step 0 / 50 / 100 / 200 / last "
        "| vs fresh control at 0 / 50 / 100 / 200 / last | final val loss | gap, equal compute |"
    )
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        steps = [0, 50, 100, 200, r["last"]]
        b = " / ".join(fmt(at(r["hs_b"], s)) for s in steps)
        c = " / ".join(fmt(at(r["hs_c"], s)) for s in steps)
        gap = "" if r["eq"] is None else f"{r['final'] - r['eq']:+.3f}"
        name = r["change"] + (" (stage 1: sum/sqrt(K))" if r["sum_sqrt"] else "")
        print(f"| {r['recipe']} | {r['seed']} | {name} | {b} | {c} | {r['final']:.4f} | {gap} |")
    if a.plot:
        plot(rows, a.plot)


# equal-compute baselines' final val loss reused from sections 5 and 6 (seed 1337, the same settings)
EQ_KNOWN = {("P", 1337): 6.2178, ("T", 1337): 5.9084}


def plot(rows, path):
    """One figure: head start against the long baseline (left), val loss minus the fresh control's (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    controls = {}
    for r in rows:
        if r["change"] == "reset_all":
            controls[(r["recipe"], r["seed"])] = {e["step"]: e["val_loss"] for e in r["history"]}
    for r in rows:
        name = r["change"] + (" (stage 1 sum/√K)" if r["sum_sqrt"] else "") + f", seed {r['seed']}"
        style = dict(lw=1.3, ls="-" if r["seed"] == 1337 else "--")
        if r["change"] == "none" and not r["sum_sqrt"]:
            style.update(lw=2.6, color="black")
        if r["change"] == "reset_all":
            style.update(lw=2, color="gray", ls=":")
        pts = [(s, v) for s, v in r["hs_b"] if v != math.inf]
        if not pts:
            continue
        (line,) = ax1.plot(*zip(*pts), label=name, **style)
        ctrl = controls.get((r["recipe"], r["seed"]))
        if ctrl:
            d = [(e["step"], e["val_loss"] - ctrl[e["step"]]) for e in r["history"] if e["step"] in ctrl]
            rest = {k: v for k, v in style.items() if k != "color"}
            ax2.plot(*zip(*[p for p in d if p[0] >= 50]), color=line.get_color(), **rest)
    ax1.set_ylabel("head start (steps of the long token-level baseline)")
    ax2.set_ylabel("val loss minus the fresh control's at the same step (nats)")
    ax1.set_title("head start against the token-level baseline (488-step cosine)", fontsize=10)
    ax2.set_title("against a fresh model with stage 2's schedule and batches (from step 50)", fontsize=10)
    for ax in (ax1, ax2):
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xlabel("token step of stage 2")
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=7.5, ncol=2)
    fig.suptitle("Gutenberg, 1M tokens, K=4, λ=0.67, restart, lr 1e-3: one change at the switch", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("cmd", choices=["stage1", "stage2", "baseline", "diag", "table"])
    p.add_argument("--recipe", choices=list(RECIPES), default="P")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--change", default="none")
    p.add_argument("--sum_sqrt", action="store_true", help="stage 1 embeds a patch as sum/sqrt(K)")
    p.add_argument("--eval_interval", type=int, default=10)
    p.add_argument("--max_steps", type=int, default=0, help="baseline: stop after this step's evaluation")
    p.add_argument("--tokens", type=float, default=None, help="baseline: another budget (equal compute)")
    p.add_argument("--snap", default="", help="baseline: save the weights at these steps (comma list)")
    p.add_argument("--data_dir", default="data/gutenberg")
    p.add_argument("--root", default="out/stage2")
    p.add_argument("--plot", default="")
    a = p.parse_args()
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):  # patchgpt.main()'s malloc settings: keep large blocks mapped
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)
        libc.mallopt(-1, 2**31 - 1)
    {
        "stage1": cmd_stage1,
        "stage2": cmd_stage2,
        "baseline": cmd_baseline,
        "diag": cmd_diag,
        "table": cmd_table,
    }[a.cmd](a)


if __name__ == "__main__":
    main()
