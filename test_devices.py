"""The GPU-, Mac- and torchrun-shaped paths of patchgpt.py, run on a CPU (pytest): torch.compile, bf16
autocast, the device choices that need no hardware to check, and DDP with two gloo processes as
torchrun would start them. What needs a GPU itself is measured by bench_gpu.sh, not tested here."""

import contextlib
import errno
import io
import math
import os
import signal
import socket
import time
import types
from dataclasses import replace

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import bench
import guards
import patchgpt as P
from test_patchgpt import TINY, final_weights, one_thread, quiet, tiny_cli, tiny_train_config

# ---------------------------------------------------------------------------------------------
# --compile and --dtype bfloat16


def test_compile_makes_one_graph_per_stage_and_trains_as_eager(data_dir, tmp_path, monkeypatch):
    # aot_eager traces and compiles like the default inductor, without generating and building C code
    counter = CompileCounterWithBackend("aot_eager")
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend=counter, **kw))
    torch._dynamo.reset()
    tc = tiny_train_config(data_dir, tmp_path / "compiled", compile=True, tokens=16 * 16 * 12)
    compiled = P.train(TINY, tc, log=quiet)
    assert counter.frame_count == 2  # the patch stage's shape, then the token stage's: no graph breaks
    eager = P.train(TINY, replace(tc, compile=False, out_dir=str(tmp_path / "eager")), log=quiet)
    # whole lists, not a zip: a compiled run that evaluated less often would pass a zip
    assert [(h["stage"], h["step"]) for h in compiled["history"]] == [
        (h["stage"], h["step"]) for h in eager["history"]
    ]
    assert [h["val_loss"] for h in compiled["history"]] == pytest.approx(
        [h["val_loss"] for h in eager["history"]], abs=1e-4
    )


def test_the_first_step_of_each_stage_is_left_out_of_its_time(data_dir, tmp_path, monkeypatch):
    """With --compile a stage's first step compiles, for seconds to minutes on a GPU: counted in, it made
    a tiny run's measured cost 2.5 against a compute of 0.75. Here a clock that steps takes 1 s, and
    the first of each stage 100 s."""
    clock = [0.0]
    monkeypatch.setattr(guards, "time", types.SimpleNamespace(time=lambda: clock[0]))
    train_step = P.Run.train_step

    def compiles_first(run, stage, lr):
        clock[0] += 100.0 if run.step == 0 else 1.0
        return train_step(run, stage, lr)

    monkeypatch.setattr(P.Run, "train_step", compiles_first)
    summary = P.train(TINY, tiny_train_config(data_dir, tmp_path, tokens=16 * 16 * 12), log=quiet)
    assert summary["time"] == [5.0, 5.0]  # 6 steps a stage, the first not timed
    assert summary["tok_s"] == [256.0, 256.0] and summary["measured_cost"] == 1.0


def test_bfloat16_on_cpu_gives_bf16_logits_a_float32_loss_and_trains(data_dir, tmp_path):
    tc = tiny_train_config(data_dir, tmp_path, dtype="bfloat16", tokens=16 * 16 * 30)
    run = P.Run(TINY, tc, log=quiet)
    x, y = P.get_batch(run.train_data, [0, 500], 2, TINY.block_size, "cpu")
    with run.ctx:
        logits, loss = run.raw_model(x, y, patch_size=2)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    history = P.train(TINY, tc, log=quiet)["history"]
    assert history[-1]["val_loss"] < history[0]["val_loss"] - 1.0


# ---------------------------------------------------------------------------------------------
# device choices, checked without the hardware


def test_float32_runs_with_no_autocast_at_all(monkeypatch):
    """On mps even a disabled autocast raised with torch 2.3-2.4 (every default run on a Mac died), and
    warns with some later versions: float32 must not make one."""

    def unsupported(device_type, *args, **kwargs):
        raise RuntimeError(f"User specified an unsupported autocast device_type '{device_type}'")

    monkeypatch.setattr(torch, "autocast", unsupported)
    with guards.autocast("mps", "float32"):
        pass
    with pytest.raises(RuntimeError, match="unsupported autocast"):
        guards.autocast("mps", "bfloat16")


@pytest.mark.parametrize(
    "capability,dtype", [((7, 0), "float32"), ((7, 5), "float32"), ((8, 0), "bfloat16"), ((9, 0), "bfloat16")]
)
def test_auto_dtype_is_bf16_only_on_gpus_that_compute_it_natively(monkeypatch, capability, dtype):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert guards.resolve_dtype(P.TrainConfig(device="auto")).dtype == dtype  # V100 7.0, T4 7.5, A100 8.0
    assert guards.resolve_dtype(P.TrainConfig(device="cpu")).dtype == "float32"


def test_adamw_is_fused_on_gpus_and_a_resume_takes_this_devices_kernel(data_dir, tmp_path):
    model = P.GPT(TINY)
    tc = P.TrainConfig()
    fused = {d: model.configure_optimizer(tc, d).defaults["fused"] for d in ("cpu", "cuda", "mps")}
    assert fused == {"cpu": False, "cuda": True, "mps": True}
    # a checkpoint saved by a GPU's fused AdamW, resumed on the CPU: the CPU's kernel, and it trains on
    tc = tiny_train_config(data_dir, tmp_path / "run", tokens=16 * 16 * 8, dtype="float32")
    P.train(TINY, tc, log=quiet)
    ckpt = guards.load_checkpoint(os.path.join(tc.out_dir, "ckpt.pt"))
    for group in ckpt["optimizer"]["param_groups"]:
        group["fused"] = True
    run = P.Run(TINY, tc, log=quiet)
    run.load(ckpt)
    assert all(group["fused"] is False for group in run.optimizer.param_groups)
    assert math.isfinite(run.train_step(run.stages[-1], tc.lr).item())


def test_mfu_peaks_match_gpu_names_by_whole_words():
    assert bench.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert bench.peak_flops("NVIDIA H100 NVL") == 835e12  # not the SXM's
    assert bench.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert bench.peak_flops("NVIDIA L40") == 181e12  # not the L4's
    assert bench.peak_flops("NVIDIA L4") == 121e12
    assert bench.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert bench.peak_flops("NVIDIA GH200 480GB") is None  # unknown: no MFU rather than a wrong one


# ---------------------------------------------------------------------------------------------
# torchrun: two processes with gloo, as torchrun would start them


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_two(worker, *args, timeout=300):
    """Run worker(rank, 2, port, *args) in two processes, as torchrun --nproc_per_node=2 would; a hang
    (processes that wait for each other in different collectives) fails the test, not the whole suite."""
    context = torch.multiprocessing.spawn(worker, args=(2, free_port(), *args), nprocs=2, join=False)
    deadline = time.time() + timeout
    while not context.join(timeout=1):
        if time.time() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"the two processes did not end within {timeout} s")


def as_torchrun_process(rank, world, port):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)


def ddp_worker(rank, world, port, data_dir, out_dir, result_dir):
    as_torchrun_process(rank, world, port)
    tc = tiny_train_config(data_dir, out_dir, micro_batch=4, tokens=16 * 16 * 12)
    runs = []

    class Recorded(P.Run):  # the real train(), with a handle on each process's run
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            runs.append(self)

    P.Run = Recorded
    summary = P.train(TINY, tc, log=quiet)
    run = runs[0]
    torch.save(
        {
            "model": run.raw_model.state_dict(),
            "tokens": run.tokens_seen,
            "summary": summary,
            "steps": [s.steps for s in run.stages],
        },
        os.path.join(result_dir, f"rank{rank}.pt"),
    )
    torch.distributed.destroy_process_group()


def test_ddp_two_processes_match_each_other_and_one_process(data_dir, tmp_path):
    spawn_two(ddp_worker, str(data_dir), str(tmp_path / "ddp"), str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for key in r0["model"]:
        assert torch.equal(r0["model"][key], r1["model"][key]), key
    assert r0["summary"]["val_loss"] > 0 and r1["summary"] is None  # only rank 0 saves and sums up
    assert sorted(os.listdir(tmp_path / "ddp")) == ["ckpt.pt", "summary.json"]
    # one process with the same tokens per step sees the same batches: same accounting, same weights
    tc = tiny_train_config(data_dir, tmp_path / "single", micro_batch=4, tokens=16 * 16 * 12)
    with one_thread():  # as each DDP process ran
        summary = P.train(TINY, tc, log=quiet)
    assert r0["summary"]["tokens"] == summary["tokens"] and r0["steps"] == [
        s.steps for s in P.plan_stages(tc, 16)
    ]
    single = final_weights(tc.out_dir)
    for key in single:
        assert torch.allclose(single[key], r0["model"][key], atol=2e-4), key


def ddp_checks(rank, world, port, data_dir, root):
    as_torchrun_process(rank, world, port)
    # no progress line or evaluation is due before the end of a stage: a stop must not wait for one
    tc = tiny_train_config(
        data_dir, "", micro_batch=4, tokens=16 * 16 * 12, log_interval=100, eval_interval=100
    )
    seen = {"whole": P.train(TINY, replace(tc, out_dir=f"{root}/whole"), log=quiet)}
    Run = P.Run

    class Signalled(Run):  # torchrun passes a Ctrl-C on to every process; here rank 1 alone gets it
        at = None  # (stage, steps done) when the signal comes, during the next step

        def train_step(self, stage, lr):
            if self.rank == 1 and (stage.name, self.step) == self.at:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().train_step(stage, lr)

    class Poisoned(Run):
        def train_step(self, stage, lr):
            loss = super().train_step(stage, lr)
            return loss * math.nan if self.rank == 1 and self.step == 2 else loss  # step 3

    for name, at in (("mid_stage", ("token", 1)), ("at_switch", ("patch", 5))):  # 6 steps a stage
        out = replace(tc, out_dir=f"{root}/{name}")
        Signalled.at = at
        P.Run = Signalled
        try:
            P.train(TINY, out, log=quiet)
        except KeyboardInterrupt:
            ckpt = guards.load_checkpoint(f"{out.out_dir}/ckpt.pt")
            seen[name] = (ckpt["stage_idx"], ckpt["step"])
        P.Run = Run
        seen[f"{name}_resumed"] = P.train(TINY, replace(out, resume=True), log=quiet)
    P.Run = Poisoned
    try:
        P.train(TINY, replace(tc, out_dir=f"{root}/nan"), log=quiet)
    except guards.UserError as e:
        seen["nan"] = str(e)
        seen["nan_files"] = sorted(os.listdir(f"{root}/nan")) if os.path.exists(f"{root}/nan") else []
    P.Run = Run
    run = Run(TINY, tc, log=quiet)  # the evaluation of the whole run's weights, shared by the processes
    run.raw_model.load_state_dict(guards.load_checkpoint(f"{root}/whole/ckpt.pt")["model"])
    run.evaluate(run.stages[-1])
    seen["val_loss"] = run.history[-1]["val_loss"]

    # a learner's change: a parameter that the patch stage alone uses, made where every run's model is made
    # and used where a micro-batch's work is (no subclass of GPT: its signature is the learner's to change)
    make_model, forward_backward = P.make_model, P.Run.forward_backward

    def with_patch_gain(mc, tc):
        model = make_model(mc, tc)
        model.patch_gain = torch.nn.Parameter(torch.ones(()))
        return model

    def patch_gain_used(run, model, stage, x, y):
        loss = forward_backward(run, model, stage, x, y)
        if stage.K > 1:
            (run.raw_model.patch_gain * loss).backward()
        return loss

    P.make_model, P.Run.forward_backward = with_patch_gain, patch_gain_used
    try:
        P.train(TINY, replace(tc, out_dir=f"{root}/unused"), log=quiet)
    except guards.UserError as e:
        seen["unused"] = str(e)
        seen["unused_trained"] = os.path.exists(f"{root}/unused")  # train() makes out_dir before stage 1
    P.make_model, P.Run.forward_backward = make_model, forward_backward
    torch.save(seen, f"{root}/rank{rank}.pt")
    guards.end_processes(0)  # as main() ends: the process group and gloo's threads go


def test_torchrun_stop_nan_evaluation_and_unused_parameters_on_two_processes(data_dir, two_processes):
    tmp_path = two_processes
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    # a SIGTERM to one process: all stop after that step, though no progress line is due, and save
    # before any evaluation; the resumed run evaluates what was due and ends as the run never stopped
    assert r0["mid_stage"] == r1["mid_stage"] == (1, 2)
    assert r0["at_switch"] == r1["at_switch"] == (0, 6)
    whole = final_weights(tmp_path / "whole")
    for name in ("mid_stage", "at_switch"):
        resumed = final_weights(tmp_path / name)
        assert all(torch.equal(whole[key], resumed[key]) for key in whole)
        assert r0[f"{name}_resumed"]["history"] == r0["whole"]["history"]
    # a bad loss in one process stops both at that step, before any save
    assert r0["nan"] == r1["nan"] == "non-finite loss by patch step 3; try a lower --lr"
    assert r0["nan_files"] == []
    # each process evaluates half the windows; together they give the one-process value
    tc = tiny_train_config(data_dir, "", micro_batch=4, tokens=16 * 16 * 12)
    run = P.Run(TINY, tc, log=quiet)
    run.raw_model.load_state_dict(whole)
    run.evaluate(run.stages[-1])
    assert r0["val_loss"] == r1["val_loss"] == pytest.approx(run.history[-1]["val_loss"], rel=1e-6)
    # a parameter that gets no gradient in a stage: one line that names it, not DDP's traceback, and before
    # the first stage trains, not after it
    assert r0["unused"] == r1["unused"] == "patch_gain gets no gradient in the token stage, which DDP forbids"
    assert r0["unused_trained"] is r1["unused_trained"] is False


def main_as_a_process(argv, port):
    """patchgpt's main(argv) in this process of two, on a fresh port (main() ends the process group):
    (exit code, stdout lines, stderr lines, gloo threads left)."""
    os.environ["MASTER_PORT"] = str(port)
    out = io.TextIOWrapper(io.BytesIO())  # main() reconfigures stdout, which a StringIO cannot take
    err = io.TextIOWrapper(io.BytesIO())
    parser = P.build_parser()
    parser.prog = "patchgpt.py"  # as the command line names it, not the spawned process's __main__
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            P.main(argv, parser=parser)
        except SystemExit as e:
            code = e.code
    out.flush()
    err.flush()
    lines = [f.buffer.getvalue().decode().splitlines() for f in (out, err)]
    return code, *lines, gloo_threads()


def gloo_threads():
    """gloo's worker threads in this process (Linux: their names in /proc)."""
    tasks = "/proc/self/task"
    return sum(open(f"{tasks}/{t}/comm").read().startswith("pt_gloo") for t in os.listdir(tasks))


def endings(rank, world, port, data_dir, root, ports):
    """The command line's main() in each process, once per way a run can end (a fresh port each)."""
    as_torchrun_process(rank, world, port)
    seen = {}
    atomic_write = guards.atomic_write
    load_checkpoint = guards.load_checkpoint
    Run = P.Run

    def slow_summary(path, data):  # rank 0 is slow to finish
        if path.endswith("summary.json"):
            time.sleep(0.5)
        atomic_write(path, data)

    def full_disk(path, data):
        raise OSError(errno.ENOSPC, f"No space left on device while writing {path}")

    def unreadable(path):  # a file that one process alone cannot read
        raise guards.UserError(f"{path}: Permission denied")

    class Signalled(Run):  # torchrun passes a Ctrl-C on to every process; here rank 1 alone gets it
        def train_step(self, stage, lr):
            if self.rank == 1 and (stage.name, self.step) == ("token", 1):
                os.kill(os.getpid(), signal.SIGTERM)
            return super().train_step(stage, lr)

    def cli(name, *flags):
        return tiny_cli(data_dir, f"{root}/{name}", "--k", "2", "--lam", "0.5", *flags)[2:]

    if rank == 0:
        guards.atomic_write = slow_summary
    seen["done"] = main_as_a_process(cli("done"), ports[0])
    seen["summary_at_exit"] = os.path.exists(f"{root}/done/summary.json")
    guards.atomic_write = atomic_write
    if rank == 1:
        guards.load_checkpoint = unreadable
    seen["unreadable"] = main_as_a_process(cli("done", "--resume"), ports[1])
    guards.load_checkpoint = load_checkpoint
    seen["corrupt"] = main_as_a_process(cli("corrupt", "--resume"), ports[2])
    if rank == 0:
        guards.atomic_write = full_disk
    seen["full"] = main_as_a_process(cli("full"), ports[3])
    guards.atomic_write = atomic_write
    P.Run = Signalled
    seen["sigterm"] = main_as_a_process(cli("sigterm"), ports[4])
    P.Run = Run
    # before the processes join: a bad value, a bad flag (each process meets it)
    seen["bad_value"] = main_as_a_process(cli("bad", "--lr", "-1"), ports[0])
    seen["bad_flag"] = main_as_a_process(cli("bad", "--k", "x"), ports[0])
    torch.save(seen, f"{root}/endings{rank}.pt")


def ddp_checks_then_endings(rank, world, port, data_dir, root, ports):
    ddp_checks(rank, world, port, data_dir, root)
    endings(rank, world, port, data_dir, root, ports)


@pytest.fixture(scope="module")
def two_processes(data_dir, tmp_path_factory):
    """The folder of what ddp_checks, then endings, saw in each of two processes: the tests of both share
    one pair of processes, since starting two costs seconds."""
    root = tmp_path_factory.mktemp("two_processes")
    (root / "corrupt").mkdir()
    (root / "corrupt" / "ckpt.pt").write_bytes(b"hello")
    spawn_two(ddp_checks_then_endings, str(data_dir), str(root), [free_port() for _ in range(5)])
    return root


def test_every_ending_of_a_torchrun_run_is_one_exit_code_and_one_line(two_processes):
    """Rank 1 used to return at once while rank 0 still saved and summed up, and one finished run in
    four ended FAILED: rank 1 aborted at exit (a gloo worker thread let go of its last collective's
    tensors as Python shut down). Now the processes agree on one ending, wait for each other, and main()
    returns only when gloo's threads are gone."""
    tmp_path = two_processes
    r0, r1 = (torch.load(tmp_path / f"endings{r}.pt", weights_only=False) for r in (0, 1))
    for name in ("done", "unreadable", "corrupt", "full", "sigterm"):
        assert r0[name][3] == r1[name][3] == 0, name  # no gloo thread left to abort the exit
    # done: rank 1 leaves main() only after the slow rank 0 wrote its summary; the last line is the run's
    assert r0["done"][0] == 0 and r0["done"][1][-1].startswith("final token-level val loss")
    assert r0["done"][2] == [] and r1["done"][:3] == (0, [], []) and r1["summary_at_exit"]
    # bad input that rank 1 alone meets, or both; a full disk at rank 0's save: both exit 2, one line
    assert r0["unreadable"][:3] == (2, [], [])
    assert r1["unreadable"][:3] == (2, [], [f"patchgpt: error: {tmp_path}/done/ckpt.pt: Permission denied"])
    code, out, err, _ = r0["corrupt"]
    assert (code, out, len(err)) == (2, [], 1) and "is not a checkpoint of this patchgpt" in err[0]
    assert r1["corrupt"][:3] == (2, [], [])
    assert (tmp_path / "corrupt" / "ckpt.pt").read_bytes() == b"hello"
    full = f"patchgpt: error: No space left on device while writing {tmp_path}/full/ckpt.pt"
    assert r0["full"][0] == 2 and r0["full"][2] == [full] and r1["full"][:3] == (2, [], [])
    # SIGTERM to one process: both exit 130 after that step, with the checkpoint saved
    interrupted = f"patchgpt: error: interrupted; {tmp_path}/sigterm/ckpt.pt continues with --resume"
    assert r0["sigterm"][0] == 130 and r0["sigterm"][2] == [interrupted]
    assert r1["sigterm"][:3] == (130, [], [])
    ckpt = guards.load_checkpoint(tmp_path / "sigterm" / "ckpt.pt")
    assert (ckpt["stage_idx"], ckpt["step"]) == (1, 2)
    # an error every process meets before they join: one line, not one per process
    assert r0["bad_value"][:3] == (2, [], ["patchgpt: error: --lr must be in (0, 10], got -1"])
    assert r0["bad_flag"][:3] == (2, [], ["patchgpt: error: argument --k: invalid integer value: 'x'"])
    assert r1["bad_value"][:3] == r1["bad_flag"][:3] == (2, [], [])
