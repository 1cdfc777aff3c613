"""Tests for patchgpt.py and the programs beside it (pytest, CPU). The data is the Tiny Shakespeare that
ships in assets/, tokenized with the shipped gpt2 files: nothing here needs the network or ../shared."""

import argparse
import contextlib
import hashlib
import importlib.util
import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import types
from dataclasses import fields, replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench
import compare
import guards
import patchgpt as P
import sample
from conftest import write_meta
from test_prepare_data import SHAKESPEARE_SHA256, SHAKESPEARE_TOKENS, offline_env

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = P.GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32)


def tiny_train_config(data_dir, out_dir, **kw):
    base = dict(
        k=2,
        lam=0.5,
        tokens=16 * 16 * 20,
        tokens_per_step=256,
        micro_batch=8,
        lr=3e-3,
        min_lr=3e-4,
        warmup_iters=2,
        eval_interval=5,
        eval_iters=2,
        log_interval=1,
        data_dir=str(data_dir),
        out_dir=str(out_dir),
        device="cpu",
        seed=7,
    )
    base.update(kw)
    return P.TrainConfig(**base)


def tiny_cli(data_dir, out_dir, *extra, script="patchgpt.py"):
    """The same tiny run as a command line."""
    flags = (
        "--n_layer 2 --n_head 2 --n_embd 32 --block_size 16 --tokens_per_step 256 --micro_batch 8 --lr 3e-3 "
        "--min_lr 3e-4 --warmup_iters 2 --eval_interval 5 --eval_iters 2 --log_interval 1 --device cpu "
        "--seed 7 --tokens 2048"
    ).split()
    return [
        sys.executable,
        os.path.join(HERE, script),
        "--data_dir",
        str(data_dir),
        "--out_dir",
        str(out_dir),
        *flags,
        *extra,
    ]


def run_cli(args, **kw):
    return subprocess.run(args, capture_output=True, text=True, cwd=HERE, timeout=300, **kw)


def quiet(*a):
    pass


# ---------------------------------------------------------------------------------------------
# the model and the patch ops


def test_k1_loss_is_plain_cross_entropy():
    torch.manual_seed(0)
    model = P.GPT(TINY)
    tokens = torch.randint(0, 50257, (3, TINY.block_size + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    logits, loss = model(x, y, patch_size=1)
    assert logits.shape == (3, TINY.block_size, P.VOCAB_SIZE)
    expected = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
    assert torch.allclose(loss, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("K", [2, 4])
def test_next_patch_loss_matches_a_loop_over_the_k_targets(K):
    torch.manual_seed(K)
    model = P.GPT(TINY)
    T = 8
    tokens = torch.randint(0, 50257, (2, K * (T + 1)))
    x, y = tokens[:, : K * T], tokens[:, K:]
    logits, loss = model(x, y, patch_size=K)
    assert logits.shape == (2, T, P.VOCAB_SIZE)
    # independently: for each of the K tokens of the next patch, an ordinary cross-entropy
    per_token = []
    for j in range(K):
        target_j = torch.stack([tokens[:, K * (t + 1) + j] for t in range(T)], dim=1)  # (B, T)
        per_token.append(F.cross_entropy(logits.reshape(-1, logits.size(-1)), target_j.reshape(-1)))
    assert torch.allclose(loss, torch.stack(per_token).mean(), rtol=1e-5, atol=1e-6)


def test_patch_embedding_is_the_mean_of_k_token_embeddings():
    emb = torch.randn(2, 12, 5)
    out = P.patch_embed(emb, 3)
    assert out.shape == (2, 4, 5)
    assert torch.allclose(out[1, 2], (emb[1, 6] + emb[1, 7] + emb[1, 8]) / 3, atol=1e-6)
    assert torch.equal(P.patch_embed(emb, 1), emb)  # K=1: the token embeddings themselves


def test_permuting_tokens_inside_a_patch_leaves_logits_unchanged():
    torch.manual_seed(1)
    model = P.GPT(TINY).eval()
    K, T = 4, 6
    x = torch.randint(0, 50257, (2, K * T))
    perm = x.view(2, T, K)[:, :, torch.tensor([2, 0, 3, 1])].reshape(2, K * T)
    assert not torch.equal(perm, x)
    a, _ = model(x, patch_size=K)
    b, _ = model(perm, patch_size=K)
    assert torch.allclose(a, b, atol=1e-5)


def test_changing_a_later_patch_leaves_earlier_logits_unchanged():
    torch.manual_seed(2)
    model = P.GPT(TINY).eval()
    K, T, t = 4, 6, 2
    x = torch.randint(0, 50257, (1, K * T))
    x2 = x.clone()
    x2[0, K * (t + 1) : K * (t + 2)] = (x2[0, K * (t + 1) : K * (t + 2)] + 1) % 50257  # patch t+1
    a, _ = model(x, patch_size=K)
    b, _ = model(x2, patch_size=K)
    assert torch.allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-6)
    assert not torch.allclose(a[:, t + 1], b[:, t + 1], atol=1e-4)


def test_untied_embeddings_are_two_matrices_that_train_apart(data_dir, tmp_path):
    tied, untied = P.GPT(TINY), P.GPT(replace(TINY, untied=True))
    n_tied = sum(p.numel() for p in tied.parameters())
    assert sum(p.numel() for p in untied.parameters()) == n_tied + P.VOCAB_SIZE * TINY.n_embd
    for mc, name in ((TINY, "tied"), (replace(TINY, untied=True), "untied")):
        P.train(mc, tiny_train_config(data_dir, tmp_path / name, tokens=16 * 16 * 4), log=quiet)
        weights = final_weights(tmp_path / name)
        same = torch.equal(weights["transformer.wte.weight"], weights["lm_head.weight"])
        assert same == (name == "tied"), name


def test_batches_target_is_the_window_shifted_by_k():
    data = np.arange(1000, dtype=np.uint16)
    rng = np.random.default_rng(0)
    for K in (1, 2, 4):
        starts = P.batch_starts(rng, len(data), K, 10, 50)
        assert starts.max() + (10 + 1) * K <= len(data)  # the last patch's target fits
        x, y = P.get_batch(data, starts, K, 10, "cpu")
        assert x.shape == y.shape == (50, 10 * K)
        assert torch.equal(y, x + K)
        assert torch.equal(x[:, 0], torch.from_numpy(starts.astype(np.int64)))


# ---------------------------------------------------------------------------------------------
# the plan and the schedules


@pytest.mark.parametrize("K,lam", [(4, 0.67), (2, 0.5), (8, 0.8), (4, 0.0), (1, 0.5), (16, 0.25)])
def test_stage_plan(K, lam):
    tc = P.TrainConfig(k=K, lam=lam, tokens=1_000_000, tokens_per_step=16 * 4 * 64, micro_batch=16)
    block = 64
    stages = P.plan_stages(tc, block)
    per_step = 16 * 4 * block
    assert all(s.tokens_per_step == per_step for s in stages)
    total = sum(s.steps * s.tokens_per_step for s in stages)
    assert abs(total - 1_000_000) <= per_step / 2
    if K == 1 or lam == 0:  # the baseline, whichever way it is asked for
        assert (tc.k, tc.lam) == (1, 0.0) and [(s.name, s.K) for s in stages] == [("token", 1)]
        return
    patch, token = stages
    assert (patch.name, patch.K, token.name, token.K) == ("patch", K, "token", 1)
    assert abs(patch.steps * per_step / total - lam) < 0.01
    # a patch step reads the same tokens through 1/K of the sequences (each K times longer)
    assert patch.micro_batch * patch.grad_accum * K == token.micro_batch * token.grad_accum == 64
    assert patch.micro_batch <= 16 and token.micro_batch <= 16


def test_the_paper_s_two_stages_cost_lam_over_k_plus_1_minus_lam(data_dir):
    """The FLOPs the code computes give the paper's formula, to whole steps, for its two stages."""
    for K, lam in ((4, 0.67), (2, 0.5), (8, 0.3), (1, 0.0)):
        run = P.Run(TINY, tiny_train_config(data_dir, "", k=K, lam=lam, tokens=16 * 16 * 16), log=quiet)
        steps = [s.steps for s in run.stages]
        assert guards.plan_cost(run.stages, run.flops) == pytest.approx(
            (steps[0] / K + sum(steps[1:])) / sum(steps)
        )
        assert guards.plan_cost(run.stages, run.flops) == pytest.approx(lam / K + 1 - lam, abs=0.02)


def test_plan_splits_micro_steps_across_processes():
    tc = P.TrainConfig(k=4, lam=0.5, tokens=100_000, tokens_per_step=4 * 8 * 32, micro_batch=4)
    one, two = P.plan_stages(tc, 32, 1), P.plan_stages(tc, 32, 2)
    for a, b in zip(one, two):
        assert a.tokens_per_step == b.tokens_per_step and a.steps == b.steps
        assert a.micro_batch * a.grad_accum == 2 * b.micro_batch * b.grad_accum
    with pytest.raises(
        guards.UserError, match="--tokens_per_step must be a multiple of K x block_size x processes"
    ):
        P.plan_stages(replace(tc, tokens_per_step=3 * 32), 32, 2)


def test_cosine_schedule_warms_up_then_decays_to_min_lr():
    tc = P.TrainConfig(lr=1e-3, min_lr=1e-4, warmup_iters=10)
    lrs = [P.get_lr(s, 100, tc) for s in range(100)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[99] == pytest.approx(1e-4)  # the last step trains at min_lr


def test_wsd_schedule_holds_the_peak_then_decays_linearly_over_the_last_fraction():
    tc = P.TrainConfig(lr=1e-3, min_lr=1e-4, warmup_iters=10, schedule="wsd", decay_frac=0.2)
    lrs = [P.get_lr(s, 100, tc) for s in range(100)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))
    assert lrs[10:80] == [pytest.approx(1e-3)] * 70  # stable: the last 20 steps decay
    steps = np.diff(lrs[79:])
    assert np.allclose(steps, steps[0]) and steps[0] < 0  # a straight line down
    assert lrs[99] == pytest.approx(1e-4)
    assert P.get_lr(99, 100, replace(tc, decay_frac=0.0)) == pytest.approx(1e-4)  # at least the last step


@pytest.mark.parametrize("schedule", ["restart", "global", "wsd"])
def test_the_switch_keeps_or_restarts_the_optimizer_and_the_schedule(data_dir, tmp_path, schedule):
    tc = tiny_train_config(
        data_dir, tmp_path / schedule, schedule=schedule, tokens=64 * 12, tokens_per_step=64, micro_batch=4
    )
    lines = []
    P.train(TINY, tc, log=lines.append)
    logged = [float(line.split("| lr ")[1].split()[0]) for line in lines if "| lr " in line]
    patch, token = P.plan_stages(tc, TINY.block_size)
    if schedule == "restart":  # the paper: each stage its own warmup and cosine, and a fresh AdamW
        lrs = [P.get_lr(s, patch.steps, tc) for s in range(patch.steps)]
        lrs += [P.get_lr(s, token.steps, tc) for s in range(token.steps)]
        adam_steps = token.steps
    else:  # one schedule over both stages, one AdamW that keeps its moments across the switch
        lrs = [P.get_lr(s, patch.steps + token.steps, tc) for s in range(patch.steps + token.steps)]
        adam_steps = patch.steps + token.steps
    assert logged == [pytest.approx(lr, rel=1e-2) for lr in lrs]  # log_interval 1: every step's lr
    state = guards.load_checkpoint(os.path.join(tc.out_dir, "ckpt.pt"))["optimizer"]["state"]
    assert all(s["step"] == adam_steps for s in state.values())


# ---------------------------------------------------------------------------------------------
# end to end


def test_two_stage_run_learns_checkpoints_and_resumes(data_dir, tmp_path):
    out = tmp_path / "run"
    tc = tiny_train_config(data_dir, out, tokens=16 * 16 * 30)
    lines = []
    summary = P.train(TINY, tc, log=lines.append)
    hist = summary["history"]
    assert hist[0]["stage"] == "patch" and hist[-1]["stage"] == "token"
    assert hist[-1]["val_loss"] < hist[0]["val_loss"] - 1.0  # it learned something
    assert summary["stages"] == ["patch", "token"] and sum(summary["tokens"]) == 30 * 256
    assert summary["compute_cost"] == 0.75 and summary["measured_cost"] > 0
    assert any(line.startswith("cost vs token-level") for line in lines)
    assert any("tok/s | ETA" in line for line in lines)
    with open(out / "summary.json") as f:
        assert json.load(f)["val_loss"] == summary["val_loss"]
    ckpt = guards.load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["stage_idx"] == 2 and ckpt["tokens_seen"] == 30 * 256
    # resuming a finished run trains nothing and reports the same
    again = P.train(TINY, replace(tc, resume=True), log=quiet)
    assert again["val_loss"] == summary["val_loss"] and again["history"] == hist
    # a new run into the same out dir is refused instead of silently overwriting
    with pytest.raises(guards.UserError, match="holds a run"):
        P.train(TINY, tc, log=quiet)


def stop_at(monkeypatch, stage_name, steps_done):
    """A SIGTERM to this process during the step after steps_done of that stage, as a job scheduler would
    send it: the run saves at the end of the step, and train() raises KeyboardInterrupt."""
    train_step = P.Run.train_step

    def signalled(run, stage, lr):
        if (stage.name, run.step) == (stage_name, steps_done):
            os.kill(os.getpid(), signal.SIGTERM)
        return train_step(run, stage, lr)

    monkeypatch.setattr(P.Run, "train_step", signalled)


def test_resumed_checkpoint_must_match_the_command(data_dir, tmp_path, monkeypatch):
    whole = tiny_train_config(data_dir, tmp_path / "whole", tokens=16 * 16 * 6)  # 3 patch, 3 token steps
    done = P.train(TINY, whole, log=quiet)
    out = tmp_path / "run"
    tc = replace(whole, out_dir=str(out))
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):  # stopped mid-run, after 2 steps
        stop_at(m, "patch", 1)
        P.train(TINY, tc, log=quiet)
    other = tmp_path / "other_data"  # the same tokens elsewhere: another --data_dir all the same
    other.mkdir()
    for name in ("train.bin", "val.bin", "meta.json"):
        (other / name).write_bytes((data_dir / name).read_bytes())
    for change, words in (
        (dict(k=4), "--k 2, not 4"),
        (dict(lam=0.25), "--lam 0.5, not 0.25"),
        (dict(tokens=16 * 16 * 8), "--tokens 1536, not 2048"),
        (dict(dtype="bfloat16"), "--dtype float32, not bfloat16"),
        (dict(schedule="wsd"), "--schedule restart, not wsd"),
        (dict(data_dir=str(other)), "--data_dir"),
    ):
        with pytest.raises(guards.UserError, match=words):
            P.train(TINY, replace(tc, resume=True, **change), log=quiet)
    with pytest.raises(guards.UserError, match="--n_embd 32, not 64"):
        P.train(replace(TINY, n_embd=64), replace(tc, resume=True), log=quiet)
    with pytest.raises(guards.UserError, match="--untied False, not True"):
        P.train(replace(TINY, untied=True), replace(tc, resume=True), log=quiet)
    # what changes neither the weights nor the evaluation may change, mid-run: the intervals, and --device
    # and --compile (the checkpoint made as on a GPU with --compile, resumed here on the CPU without)
    path = out / "ckpt.pt"
    ckpt = guards.load_checkpoint(str(path))
    assert (ckpt["stage_idx"], ckpt["step"]) == (0, 2)
    ckpt["train_config"].update(device="cuda", compile=True)
    torch.save(ckpt, path)
    lines = []
    resumed = P.train(TINY, replace(tc, resume=True, log_interval=2, eval_interval=7), log=lines.append)
    assert f"resumed from {path}: stage 1, step 2" in lines
    # a progress line every 2nd step and at a stage's end
    progress = [line.split(" | ")[0] for line in lines if " | tokens " in line]
    assert progress == ["patch K=2 step 3/3", "token K=1 step 2/3", "token K=1 step 3/3"]
    assert resumed["history"] == done["history"]  # on a CPU: bit for bit
    got, expected = final_weights(out), final_weights(whole.out_dir)
    assert all(torch.equal(got[key], weights) for key, weights in expected.items())


# ---------------------------------------------------------------------------------------------
# the guarantees, each with every command-line flag turned on: a learner's new flag is checked, no new test

# 4 steps of 4 sequences of characters (fast: no 50304-row embedding), 2 of them at K=2, a checkpoint
# after each
FLAG_BASE = dict(
    k=2, lam=0.5, tokens=4 * 64, tokens_per_step=64, micro_batch=4, eval_interval=1, eval_iters=1
)
# flags whose runs start from other weights by design: another shape, another seed, a matrix of its own
OTHER_START = ("block_size", "n_layer", "n_embd", "seed", "untied")


def flags_on(data_dir, tmp_path):
    """(flag, model config, train config) of the tiny run FLAG_BASE with each command-line flag that sets what
    a run trains turned on: the other bool, the last other choice, twice an integer (1 for 0), half a float
    (0.5 for 0). A flag of another type needs a value in `paths` here."""
    other = tmp_path / "other_data"  # the same tokens in another folder
    other.mkdir(exist_ok=True)
    for name in ("train.bin", "val.bin", "meta.json"):
        (other / name).write_bytes((data_dir / name).read_bytes())
    paths = {"data_dir": str(other), "val_bin": str(data_dir / "train.bin")}
    mc, tc = TINY, tiny_train_config(data_dir, "", **FLAG_BASE)
    runs = []
    for f in fields(P.GPTConfig) + fields(P.TrainConfig):
        if f.metadata.get("help") is None or f.name in guards.RESUMABLE:  # not a flag, or where it runs
            continue
        model = f in fields(P.GPTConfig)
        value = getattr(mc if model else tc, f.name)
        if f.metadata["choices"]:
            on = [c for c in f.metadata["choices"] if c != value][-1]
        elif f.type is bool:
            on = not value
        elif f.type is int:
            on = 2 * value or 1
        elif f.type is float:
            on = value / 2 or 0.5
        else:
            assert f.name in paths, f"--{f.name}: give it a value that turns it on in flags_on()"
            on = paths[f.name]
        if model:
            runs.append((f.name, replace(mc, **{f.name: on}), tc))
        else:
            runs.append((f.name, mc, replace(tc, **{f.name: on})))
    return runs


def test_every_run_of_a_seed_starts_from_the_same_weights(char_dir, tmp_path):
    """compare.py's fairness rests on it: with any flag on, a patch run and its K=1 baseline differ in their
    training alone; and a flag's run starts where the default K=1 run starts, but for another shape, seed or
    matrix. A module made for one K or stage alone, or drawn before the GPT, shifts the seed's random
    stream."""
    default = P.Run(TINY, tiny_train_config(char_dir, "", k=1), log=quiet).raw_model.state_dict()
    for name, mc, tc in flags_on(char_dir, tmp_path):
        patch, baseline = P.Run(mc, tc, log=quiet), P.Run(mc, replace(tc, k=1), log=quiet)
        start, base = patch.raw_model.state_dict(), baseline.raw_model.state_dict()
        assert all(torch.equal(start[key], base[key]) for key in start.keys() & base.keys()), name
        if name not in OTHER_START:
            same = [key for key in start.keys() & default.keys() if start[key].shape == default[key].shape]
            assert all(torch.equal(start[key], default[key]) for key in same), name
        for run in (patch, baseline):  # what a user sees of it: the same val loss at step 0
            run.evaluate(run.stages[0])
        assert patch.history[0]["val_loss"] == baseline.history[0]["val_loss"], name


def count_steps(monkeypatch):
    """Run.train_step counted from outside, whatever it does: the FLOPs of each call, in order."""
    steps = []
    train_step = P.Run.train_step

    def counted(run, stage, lr):  # attention's math kernel is matmuls, which the counter counts
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            loss = train_step(run, stage, lr)
        steps.append(counter.get_total_flops())
        return loss

    monkeypatch.setattr(P.Run, "train_step", counted)
    return steps


@pytest.fixture(scope="module")
def flag_runs(char_dir, tmp_path_factory):
    """Each run of flags_on() trained once, for the tests that share it: (flag, model config, train config,
    summary, printed lines, the FLOPs of each train_step call)."""
    root = tmp_path_factory.mktemp("flags")
    runs = []
    with pytest.MonkeyPatch.context() as monkeypatch, one_thread():  # one: as the killed runs
        steps = count_steps(monkeypatch)
        for name, mc, tc in flags_on(char_dir, root):
            steps.clear()
            lines = []
            tc = replace(tc, out_dir=str(root / name))
            summary = P.train(mc, tc, log=lines.append)
            runs.append((name, mc, tc, summary, lines, list(steps)))
    return runs


def assert_cost_is_what_the_steps_computed(summary, lines, steps, tc):
    """The cost printed and saved is the FLOPs of the run's optimizer steps (the last calls counted: any
    made before training are not the run's) against as many token-level steps."""
    n = round(sum(summary["tokens"]) / tc.tokens_per_step)
    trained = steps[-n:]
    assert summary["compute_cost"] == pytest.approx(sum(trained) / (n * trained[-1]), rel=1e-9)
    assert f"compute vs token-level training: {summary['compute_cost']:.3f}" in lines[0]
    assert f"compute {summary['compute_cost']:.3f}," in lines[-2]
    return trained


def test_the_reported_cost_is_the_compute_the_run_did(flag_runs):
    """Counted in FLOPs in every optimizer step, with each flag on: a learner who adds work (a second forward,
    K heads) or changes the plan (a third stage) gets it in the printed cost, summary.json and compare.py's
    equal-compute baseline without a new formula."""
    for name, mc, tc, summary, lines, steps in flag_runs:
        trained = assert_cost_is_what_the_steps_computed(summary, lines, steps, tc)
        token_step = trained[-1]  # a token-level step: the last stage's
        # compare.py's equal-compute baseline of this run: as many token-level steps as its FLOPs buy
        lists = {"k": [tc.k], "lam": [tc.lam], "schedule": [tc.schedule]}
        tokens = next(n for run, *_, n in compare.plan_runs(mc, tc, lists) if "_cost" in run)
        baseline = P.plan_stages(replace(tc, k=1, tokens=tokens), mc.block_size)
        assert abs(baseline[0].steps * token_step - sum(trained)) <= token_step / 2, name


def test_counting_the_cost_leaves_the_run_as_it_was(data_dir):
    """The count makes a real step of each stage, on a copy: the run's weights, gradients, batches and
    random stream are those of a run that never counted."""
    tc = tiny_train_config(data_dir, "", k=4)
    run = P.Run(TINY, tc, log=quiet)
    after_run = torch.get_rng_state()
    fresh = P.make_model(run.mc, tc)
    assert torch.equal(after_run, torch.get_rng_state())  # as if only the model had been made
    assert all(torch.equal(w, fresh.state_dict()[k]) for k, w in run.raw_model.state_dict().items())
    assert all(p.grad is None for p in run.raw_model.parameters())
    assert run.rng.bit_generator.state == np.random.default_rng(tc.seed).bit_generator.state


def test_work_added_to_train_step_outside_forward_backward_is_in_the_cost(data_dir, tmp_path, monkeypatch):
    """A learner's extra pass written in train_step after its micro-batches: in the patch stage, a
    token-level forward and backward of the first block_size tokens of each sequence. K=4, lam=0.5 then
    costs 0.5 x (1/4 + 1/4) + 0.5 = 0.75 of token-level training, not the plan's 0.625."""
    train_step = P.Run.train_step

    def with_extra_pass(run, stage, lr):
        loss = train_step(run, stage, lr)
        if stage.K > 1:
            x = torch.zeros((stage.micro_batch * stage.grad_accum, run.mc.block_size), dtype=torch.long)
            run.raw_model(x, x)[1].backward()
            run.raw_model.zero_grad(set_to_none=True)
        return loss

    monkeypatch.setattr(P.Run, "train_step", with_extra_pass)
    steps = count_steps(monkeypatch)
    lines = []
    tc = tiny_train_config(data_dir, tmp_path / "run", k=4, tokens=16 * 16 * 8)
    summary = P.train(TINY, tc, log=lines.append)
    assert_cost_is_what_the_steps_computed(summary, lines, steps, tc)
    assert summary["compute_cost"] == pytest.approx(0.75, abs=0.01)


@contextlib.contextmanager
def one_thread():
    """Torch on one thread in this block, as in another process that ran on one: a run's bits depend on
    its thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)  # or every later test would run on one


def killed_run(mc, tc):
    """A run of flags_on() in a process of its own, killed with SIGKILL after its second optimizer step,
    before that step's checkpoint; on one thread and attention's math kernel, as the shared runs."""
    after_step = P.Run.after_step

    def killed(run, i, stage, loss, lr):
        if run.tokens_seen == 2 * run.tc.tokens_per_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return after_step(run, i, stage, loss, lr)

    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as monkeypatch:
        count_steps(monkeypatch)
        monkeypatch.setattr(P.Run, "after_step", killed)
        P.train(mc, tc, log=quiet)


def test_every_flag_s_run_killed_and_resumed_ends_as_if_never_stopped(flag_runs):
    """Exact resume with each flag on: its run killed mid-stage and resumed ends with the uninterrupted run's
    weights and evaluations, bit for bit. A flag that keeps state outside the checkpoint (a schedule, a
    module made at the switch, a random draw) fails here."""
    # each killed run is forked from a server that imported this module once (no second of imports a run)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["test_patchgpt"])
    killed_runs = [replace(tc, out_dir=tc.out_dir + "_killed") for _, _, tc, *_ in flag_runs]
    processes = [
        context.Process(target=killed_run, args=(mc, k)) for (_, mc, *_), k in zip(flag_runs, killed_runs)
    ]
    processes[0].start()
    for i, (name, mc, tc, *_) in enumerate(flag_runs):
        if i + 1 < len(processes):
            processes[i + 1].start()  # the next run goes on while this process resumes this one
        killed = killed_runs[i]
        processes[i].join(timeout=300)
        assert processes[i].exitcode == -signal.SIGKILL, f"{name}: not killed ({processes[i].exitcode})"
        with pytest.MonkeyPatch.context() as monkeypatch, one_thread():  # as the shared runs
            count_steps(monkeypatch)
            resumed = P.train(mc, replace(killed, resume=True), log=quiet)
        got, expected = final_weights(killed.out_dir), final_weights(tc.out_dir)
        assert all(torch.equal(got[key], weights) for key, weights in expected.items()), name
        with open(os.path.join(tc.out_dir, "summary.json")) as f:
            assert resumed["history"] == json.load(f)["history"], name


# the settings of the tiny run FLAG_BASE as a checkpoint of this version (2026-12) holds them, but its folder
OLD_SETTINGS = (
    '{"block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32, "untied": false}',
    '{"k": 2, "lam": 0.5, "tokens": 256, "tokens_per_step": 64, "micro_batch": 4, "lr": 0.003, '
    '"min_lr": 0.0003, "warmup_iters": 2, "schedule": "restart", "decay_frac": 0.2, "weight_decay": 0.1, '
    '"grad_clip": 1.0, "eval_interval": 1, "eval_iters": 1, "log_interval": 1, "val_bin": "", '
    '"out_dir": "", "device": "cpu", "dtype": "float32", "compile": false, "seed": 7, "resume": false, '
    '"overwrite": false}',
)


def test_a_checkpoint_from_before_a_new_flag_resumes_while_the_flag_keeps_its_default(data_dir, tmp_path):
    """A learner adds a flag whose default is the old behaviour, or changes a flag: the checkpoints made
    before resume as long as the flag stays at its default, and are refused by its name otherwise."""
    # the run FLAG_BASE as its command line gives it: each setting has its flag's type
    args = tiny_cli(data_dir, tmp_path / "run", *[f"--{name}={value}" for name, value in FLAG_BASE.items()])
    mc, tc = P.configs(P.build_parser().parse_args(args[2:]))
    done = P.train(mc, tc, log=quiet)
    path = os.path.join(tc.out_dir, "ckpt.pt")
    ckpt = guards.load_checkpoint(path)
    old = [json.loads(text) for text in OLD_SETTINGS]
    old[1]["data_dir"] = str(data_dir)
    defaults = {f.name: f.default for f in fields(P.GPTConfig) + fields(P.TrainConfig)}
    older = [{k: v for k, v in c.items() if v != defaults[k]} for c in old]  # before the flags now at default
    for model_config, train_config in (old, older):  # made by this version, and by one before its flags
        torch.save(dict(ckpt, model_config=model_config, train_config=train_config), path)
        assert P.train(mc, replace(tc, resume=True), log=quiet)["val_loss"] == done["val_loss"]
    for name, mc_on, tc_on in flags_on(data_dir, tmp_path):
        if name not in {**older[0], **older[1]}:  # a flag that did not exist then, turned on
            with pytest.raises(guards.UserError, match=f"made with --{name} "):
                P.train(mc_on, replace(tc_on, resume=True, out_dir=tc.out_dir), log=quiet)
    # a flag whose type changed: 2 and '2' print alike, so the types are named
    torch.save(dict(ckpt, train_config=dict(ckpt["train_config"], k="2")), path)
    with pytest.raises(guards.UserError, match=r"made with --k '2' \(str\), not 2 \(int\)"):
        P.train(mc, replace(tc, resume=True), log=quiet)


def test_a_checkpoint_that_does_not_fit_the_model_is_one_line(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    P.main(tiny_cli(data_dir, out, "--tokens", "1024")[2:])
    ckpt = guards.load_checkpoint(str(out / "ckpt.pt"))
    model = ckpt["model"]
    for key, weights in (  # saved by a model with an extra module, without one, with another shape
        ("patch_proj.weight", {**model, "patch_proj.weight": torch.zeros(32, 64)}),
        ("transformer.ln_f.bias", {k: v for k, v in model.items() if k != "transformer.ln_f.bias"}),
        ("lm_head.weight", {**model, "lm_head.weight": torch.zeros(3, 3)}),
    ):
        torch.save(dict(ckpt, model=weights), out / "ckpt.pt")
        result = refused(capsys, tiny_cli(data_dir, out, "--tokens", "1024", "--resume"))
        assert_refused(result, "the checkpoint does not fit this model", key)
        result = refused(capsys, [sys.executable, "sample.py", "--out_dir", str(out)])
        assert_refused(result, "does not fit this model", key)
    # sample.py builds the model its checkpoint's settings describe: one it does not know is one line too
    torch.save(dict(ckpt, model_config=dict(ckpt["model_config"], n_experts=4)), out / "ckpt.pt")
    assert_refused(refused(capsys, [sys.executable, "sample.py", "--out_dir", str(out)]), "n_experts")


def test_sampling_from_a_checkpoint(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    P.train(TINY, tiny_train_config(data_dir, out, tokens=16 * 16 * 4), log=quiet)

    def samples(*flags):  # python sample.py --out_dir OUT --prompt ROMEO: --num_samples 2 ... FLAGS
        cmd = ["--out_dir", str(out), "--prompt", "ROMEO:", "--num_samples", "2", "--max_new_tokens", "10"]
        P.main([*cmd, "--device", "cpu", *flags], parser=sample.build_parser(), action=sample.run)
        texts = capsys.readouterr().out.split("\n" + "-" * 40 + "\n")  # each sample, then a rule
        assert texts.pop() == "" and len(texts) == 2
        assert all(t.startswith("ROMEO:") and len(t) > len("ROMEO:") for t in texts)
        return texts

    first = samples("--seed", "0")
    assert first[0] != first[1] and samples("--seed", "0") == first != samples("--seed", "1")
    # --top_k 1: the likeliest token every time, whatever the seed; so does a temperature near 0 (this
    # barely trained model's likeliest tokens lead the next by 0.007 or more: 70 nats at 1e-4)
    greedy = samples("--seed", "0", "--top_k", "1")
    assert greedy[0] == greedy[1] == samples("--seed", "1", "--top_k", "1")[0] and greedy != first
    assert (
        samples("--seed", "0", "--temperature", "1e-4")
        == greedy
        == samples("--seed", "1", "--temperature", "1e-4")
    )


def test_sampling_never_draws_a_padding_id():
    """ids 50257..50303 only pad the embedding table; tiktoken cannot decode them."""
    model = P.GPT(TINY).eval()
    with torch.no_grad():
        model.lm_head.weight[guards.GPT2_VOCAB :] = 0
        model.transformer.ln_f.bias.fill_(1.0)
        model.transformer.ln_f.weight.zero_()
        model.lm_head.weight[guards.GPT2_VOCAB :, 0] = 100.0  # the padding ids have by far the highest logits
    logits, _ = model(torch.zeros(1, 1, dtype=torch.long))
    assert logits[0, -1].argmax() >= guards.GPT2_VOCAB
    out = sample.generate(model, torch.zeros(4, 1, dtype=torch.long), 20, temperature=1.0, top_k=None)
    assert out.max() < guards.GPT2_VOCAB


def test_divergence_stops_before_any_save(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_loss = P.next_patch_loss
    monkeypatch.setattr(P, "next_patch_loss", lambda *args, **kwargs: real_loss(*args, **kwargs) * np.nan)
    with pytest.raises(guards.UserError, match="non-finite loss by patch step 1;"):
        P.train(TINY, tiny_train_config(data_dir, out, tokens=16 * 16 * 10), log=quiet)
    assert os.listdir(out) == []


# ---------------------------------------------------------------------------------------------
# crash safety: SIGKILL a real training process at three points, resume, compare with a run that
# was never interrupted


def final_weights(out_dir):
    return guards.load_checkpoint(os.path.join(out_dir, "ckpt.pt"))["model"]


def start(cmd):
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=HERE,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )


def kill_when(cmd, marker, sig=signal.SIGKILL):
    """Start cmd, send it sig as soon as a line containing marker is printed; returns (code, output)."""
    proc, seen = start(cmd), []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            proc.send_signal(sig)
            break
    seen.append(proc.stdout.read())
    return proc.wait(timeout=120), "".join(seen)


KILL_ARGS = ["--k", "2", "--lam", "0.5", "--tokens", str(16 * 16 * 40)]  # 20 patch steps, then 20 token steps


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory):
    """The run that the killed and resumed ones must reproduce bit for bit, made on an idle machine."""
    ref = tmp_path_factory.mktemp("reference")
    done = run_cli(tiny_cli(data_dir, ref, *KILL_ARGS))
    assert done.returncode == 0, done.stderr
    return ref


@pytest.fixture
def busy_machine():
    """A CPU-bound process beside the test, as on a shared machine: it used to change some results."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    yield
    hog.kill()
    hog.wait()


def assert_same_run(out, ref):
    got, expected = final_weights(out), final_weights(ref)
    for key in expected:
        assert torch.equal(got[key], expected[key]), f"{key} differs"
    with open(out / "summary.json") as f, open(ref / "summary.json") as g:
        a, b = json.load(f), json.load(g)
        assert a["val_loss"] == b["val_loss"] and a["history"] == b["history"]


def test_the_same_command_gives_the_same_weights_on_a_busy_machine(
    data_dir, tmp_path, reference_run, busy_machine
):
    done = run_cli(tiny_cli(data_dir, tmp_path / "again", *KILL_ARGS))
    assert done.returncode == 0, done.stderr
    assert_same_run(tmp_path / "again", reference_run)


@pytest.mark.parametrize(
    "marker,load",
    [
        ("patch K=2 step 7/20 ", None),
        ("patch K=2 step 20/20 ", "busy_machine"),  # the switch, with a CPU-bound process beside it
        ("token K=1 step 12/20 ", None),
    ],
)
def test_sigkill_then_resume_gives_identical_weights(
    data_dir, tmp_path, reference_run, request, marker, load
):
    if load:
        request.getfixturevalue(load)
    out = tmp_path / "run"
    rc, printed = kill_when(tiny_cli(data_dir, out, *KILL_ARGS), marker)
    assert rc == -signal.SIGKILL, f"the run ended before it was killed:\n{printed}"
    resumed = run_cli(tiny_cli(data_dir, out, *KILL_ARGS, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    assert_same_run(out, reference_run)


def test_ctrl_c_and_sigterm_save_a_checkpoint_that_resumes(data_dir, tmp_path, reference_run):
    """Ctrl-C in the patch stage, then SIGTERM in the resumed run's token stage: each saves at the end of
    the step it came in, without evaluating (torchrun's kill would not wait), and the run ends as if
    never stopped."""
    out = tmp_path / "run"
    cmd = tiny_cli(data_dir, out, *KILL_ARGS)
    for i, (sig, stage, at) in enumerate(
        ((signal.SIGINT, "patch K=2", 13), (signal.SIGTERM, "token K=1", 12))
    ):
        rc, printed = kill_when(cmd, f"{stage} step {at}/", sig)
        assert rc == 130, printed
        assert f"interrupted; {out}/ckpt.pt continues with --resume" in printed
        ckpt = guards.load_checkpoint(str(out / "ckpt.pt"))
        step = ckpt["step"]
        after = printed[printed.index(f"{sig.name}: saving a checkpoint at the end of this step") :]
        first = next(line for line in after.splitlines() if " | tokens " in line)  # the step it came in
        assert ckpt["stage_idx"] == i and first.startswith(f"{stage} step {step}/20 "), after
        # no evaluation at the stop: the last is an earlier step's, and one due now is the resumed run's
        assert [h["step"] for h in ckpt["history"] if stage.startswith(h["stage"])][-1] < step
        assert ckpt["eval_due"] == (step % 5 == 0)
        cmd = tiny_cli(data_dir, out, *KILL_ARGS, "--resume")
    resumed = run_cli(cmd)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr
    assert_same_run(out, reference_run)


def test_ctrl_c_before_the_first_checkpoint_says_so(data_dir, tmp_path, capsys, monkeypatch):
    def interrupted(self, stage):
        raise KeyboardInterrupt

    old = tmp_path / "old"  # --overwrite: the old run's checkpoint is not this run's to resume
    P.train(TINY, tiny_train_config(data_dir, old, tokens=16 * 16 * 4), log=quiet)
    monkeypatch.setattr(P.Run, "evaluate", interrupted)
    for out, extra in ((tmp_path / "o", ()), (old, ("--overwrite",))):
        result = refused(capsys, tiny_cli(data_dir, out, *extra), code=130)
        assert "before the first checkpoint, so there is nothing to resume" in result.stderr
        assert not (out / "ckpt.pt").exists()


def test_stale_temp_files_of_a_killed_save_are_removed(data_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt.pt.tmp4242").write_bytes(b"half a checkpoint")
    P.train(TINY, tiny_train_config(data_dir, out, tokens=16 * 16 * 4), log=quiet)
    assert sorted(os.listdir(out)) == ["ckpt.pt", "summary.json"]


# ---------------------------------------------------------------------------------------------
# bad input: one line on stderr, exit code 2, nothing overwritten


def assert_refused(result, *words, code=2):
    assert result.returncode == code, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for w in words:
        assert w in lines[0], lines[0]


def refused(capsys, cmd, code=2):
    """Run the program's main() in this process (much faster than a subprocess) and return what a
    shell would see: exit code and output."""
    programs = {"patchgpt.py": P, "compare.py": compare, "sample.py": sample, "bench.py": bench}
    module = programs[os.path.basename(cmd[1])]
    parser = module.build_parser()
    parser.prog = os.path.basename(cmd[1])
    with pytest.raises(SystemExit) as exit_info:
        P.main(cmd[2:], parser=parser, action=None if module is P else module.run)
    out, err = capsys.readouterr()
    result = subprocess.CompletedProcess(cmd, exit_info.value.code, out, err)
    assert_refused(result, code=code)
    return result


def test_refusal_from_the_real_command_line(data_dir, tmp_path):
    assert_refused(run_cli(tiny_cli(data_dir, tmp_path / "o", "--k", "0")), "--k must be in [1, 1024], got 0")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--k", "0"], ["--k must be in [1, 1024], got 0"]),
        (["--k", "2.5"], ["--k", "must be an integer, got 2.5"]),
        (["--k", "four"], ["--k", "invalid integer value"]),
        (["--k", "2,4"], ["--k"]),
        (["--lam", "1"], ["--lam must be in [0, 1), got 1"]),
        (["--lam", "-0.1"], ["--lam", "[0, 1)"]),
        (["--lam", "nan"], ["--lam", "got nan"]),
        (["--lr", "0"], ["--lr", "(0, 10]"]),
        (["--min_lr", "-1"], ["--min_lr", "[0, --lr 0.003]"]),
        (["--min_lr", "nan"], ["--min_lr"]),
        (["--min_lr", "0.01"], ["--min_lr must be in [0, --lr 0.003], got 0.01"]),
        (["--warmup_iters", "-1"], ["--warmup_iters"]),
        (["--tokens", "0"], ["--tokens"]),
        (["--tokens", "1e20"], ["--tokens", "1e14"]),
        (["--tokens", "inf"], ["--tokens"]),
        (["--decay_frac", "2"], ["--decay_frac"]),
        (["--micro_batch", "0"], ["--micro_batch"]),
        (["--tokens_per_step", "100"], ["--tokens_per_step must be a multiple of K x block_size"]),
        (["--schedule", "linear"], ["--schedule", "invalid choice"]),
        (["--n_embd", "31"], ["--n_embd must be a multiple of --n_head 2"]),
        (["--n_head", "0"], ["--n_head must be in [1, 1000], got 0"]),
        (["--lam", "0.001"], ["leaves no step for the patch stage"]),
        (
            ["--block_size", "65536", "--tokens_per_step", "262144", "--tokens", "1e9"],
            ["fewer than one sequence"],
        ),
        (["--device", "gpu7"], ["--device gpu7", "no such device"]),
        (["--device", "cuda:3"], ["--device cuda:3", "no such device"]),
        (["--resume", "--overwrite"], ["pass one"]),
        (["--bogus"], ["unrecognized"]),
    ],
)
def test_bad_flags_are_refused(data_dir, tmp_path, capsys, flags, words):
    assert_refused(refused(capsys, tiny_cli(data_dir, tmp_path / "o", *flags)), *words)
    assert not (tmp_path / "o").exists()


def test_bad_data_files_are_refused(tmp_path, capsys):
    cases = {
        "missing": None,
        "empty": b"",
        "odd": b"\x01\x00\x02",
        "foreign": np.array([5, 60000, 7] * 100, dtype=np.uint16).tobytes(),
        "padding id": np.array([5, 50300, 7] * 100, dtype=np.uint16).tobytes(),
    }
    words = {
        "missing": "not found",
        "empty": "not uint16 tokens",
        "odd": "not uint16 tokens",
        "foreign": "60000 >= 50257",
        "padding id": "50300 >= 50257",
    }
    for name, content in cases.items():
        d = tmp_path / name
        d.mkdir()
        np.arange(5000, dtype=np.uint16).tofile(d / "val.bin")
        write_meta(d)
        if content is not None:
            (d / "train.bin").write_bytes(content)
        assert_refused(refused(capsys, tiny_cli(d, tmp_path / f"out_{name}")), words[name])
        assert not (tmp_path / f"out_{name}").exists()


def test_an_out_dir_that_is_a_file_or_a_full_disk_is_one_line(data_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("not a folder")
    assert_refused(refused(capsys, tiny_cli(data_dir, tmp_path / "afile")), "afile")
    assert (tmp_path / "afile").read_text() == "not a folder"
    # the disk fills up after the first checkpoint (at the switch): one line, and that checkpoint stays
    # as it was, with no temp file beside it
    real_open, opened = open, []

    def disk_fills(path, mode="r", **kw):
        if "w" not in mode:  # a read (the data's meta.json) finds the disk as it is
            return real_open(path, mode, **kw)
        opened.append(path)
        return real_open(path if len(opened) == 1 else "/dev/full", mode)

    monkeypatch.setattr(guards, "open", disk_fills, raising=False)
    assert_refused(
        refused(capsys, tiny_cli(data_dir, tmp_path / "full")),
        "No space left on device",
        f"while writing {tmp_path / 'full' / 'ckpt.pt'}",
    )
    ckpt = guards.load_checkpoint(str(tmp_path / "full" / "ckpt.pt"))
    assert (ckpt["stage_idx"], ckpt["step"], len(opened)) == (1, 0, 2)
    assert os.listdir(tmp_path / "full") == ["ckpt.pt"]


def test_bad_checkpoints_are_refused(data_dir, tmp_path, capsys):
    assert_refused(
        refused(capsys, tiny_cli(data_dir, tmp_path / "none", "--resume")),
        "no checkpoint",
        "run without --resume",
    )
    good = tmp_path / "good"
    P.main(tiny_cli(data_dir, good, "--tokens", "1024")[2:])
    capsys.readouterr()
    blob = (good / "ckpt.pt").read_bytes()
    for name, content in (("truncated", blob[: len(blob) // 2]), ("garbage", b"hello")):
        d = tmp_path / name
        d.mkdir()
        (d / "ckpt.pt").write_bytes(content)
        assert_refused(refused(capsys, tiny_cli(data_dir, d, "--resume")), "not a checkpoint of this")
        assert (d / "ckpt.pt").read_bytes() == content
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    torch.save({"state_dict": {}}, foreign / "ckpt.pt")
    assert_refused(refused(capsys, tiny_cli(data_dir, foreign, "--resume")), "not a checkpoint of this")
    # a different run in the out dir: refused, and the checkpoint there is untouched
    assert_refused(refused(capsys, tiny_cli(data_dir, good, "--tokens", "1024")), "holds a run")
    assert (good / "ckpt.pt").read_bytes() == blob
    assert_refused(
        refused(capsys, tiny_cli(data_dir, good, "--tokens", "2048", "--resume")), "--tokens 1024, not 2048"
    )
    assert (good / "ckpt.pt").read_bytes() == blob


def test_help_shows_every_flag_with_its_default(capsys):
    for module in (P, compare, bench, sample):
        with pytest.raises(SystemExit):
            module.build_parser().parse_args(["--help"])
        text = capsys.readouterr().out
        assert "(default: )" not in text and "None" not in text, module.__name__
    P.build_parser().print_help()
    text = " ".join(capsys.readouterr().out.split())
    assert "--lam LAM fraction of the tokens trained at patch level, in [0, 1) (default: 0.67)" in text
    assert "--tokens_per_step TOKENS_PER_STEP tokens per optimizer step in both stages" in text
    assert (
        "--untied separate input and output embedding matrices" in text
        and "default: out/k{K}_lam{lam}" in text
    )


def test_ctrl_c_while_sampling_claims_no_checkpoint(data_dir, tmp_path, capsys, monkeypatch):
    P.train(TINY, tiny_train_config(data_dir, tmp_path, tokens=16 * 16 * 4), log=quiet)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sample, "generate", interrupted)
    result = refused(capsys, [sys.executable, "sample.py", "--out_dir", str(tmp_path)], code=130)
    assert result.stderr.strip() == "sample: error: interrupted"


def test_sample_refusals(tmp_path, capsys):
    cmd = [sys.executable, "sample.py", "--out_dir", str(tmp_path)]
    assert_refused(refused(capsys, cmd), "no checkpoint", "train one first")
    assert_refused(refused(capsys, cmd + ["--temperature", "0"]), "--temperature > 0")


# ---------------------------------------------------------------------------------------------
# compare.py


def test_compare_runs_baselines_with_the_stated_tokens(data_dir, tmp_path):
    N = 64 * 16  # 16 steps of 4 sequences
    tc = tiny_train_config(data_dir, "unused", tokens=N, tokens_per_step=64, micro_batch=4)
    lists = {"k": [2, 4], "lam": [0.5], "schedule": ["restart"]}
    root = str(tmp_path / "cmp")
    lines = []
    results = compare.compare(TINY, tc, lists, root, log=lines.append)
    names = [r["name"] for r in results]
    assert names == [
        "baseline",
        "patch_k2_lam0.5",
        "patch_k4_lam0.5",
        "baseline_cost0.625",
        "baseline_cost0.75",
    ]
    by = {r["name"]: r["summary"] for r in results}
    assert sum(by["baseline"]["tokens"]) == N and by["baseline"]["stages"] == ["token"]
    for cost in (0.625, 0.75):
        assert abs(sum(by[f"baseline_cost{cost:g}"]["tokens"]) - cost * N) <= 64 / 2 + 1
    row = next(line for line in lines if line.startswith("patch_k4_lam0.5"))
    assert float(row.split()[4]) == pytest.approx(0.625, rel=0.05)  # the compute column
    gap = by["patch_k4_lam0.5"]["val_loss"] - by["baseline_cost0.625"]["val_loss"]
    assert row.split()[-1] == f"{gap:+.4f}"  # the equal-compute gap
    with open(tmp_path / "cmp" / "results.json") as f:
        assert [r["name"] for r in json.load(f)["results"]] == names
    # again into the same folder: refused without --resume; with it, the finished runs are reused
    with pytest.raises(guards.UserError, match="holds a run"):
        compare.compare(TINY, tc, lists, root, log=quiet)
    lines = []
    other = str(data_dir / "train.bin")  # another text to evaluate on, as WikiText-103 test would be
    again = compare.compare(TINY, replace(tc, resume=True), lists, root, lines.append, extra_val_bin=other)
    assert sum("finished earlier" in line for line in lines) == 5
    assert [r["summary"]["val_loss"] for r in again] == [r["summary"]["val_loss"] for r in results]
    assert "extra ppl" in lines[-len(results) - 2] and all(
        r["extra_val_loss"] != r["summary"]["val_loss"] for r in again
    )
    run = P.Run(TINY, replace(tc, val_bin=other), log=quiet)  # the same windows a --val_bin run would use
    run.raw_model.load_state_dict(guards.load_checkpoint(os.path.join(root, "baseline", "ckpt.pt"))["model"])
    run.evaluate(run.stages[-1])
    assert again[0]["extra_val_loss"] == run.history[-1]["val_loss"]


def test_compare_plans_schedule_families_and_drops_repeats(data_dir):
    args = argparse.Namespace(k="4,2,4", lam="0.5", schedule="restart,global,wsd,wsd")
    lists = compare.parse_lists(args)
    assert lists == {"k": [4, 2], "lam": [0.5], "schedule": ["restart", "global", "wsd"]}
    tc = tiny_train_config(data_dir, "", tokens=64 * 16, tokens_per_step=64)
    runs = compare.plan_runs(TINY, tc, lists)
    names = [r[0] for r in runs]
    assert len(names) == len(set(names))
    # restart and global share their one-stage baselines (the same run); wsd has its own
    assert {n for n in names if "baseline" in n} == {
        f"{p}baseline{c}" for p in ("", "wsd_") for c in ("", "_cost0.625", "_cost0.75")
    }
    assert {n for n in names if "patch" in n} == {
        f"{p}patch_k{k}_lam0.5" for p in ("", "global_", "wsd_") for k in (4, 2)
    }
    assert all(s == "wsd" for n, s, *_ in runs if n.startswith("wsd_"))


def test_compare_refuses_a_bad_list_value_before_training(data_dir, tmp_path, capsys):
    cmd = tiny_cli(data_dir, tmp_path / "cmp", "--k", "2,0", script="compare.py")
    assert_refused(refused(capsys, cmd), "--k must be in [1, 1024], got 0")
    assert not (tmp_path / "cmp").exists()


@pytest.fixture(scope="module")
def compare_cli(data_dir, tmp_path_factory):
    """`python compare.py --k 2 --lam 0.5` with other patchgpt.py flags (the tiny model, --untied, --seed,
    --tokens, ...), run once for the tests below: (its --out_dir, what it printed)."""
    root = tmp_path_factory.mktemp("compare") / "cmp"
    cmd = tiny_cli(
        data_dir, root, "--k", "2", "--lam", "0.5", "--tokens", "1024", "--untied", script="compare.py"
    )
    printed = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")  # main() sets it line-buffered
    with contextlib.redirect_stdout(printed):
        P.main(cmd[2:], parser=compare.build_parser(), action=compare.run)
    printed.flush()
    return root, printed.buffer.getvalue().decode()


def test_compare_command_line_passes_flags_through_and_reports(compare_cli):
    root, printed = compare_cli
    with open(root / "results.json") as f:
        results = json.load(f)["results"]
    names = ["baseline", "patch_k2_lam0.5", "baseline_cost0.75"]
    assert [r["name"] for r in results] == names
    assert [sum(r["summary"]["tokens"]) for r in results] == [1024, 1024, 768]
    for r in results:  # every run trained with the flags given, not with patchgpt.py's defaults
        ckpt = guards.load_checkpoint(str(root / r["name"] / "ckpt.pt"))
        config = {**ckpt["model_config"], **ckpt["train_config"]}
        assert config["n_layer"] == 2 and config["n_embd"] == 32 and config["untied"], r["name"]
        given = dict(seed=7, lr=3e-3, eval_iters=2, tokens_per_step=256, warmup_iters=2)
        assert {key: config[key] for key in given} == given, r["name"]
    header = next(i for i, line in enumerate(printed.splitlines()) if line.startswith("run "))
    table = printed.splitlines()[header : header + 4]
    assert table[0].split()[:4] == ["run", "tokens", "val", "loss"] and "gap same compute" in table[0]
    for line, r in zip(table[1:], results):  # a row per run, with its tokens and final val loss
        summary = r["summary"]
        assert line.split()[:3] == [r["name"], f"{sum(summary['tokens']):,}", f"{summary['val_loss']:.4f}"]
    gap = results[1]["summary"]["val_loss"] - results[2]["summary"]["val_loss"]
    assert table[2].split()[-1] == f"{gap:+.4f}"  # the patch run against its equal-compute baseline
    if importlib.util.find_spec("matplotlib") is None:  # optional: the plot is left out, and it says so
        assert "matplotlib is not installed: no plot" in printed and not (root / "compare.png").exists()


def test_compare_draws_compare_png(compare_cli):
    if importlib.util.find_spec("matplotlib") is None:  # CI installs it (.ci/run), and runs this test
        (pytest.fail if os.environ.get("CI") else pytest.skip)("matplotlib (optional) is not installed")
    import matplotlib.image

    root, printed = compare_cli
    assert f"wrote {root / 'compare.png'}" in printed
    image = matplotlib.image.imread(root / "compare.png")
    assert image.shape == (528, 1320, 4)  # 12 x 4.8 inches at 110 dpi
    # each run's curves in its own colour, matplotlib's first three: more pixels than its legend entry
    # (about 50), which was all there was of them when losses above the unigram's put the curves off the plot
    for colour in ((0.12, 0.47, 0.71), (1.0, 0.5, 0.05), (0.17, 0.63, 0.17)):
        assert (np.abs(image[..., :3] - colour).max(axis=-1) < 0.02).sum() > 300, colour


# ---------------------------------------------------------------------------------------------
# the benchmark's plumbing (its numbers are measurements, printed, never asserted as targets)


def test_peak_tensor_memory_counts_live_storages_once():
    w = torch.zeros(100, 100)
    with bench.PeakTensorMemory(known=[w]) as mem:
        a = torch.ones(1000, 1000)  # 4 MB
        view = a[:10].t()  # a view: no new storage
        b = a * 2  # 4 MB more
        del a, view
        c = b + 1  # a's storage is gone: 8 MB alive again, the peak stays where it was
        del b
    assert mem.peak == w.nbytes + 2 * c.nbytes
    assert mem.now == w.nbytes + c.nbytes


def test_next_patch_loss_never_copies_the_logits_k_times():
    """Peak memory of the loss and its backward at K=4 is that of K=1 on the same logits; a loss that
    repeated each row K times (the naive way to score K targets) would be seen as K times bigger."""
    B, T, V, K = 2, 8, 5000, 4

    def peak(loss_fn, n_targets):
        logits = torch.randn(B, T, V, requires_grad=True)
        targets = torch.randint(0, V, (B, T * n_targets))
        with bench.PeakTensorMemory(known=[logits]) as mem:
            loss_fn(logits, targets).backward()
        return mem.peak

    def repeated(logits, targets):  # the naive version, to show the measurement would catch it
        rows = logits.repeat_interleave(K, dim=1).reshape(-1, V)
        return F.cross_entropy(rows, targets.reshape(-1))

    token_step = peak(lambda lg, tg: P.next_patch_loss(lg, tg, 1), 1)
    patch_step = peak(lambda lg, tg: P.next_patch_loss(lg, tg, K), K)
    assert patch_step <= 1.05 * token_step
    assert peak(repeated, K) > 2 * token_step


def test_bench_times_both_stages(data_dir, capsys, monkeypatch):
    """A clock that a token step moves by 1 s and a patch step by 0.25 s (4x the speed, ideal at K=4):
    the speeds, the speed-up and a whole run's time are then known exactly."""
    clock = [0.0]
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    train_step = P.Run.train_step

    def timed(run, stage, lr):
        clock[0] += 1.0 if stage.K == 1 else 0.25
        return train_step(run, stage, lr)

    monkeypatch.setattr(P.Run, "train_step", timed)
    lines = []
    tc = tiny_train_config(data_dir, "", k=4, lam=0.5)
    result = bench.bench(TINY, tc, warmup_steps=1, timed_steps=2, log=lines.append)
    token, patch = result["rows"]
    assert (token["K"], patch["K"]) == (1, 4)
    assert token["tokens_per_step"] == patch["tokens_per_step"] == 256
    assert (token["ms_per_step"], token["tok_s"]) == (1000.0, 256.0)  # the timed steps alone
    assert (patch["ms_per_step"], patch["tok_s"]) == (250.0, 1024.0)
    # weights, AdamW's two moments and the gradients are alive at the peak, activations on top
    weights = sum(p.numel() * 4 for p in P.GPT(TINY).parameters()) / 2**30
    assert all(r["peak_mem_gb"] > 4 * weights for r in result["rows"])
    assert (result["speedup"], result["run_ratio"]) == (4.0, 0.625)  # half the tokens 4x as fast
    assert "speed-up over the token stage: 4.00x (ideal K = 4)" in lines[-2]
    assert lines[-1].startswith("whole run --k 4 --lam 0.5: wall time 0.625 of token-level training")
    cmd = tiny_cli(data_dir, "", "--timed_steps", "0", script="bench.py")
    assert_refused(refused(capsys, cmd), "--timed_steps >= 1")


def test_the_gpu_script_runs_end_to_end_on_cpu(data_dir, tmp_path):
    """bench_gpu.sh is meant for a short loan of a GPU, where a typo costs the loan: dry-run it. Its stop
    in step 3 waits for the signal, so a CPU of any speed passes (checked with the signal sent 20 s late)."""
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        DEVICE="cpu",
        COMPILE="",
        DATA=str(data_dir),
        TOKENS="2048",
        OUT=str(tmp_path / "out"),
        RUNS=str(tmp_path / "runs"),
        SHAPE="--n_layer 1 --n_head 2 --n_embd 32 --block_size 16",
        BATCH="--tokens_per_step 256 --micro_batch 8",
        # 16 token steps: more than the lines the stopped run's output socket holds
        SMALL="--n_layer 1 --n_head 2 --n_embd 32 --block_size 16 --tokens 6144 --tokens_per_step 128 "
        "--eval_iters 1",
    )
    proc = run_cli(["bash", os.path.join(HERE, "bench_gpu.sh")], env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "out")) == [
        "bench.json",
        "bench.txt",
        "env.txt",
        "k1.txt",
        "k4.txt",
        "resume.txt",
        "whole_run.txt",
    ]
    bench_rows = json.load(open(tmp_path / "out" / "bench.json"))["rows"]
    assert [r["K"] for r in bench_rows] == [1, 4]
    assert "-> ratio" in (tmp_path / "out" / "whole_run.txt").read_text()
    whole, resumed, resumed_final = (tmp_path / "out" / "resume.txt").read_text().splitlines()
    assert resumed.startswith("resumed from") and "stage 2" in resumed  # stopped in the token stage
    assert resumed_final == whole and whole.startswith("final token-level val loss")  # a CPU: bit for bit


def test_a_separate_val_bin_is_what_gets_evaluated(data_dir, tmp_path):
    other_val = tmp_path / "other_val.bin"
    np.fromfile(data_dir / "train.bin", dtype=np.uint16)[:4000].tofile(other_val)  # a different text
    write_meta(tmp_path)
    tc = tiny_train_config(data_dir, tmp_path / "run", tokens=16 * 16 * 4, val_bin=str(other_val))
    summary = P.train(TINY, tc, log=quiet)

    def evaluation(val_bin):  # of the run's final weights, on that file ("": data_dir/val.bin)
        run = P.Run(TINY, replace(tc, val_bin=val_bin), log=quiet)
        run.raw_model.load_state_dict(final_weights(tc.out_dir))
        run.evaluate(run.stages[-1])
        return run.history[-1]["val_loss"]

    assert summary["val_loss"] == evaluation(str(other_val)) != evaluation("")


# ---------------------------------------------------------------------------------------------
# the first run of a new user: no network, no tiktoken cache, only what ships with the project


def test_default_run_and_sampling_work_offline_from_a_fresh_folder(tmp_path):
    """No network, nothing in tiktoken's cache: `python patchgpt.py` prepares the shipped Tiny Shakespeare
    into the same tokens as ever (the one test that tokenizes all of it), trains, and sample.py samples."""
    offline = dict(offline_env(tmp_path), PYTHONUNBUFFERED="1")
    small = [
        "--n_layer",
        "1",
        "--n_head",
        "2",
        "--n_embd",
        "32",
        "--block_size",
        "32",
        "--tokens_per_step",
        "128",
        "--micro_batch",
        "4",
        "--tokens",
        "4096",
        "--eval_iters",
        "1",
        "--device",
        "cpu",
    ]
    cmd = [sys.executable, os.path.join(HERE, "patchgpt.py"), "--k", "4", "--lam", "0.67", *small]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=offline, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "preparing Tiny Shakespeare" in run.stdout and "final token-level val loss" in run.stdout
    data = tmp_path / "data" / "tinyshakespeare"
    assert sorted(os.listdir(data)) == ["meta.json", "train.bin", "val.bin"]
    for split in ("train", "val"):  # what prepare_data.py made of it before its rewrite
        assert hashlib.sha256((data / f"{split}.bin").read_bytes()).hexdigest() == SHAKESPEARE_SHA256[split]
    assert json.loads((data / "meta.json").read_text()) == {
        "tokenizer": "gpt2",
        "vocab_size": 50257,
        "eot_token": 50256,
        "dtype": "uint16",
        "train_tokens": SHAKESPEARE_TOKENS["train"],
        "val_tokens": SHAKESPEARE_TOKENS["val"],
        "source": "assets/tinyshakespeare.txt.gz",
        "val_source": None,
        "val_frac": 0.1,
    }
    assert "train: 301,966 tokens" in run.stdout and "val: 36,060 tokens" in run.stdout
    assert os.listdir(offline["TIKTOKEN_CACHE_DIR"]) == []  # nothing downloaded, nothing copied there
    cmd = [
        sys.executable,
        os.path.join(HERE, "sample.py"),
        "--prompt",
        "ROMEO:",
        "--num_samples",
        "1",
        "--max_new_tokens",
        "5",
        "--device",
        "cpu",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=offline, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ROMEO:")  # and no note about a checkpoint without token-level training
