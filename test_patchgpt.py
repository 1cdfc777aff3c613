"""Tests for patchgpt.py (pytest, CPU). Real text comes from ../shared/data when it is there;
otherwise the tests make their own token data, so they run anywhere."""

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import patchgpt as P

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "shared")
if os.path.isdir(os.path.join(SHARED, "tiktoken_cache")):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(SHARED, "tiktoken_cache"))

TINY = P.GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32)


def tiny_train_config(data_dir, out_dir, **kw):
    base = dict(k=2, lam=0.5, tokens=16 * 16 * 20, batch_size=8, grad_accum=2, lr=3e-3, min_lr=3e-4,
                warmup_iters=2, eval_interval=5, eval_iters=2, log_interval=1, data_dir=str(data_dir),
                out_dir=str(out_dir), device="cpu", seed=7)
    base.update(kw)
    return P.TrainConfig(**base)


def tiny_cli(data_dir, out_dir, *extra):
    """The same tiny run as a command line."""
    return [sys.executable, os.path.join(HERE, "patchgpt.py"), "--data_dir", str(data_dir), "--out_dir",
            str(out_dir), "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "16",
            "--batch_size", "8", "--grad_accum", "2", "--lr", "3e-3", "--min_lr", "3e-4", "--warmup_iters", "2",
            "--eval_interval", "5", "--eval_iters", "2", "--log_interval", "1", "--device", "cpu", "--seed", "7",
            "--tokens", "2048", *extra]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """train.bin/val.bin: Tiny Shakespeare in gpt2 tokens when ../shared has it, else a made-up
    token stream with enough structure (a repeating random phrase book) that a model can learn it."""
    d = tmp_path_factory.mktemp("data")
    text_path = os.path.join(SHARED, "data", "tinyshakespeare", "input.txt")
    tokens = None
    if os.path.exists(text_path):
        try:
            import tiktoken

            enc = tiktoken.get_encoding("gpt2")
            with open(text_path, encoding="utf-8") as f:
                tokens = np.array(enc.encode_ordinary(f.read()[:200_000]), dtype=np.uint16)
        except Exception:
            tokens = None
    if tokens is None:
        rng = np.random.default_rng(0)
        phrases = rng.integers(0, 2000, size=(50, 12))
        tokens = phrases[rng.integers(0, 50, size=4000)].reshape(-1).astype(np.uint16)
    split = int(0.9 * len(tokens))
    tokens[:split].tofile(d / "train.bin")
    tokens[split:].tofile(d / "val.bin")
    return d


def run_cli(args, **kw):
    return subprocess.run(args, capture_output=True, text=True, cwd=HERE, timeout=300, **kw)


# ---------------------------------------------------------------------------------------------
# the model and the patch ops


def test_k1_loss_is_plain_cross_entropy():
    torch.manual_seed(0)
    model = P.GPT(TINY)
    tokens = torch.randint(0, 50257, (3, TINY.block_size + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    logits, loss = model(x, y, patch_size=1)
    assert logits.shape == (3, TINY.block_size, TINY.vocab_size)
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
    assert logits.shape == (2, T, TINY.vocab_size)
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
# the plan and the schedule


@pytest.mark.parametrize("K,lam", [(4, 0.67), (2, 0.5), (8, 0.8), (4, 0.0), (1, 0.5), (16, 0.25)])
def test_stage_plan(K, lam):
    tc = P.TrainConfig(k=K, lam=lam, tokens=1_000_000, batch_size=16, grad_accum=4)
    block = 64
    stages = P.plan_stages(tc, block)
    per_step = 16 * 4 * block
    assert all(s.tokens_per_step == per_step for s in stages)
    total = sum(s.tokens for s in stages)
    assert abs(total - 1_000_000) <= per_step / 2
    if K == 1 or lam == 0:
        assert [(s.name, s.K) for s in stages] == [("token", 1)]
        return
    patch, token = stages
    assert (patch.name, patch.K, token.name, token.K) == ("patch", K, "token", 1)
    assert abs(patch.tokens / total - lam) < 0.01
    # a patch step reads the same tokens through 1/K of the sequences (each K times longer)
    assert patch.micro_batch * patch.grad_accum * K == token.micro_batch * token.grad_accum == 64
    assert patch.micro_batch <= 16 and token.micro_batch <= 16
    positions = patch.tokens / K + token.tokens
    assert abs(positions / total - P.cost_factor(K, lam)) < 0.01


def test_cost_factor_formula():
    assert P.cost_factor(4, 2 / 3) == pytest.approx(0.5)
    assert P.cost_factor(1, 0.3) == pytest.approx(1.0)
    assert P.cost_factor(4, 0.0) == pytest.approx(1.0)
    assert P.cost_factor(2, 0.5) == pytest.approx(0.75)


def test_plan_splits_micro_steps_across_processes():
    tc = P.TrainConfig(k=4, lam=0.5, tokens=100_000, batch_size=4, grad_accum=8)
    one, two = P.plan_stages(tc, 32, 1), P.plan_stages(tc, 32, 2)
    for a, b in zip(one, two):
        assert a.tokens_per_step == b.tokens_per_step and a.steps == b.steps
        assert a.micro_batch * a.grad_accum == 2 * b.micro_batch * b.grad_accum
    with pytest.raises(P.UserError, match="divisible"):
        P.plan_stages(replace(tc, grad_accum=1, batch_size=3), 32)


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    tc = P.TrainConfig(lr=1e-3, min_lr=1e-4, warmup_iters=10)
    lrs = [P.get_lr(s, 100, tc) for s in range(100)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[99] == pytest.approx(1e-4)  # the last step trains at min_lr


# ---------------------------------------------------------------------------------------------
# end to end


def test_two_stage_run_learns_checkpoints_and_resumes(data_dir, tmp_path):
    out = tmp_path / "run"
    tc = tiny_train_config(data_dir, out, tokens=16 * 16 * 30)
    lines = []
    summary = P.train(TINY, tc, log=lines.append)
    hist = summary["history"]
    assert [h["stage"] for h in hist][0] == "patch" and hist[-1]["stage"] == "token"
    assert hist[-1]["val_loss"] < hist[0]["val_loss"] - 1.0  # it learned something
    assert any("val_patch_loss" in h for h in hist)
    stages = summary["stages"]
    assert [s["K"] for s in stages] == [2, 1]
    assert sum(s["tokens"] for s in stages) == summary["total"]["tokens"] == 30 * 256
    assert summary["flops_ratio"] == pytest.approx(P.cost_factor(2, 0.5), rel=0.02)
    assert any(line.startswith("cost vs token-level") for line in lines)
    # the eval log is machine-readable and matches the history
    with open(out / "log.jsonl") as f:
        assert [json.loads(line)["val_loss"] for line in f] == [h["val_loss"] for h in hist]
    ckpt = P.load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["stage_idx"] == 2 and ckpt["tokens_seen"] == 30 * 256
    # resuming a finished run changes nothing; with a larger budget allowed, it would go on
    again = P.train(TINY, replace(tc, resume=True), log=lambda *a: None)
    assert again["val_loss"] == summary["val_loss"]
    # a new run into the same out dir is refused instead of silently overwriting
    with pytest.raises(P.UserError, match="already holds a run"):
        P.train(TINY, tc, log=lambda *a: None)


def test_resumed_checkpoint_must_match_the_command(data_dir, tmp_path):
    out = tmp_path / "run"
    tc = tiny_train_config(data_dir, out, tokens=16 * 16 * 6)
    P.train(TINY, tc, log=lambda *a: None)
    for change, name in ((dict(k=4), "k="), (dict(lam=0.25), "lam="), (dict(tokens=16 * 16 * 8), "tokens=")):
        with pytest.raises(P.UserError, match=name):
            P.train(TINY, replace(tc, resume=True, **change), log=lambda *a: None)
    with pytest.raises(P.UserError, match="model.n_embd=32, this command has model.n_embd=64"):
        P.train(replace(TINY, n_embd=64), replace(tc, resume=True), log=lambda *a: None)
    other = tmp_path / "other_data"  # the same tokens in another order: other data all the same
    other.mkdir()
    np.fromfile(data_dir / "train.bin", dtype=np.uint16)[::-1].tofile(other / "train.bin")
    (other / "val.bin").write_bytes((data_dir / "val.bin").read_bytes())
    with pytest.raises(P.UserError, match="train_data="):
        P.train(TINY, replace(tc, resume=True, data_dir=str(other)), log=lambda *a: None)
    P.train(TINY, replace(tc, resume=True, tokens=16 * 16 * 8, allow_budget_change=True), log=lambda *a: None)


def test_sampling_from_a_checkpoint(data_dir, tmp_path):
    pytest.importorskip("tiktoken")
    out = tmp_path / "run"
    P.train(TINY, tiny_train_config(data_dir, out, tokens=16 * 16 * 4), log=lambda *a: None)
    try:
        P.get_encoder()
    except P.UserError:
        pytest.skip("tiktoken's gpt2 files are not available offline here")
    texts = P.sample(str(out), "ROMEO:", 2, 10, 1.0, 50, "cpu", 0, log=lambda *a: None)
    assert len(texts) == 2 and all(t.startswith("ROMEO:") and len(t) > len("ROMEO:") for t in texts)


def test_divergence_stops_with_a_message_naming_the_step(data_dir, tmp_path):
    out = tmp_path / "run"
    tc = tiny_train_config(data_dir, out, tokens=16 * 16 * 10)
    run = P.Run(TINY, tc, log=lambda *a: None)
    os.makedirs(out)
    with torch.no_grad():
        run.raw_model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(P.TrainingDiverged, match="patch stage step 1;"):
        P.run_stage(run, run.stages[0])


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    P.atomic_save({"format": "patchgpt-1", "step": 1}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        P.atomic_save({"format": "patchgpt-1", "step": 2}, path)
    monkeypatch.undo()
    assert P.load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temp file left behind


# ---------------------------------------------------------------------------------------------
# crash safety: SIGKILL a real training process at three points, resume, compare with a run that
# was never interrupted


def final_weights(out_dir):
    return P.load_checkpoint(os.path.join(out_dir, "ckpt.pt"))["model"]


def kill_when(cmd, marker):
    """Start cmd, SIGKILL it as soon as a line containing marker is printed."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=HERE,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=120)
    return proc.returncode, "".join(seen)


def test_sigkill_at_three_points_then_resume_gives_identical_weights(data_dir, tmp_path):
    args = ["--k", "2", "--lam", "0.5", "--tokens", str(16 * 16 * 60)]
    ref = tmp_path / "ref"
    done = run_cli(tiny_cli(data_dir, ref, *args))
    assert done.returncode == 0, done.stderr
    expected = final_weights(ref)
    # the patch stage has 30 steps, the token stage 30
    for name, marker in (("mid1", "patch K=2 step 7/30"), ("switch", "patch K=2 step 30/30"),
                         ("mid2", "token K=1 step 12/30")):
        out = tmp_path / name
        rc, printed = kill_when(tiny_cli(data_dir, out, *args), marker)
        assert rc == -signal.SIGKILL, f"{name}: the run ended before it was killed:\n{printed}"
        resumed = run_cli(tiny_cli(data_dir, out, *args, "--resume"))
        assert resumed.returncode == 0, resumed.stderr
        assert "resumed from" in resumed.stdout
        got = final_weights(out)
        for key in expected:
            assert torch.equal(got[key], expected[key]), f"{name}: {key} differs after resume"
        with open(out / "summary.json") as f, open(ref / "summary.json") as g:
            assert json.load(f)["val_loss"] == json.load(g)["val_loss"]


def test_ctrl_c_saves_a_checkpoint_that_resumes(data_dir, tmp_path):
    out = tmp_path / "run"
    args = ["--k", "2", "--lam", "0.5", "--tokens", str(16 * 16 * 200)]
    proc = subprocess.Popen(tiny_cli(data_dir, out, *args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=HERE, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    for line in proc.stdout:
        if "patch K=2 step 13/" in line:
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 130, rest
    assert "interrupted" in rest
    ckpt = P.load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["stage_idx"] == 0 and 13 <= ckpt["step"] < 100  # saved mid-interval, not at an eval


# ---------------------------------------------------------------------------------------------
# bad input: one line on stderr, exit code 2, nothing overwritten


def assert_refused(result, *words):
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for w in words:
        assert w in lines[0], lines[0]


def refused(capsys, cmd):
    """Run patchgpt's main() in this process (much faster than a subprocess) and return what a
    shell would see: exit code and output."""
    with pytest.raises(SystemExit) as exit_info:
        P.main(cmd[2:])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(cmd, exit_info.value.code, out, err)


def test_refusal_from_the_real_command_line(data_dir, tmp_path):
    assert_refused(run_cli(tiny_cli(data_dir, tmp_path / "o", "--k", "0")), "--k", "whole number")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags,words", [
    (["--k", "0"], ["--k", "whole number"]),
    (["--k", "2.5"], ["--k", "whole number"]),
    (["--k", "four"], ["--k"]),
    (["--lam", "1"], ["no token-level stage"]),
    (["--lam", "-0.1"], ["0 <= lam < 1"]),
    (["--lam", "1.5"], ["0 <= lam < 1"]),
    (["--k", "2,4"], ["--compare"]),
    (["--n_embd", "31"], ["divisible"]),
    (["--block_size", "100000", "--tokens", "1e9"], ["fewer than one sequence"]),
    (["--tokens", "0"], ["--tokens"]),
    (["--bogus"], ["unrecognized"]),
])
def test_bad_flags_are_refused(data_dir, tmp_path, capsys, flags, words):
    assert_refused(refused(capsys, tiny_cli(data_dir, tmp_path / "o", *flags)), *words)
    assert not (tmp_path / "o").exists()


def test_bad_data_files_are_refused(tmp_path, capsys):
    cases = {
        "missing": None,
        "empty": b"",
        "odd": b"\x01\x00\x02",
        "foreign": np.array([5, 60000, 7], dtype=np.uint16).tobytes(),
    }
    words = {"missing": "not found", "empty": "empty", "odd": "odd size", "foreign": "60000"}
    for name, content in cases.items():
        d = tmp_path / name
        d.mkdir()
        np.arange(5000, dtype=np.uint16).tofile(d / "val.bin")
        if content is not None:
            (d / "train.bin").write_bytes(content)
        assert_refused(refused(capsys, tiny_cli(d, tmp_path / f"out_{name}")), words[name])
        assert not (tmp_path / f"out_{name}").exists()


def test_bad_checkpoints_are_refused(data_dir, tmp_path, capsys):
    assert_refused(refused(capsys, tiny_cli(data_dir, tmp_path / "none", "--resume")), "no checkpoint")
    good = tmp_path / "good"
    P.main(tiny_cli(data_dir, good, "--tokens", "1024")[2:])
    capsys.readouterr()
    blob = (good / "ckpt.pt").read_bytes()
    for name, content, words in (("truncated", blob[: len(blob) // 2], "not a readable checkpoint"),
                                 ("garbage", b"hello", "not a readable checkpoint")):
        d = tmp_path / name
        d.mkdir()
        (d / "ckpt.pt").write_bytes(content)
        assert_refused(refused(capsys, tiny_cli(data_dir, d, "--resume")), words)
        assert (d / "ckpt.pt").read_bytes() == content
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    torch.save({"state_dict": {}}, foreign / "ckpt.pt")
    assert_refused(refused(capsys, tiny_cli(data_dir, foreign, "--resume")), "not a patchgpt checkpoint")
    # a different run in the out dir: refused, and the checkpoint there is untouched
    assert_refused(refused(capsys, tiny_cli(data_dir, good, "--tokens", "1024")), "already holds a run")
    assert (good / "ckpt.pt").read_bytes() == blob
    assert_refused(refused(capsys, tiny_cli(data_dir, good, "--tokens", "2048", "--resume")), "tokens=")
    assert (good / "ckpt.pt").read_bytes() == blob


# ---------------------------------------------------------------------------------------------
# compare mode


def test_compare_runs_baselines_with_the_stated_tokens(data_dir, tmp_path):
    N = 16 * 16 * 16
    tc = tiny_train_config(data_dir, tmp_path / "cmp", tokens=N)
    lines = []
    results = P.compare(TINY, tc, [2, 4], [0.5], log=lines.append)
    names = [r["name"] for r in results]
    assert names == ["baseline", "patch_k2_lam0.5", "patch_k4_lam0.5", "baseline_cost0.625", "baseline_cost0.75"]
    by = {r["name"]: r["summary"] for r in results}
    assert by["baseline"]["total"]["tokens"] == N
    assert by["baseline"]["stages"][0]["K"] == 1 and len(by["baseline"]["stages"]) == 1
    for cost in (0.625, 0.75):
        s = by[f"baseline_cost{cost:g}"]
        assert abs(s["total"]["tokens"] - cost * N) <= 256 / 2 + 1
    for K in (2, 4):
        s = by[f"patch_k{K}_lam0.5"]
        flops_rel = s["total"]["flops"] / by["baseline"]["total"]["flops"]
        assert flops_rel == pytest.approx(P.cost_factor(K, 0.5), rel=0.05)
    table = "\n".join(lines)
    assert "patch_k4_lam0.5" in table and "FLOPs" in table
    row = next(line for line in lines if line.startswith("patch_k4_lam0.5"))
    assert float(row.split()[4]) == pytest.approx(0.625, rel=0.05)  # the table's FLOPs column
    with open(tmp_path / "cmp" / "results.json") as f:
        assert [r["name"] for r in json.load(f)["results"]] == names
    # again into the same folder: refused without --resume; with it, the finished runs are reused
    with pytest.raises(P.UserError, match="already holds a run"):
        P.compare(TINY, tc, [2], [0.5], log=lambda *a: None)
    lines = []
    again = P.compare(TINY, replace(tc, resume=True), [2, 4], [0.5], log=lines.append)
    assert sum("finished earlier" in line for line in lines) == 5
    assert [r["summary"]["val_loss"] for r in again] == [r["summary"]["val_loss"] for r in results]


# ---------------------------------------------------------------------------------------------
# data parallel: two CPU processes with gloo


def ddp_worker(rank, world, port, data_dir, out_dir, result_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tc = tiny_train_config(data_dir, out_dir, batch_size=4, grad_accum=4, tokens=16 * 16 * 12)
    run = P.Run(TINY, tc, log=lambda *a: None)
    os.makedirs(out_dir, exist_ok=True)
    for stage in run.stages:
        P.run_stage(run, stage)
    torch.save({"model": run.raw_model.state_dict(), "tokens": run.tokens_seen,
                "steps": [s.steps for s in run.stages]}, os.path.join(result_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_ddp_two_processes_match_each_other_and_one_process(data_dir, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(ddp_worker, args=(2, port, str(data_dir), str(tmp_path / "ddp"), str(tmp_path)),
                                nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for key in r0["model"]:
        assert torch.equal(r0["model"][key], r1["model"][key]), key
    # one process with the same tokens per step sees the same batches: same accounting, same weights
    tc = tiny_train_config(data_dir, tmp_path / "single", batch_size=4, grad_accum=4, tokens=16 * 16 * 12)
    torch.set_num_threads(1)
    run = P.Run(TINY, tc, log=lambda *a: None)
    os.makedirs(tc.out_dir)
    for stage in run.stages:
        P.run_stage(run, stage)
    assert r0["tokens"] == run.tokens_seen and r0["steps"] == [s.steps for s in run.stages]
    single = run.raw_model.state_dict()
    for key in single:
        assert torch.allclose(single[key], r0["model"][key], atol=2e-4), key


# ---------------------------------------------------------------------------------------------
# the benchmark's plumbing (its numbers are measurements, printed, never asserted as targets)


def test_peak_tensor_memory_counts_live_storages_once():
    from bench import PeakTensorMemory

    w = torch.zeros(100, 100)
    with PeakTensorMemory(known=[w]) as mem:
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
    from bench import PeakTensorMemory

    B, T, V, K = 2, 8, 5000, 4

    def peak(loss_fn, n_targets):
        logits = torch.randn(B, T, V, requires_grad=True)
        targets = torch.randint(0, V, (B, T * n_targets))
        with PeakTensorMemory(known=[logits]) as mem:
            loss_fn(logits, targets).backward()
        return mem.peak

    def repeated(logits, targets):  # the naive version, to show the measurement would catch it
        rows = logits.repeat_interleave(K, dim=1).reshape(-1, V)
        return F.cross_entropy(rows, targets.reshape(-1))

    token_step = peak(lambda lg, tg: P.next_patch_loss(lg, tg, 1), 1)
    patch_step = peak(lambda lg, tg: P.next_patch_loss(lg, tg, K), K)
    assert patch_step <= 1.05 * token_step
    assert peak(repeated, K) > 2 * token_step


def test_bench_times_both_stages(data_dir):
    import bench

    lines = []
    tc = tiny_train_config(data_dir, "", k=4, lam=0.5)
    result = bench.bench(TINY, tc, warmup_steps=1, timed_steps=2, log=lines.append)
    token, patch = result["rows"]
    assert (token["K"], patch["K"]) == (1, 4)
    assert token["tokens_per_step"] == patch["tokens_per_step"] == 8 * 2 * 16
    assert all(r["tok_s"] > 0 and r["ms_per_step"] > 0 for r in result["rows"])
    # weights, AdamW's two moments and the gradients are alive at the peak, activations on top
    weights = sum(p.numel() * 4 for p in P.GPT(TINY).parameters()) / 2**30
    assert all(r["peak_mem_gb"] > 4 * weights for r in result["rows"])
    assert result["speedup"] == pytest.approx(patch["tok_s"] / token["tok_s"])
    assert result["run_ratio"] == pytest.approx(0.5 * token["tok_s"] / patch["tok_s"] + 0.5)
    assert any(line.startswith("whole run --k 4") for line in lines)


def test_the_gpu_script_runs_end_to_end_on_cpu(data_dir, tmp_path):
    """bench_gpu.sh is meant for a short loan of a GPU, where a typo costs the loan: dry-run it."""
    env = dict(os.environ, PYTHON=sys.executable, DEVICE="cpu", COMPILE="", DATA=str(data_dir), TOKENS="8192",
               OUT=str(tmp_path / "out"), RUNS=str(tmp_path / "runs"),
               SHAPE="--n_layer 1 --n_head 2 --n_embd 32 --block_size 16", BATCH="--batch_size 8 --grad_accum 2")
    proc = run_cli(["bash", os.path.join(HERE, "bench_gpu.sh")], env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "out")) == ["bench.json", "bench.txt", "env.txt", "k1.txt", "k4.txt",
                                                     "whole_run.txt"]
    bench_rows = json.load(open(tmp_path / "out" / "bench.json"))["rows"]
    assert [r["K"] for r in bench_rows] == [1, 4]
    assert "-> ratio" in (tmp_path / "out" / "whole_run.txt").read_text()


def test_a_separate_val_bin_is_what_gets_evaluated(data_dir, tmp_path):
    other_val = tmp_path / "other_val.bin"
    np.fromfile(data_dir / "train.bin", dtype=np.uint16)[:4000].tofile(other_val)  # a different text
    tc = tiny_train_config(data_dir, tmp_path / "a", tokens=16 * 16 * 4)
    own = P.train(TINY, tc, log=lambda *a: None)
    sep = P.train(TINY, replace(tc, out_dir=str(tmp_path / "b"), val_bin=str(other_val)), log=lambda *a: None)
    run = P.Run(TINY, replace(tc, val_bin=str(other_val)), log=lambda *a: None)
    assert len(run.val_data) == 4000
    assert sep["val_loss"] != own["val_loss"]  # same weights (same seed), another evaluation set
