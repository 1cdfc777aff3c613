"""
guards: what patchgpt.py promises beyond nanoGPT, in one place. patchgpt.py imports this module and this
module never imports patchgpt.py: a learner who changes the method never has to open it. Each promise, and
the test that holds it (test_patchgpt.py unless named):

- One-line errors. Bad flags, bad data, a refused resume, a full disk or a diverged run end with one line on
  stderr and exit code 2 (a Ctrl-C: 130), never a traceback, with nothing overwritten: UserError, Parser,
  run_main. test_bad_flags_are_refused, test_bad_data_files_are_refused,
  test_refusal_from_the_real_command_line.
- Every flag's range is checked before anything runs: validate. test_bad_flags_are_refused.
- The data's vocabulary is its meta.json's, and every .bin is checked against it: read_vocab, load_tokens.
  test_bad_data_files_are_refused, test_chars.py.
- Exact resume. A resume must have every setting of its checkpoint but those in RESUMABLE; a refusal names
  the flag and both values (and both types when they differ); a checkpoint from before a flag existed counts
  it at its default; one that does not fit the model is one line: check_resume, load_state, load_checkpoint.
  A run killed at any point resumes to the same weights, bit for bit, with any flag on.
  test_resumed_checkpoint_must_match_the_command, test_a_checkpoint_from_before_a_new_flag_resumes_while_the_
  flag_keeps_its_default, test_a_checkpoint_that_does_not_fit_the_model_is_one_line,
  test_sigkill_then_resume_gives_identical_weights, test_every_flag_s_run_killed_and_resumed_ends_as_if_never_
  stopped.
- Atomic files: a kill or a full disk mid-write leaves the old checkpoint, and no temp file survives a
  run: atomic_write, clean_out_dir. test_an_out_dir_that_is_a_file_or_a_full_disk_is_one_line,
  test_stale_temp_files_of_a_killed_save_are_removed.
- Stopping: Ctrl-C or SIGTERM saves at the end of the step and stops; under torchrun every process stops
  at the same step; a non-finite loss stops the run before any save: Watch.
  test_ctrl_c_and_sigterm_save_a_checkpoint_that_resumes, test_divergence_stops_before_any_save,
  test_devices.py::test_torchrun_stop_nan_evaluation_and_unused_parameters_on_two_processes.
- Torchrun's processes end together, with one exit code and one line (an error they all meet before they
  join: the first process's line alone): together, end_processes, first_process.
  test_devices.py::test_every_ending_of_a_torchrun_run_is_one_exit_code_and_one_line.
- The cost a run prints and saves, and compare.py's equal-compute baselines, are the compute of its real
  optimizer steps (all of Run.train_step, whatever it holds), counted in FLOPs before training on a copy
  of the model; the measured wall time leaves out each stage's first step (it compiles): count_flops,
  plan_cost, costs, Watch. test_the_reported_cost_is_the_compute_the_run_did,
  test_work_added_to_train_step_outside_forward_backward_is_in_the_cost,
  test_devices.py::test_the_first_step_of_each_stage_is_left_out_of_its_time.
- Same command, same numbers on a CPU, on a busy machine too (MKL's settings below), and fast steps on a CPU
  (keep_freed_memory). test_the_same_command_gives_the_same_weights_on_a_busy_machine; bench.py.
"""

import argparse
import contextlib
import copy
import ctypes
import gc
import io
import json
import math
import os
import re
import signal
import sys
import time
from dataclasses import asdict, fields, replace

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

if torch.distributed.is_available():  # before any process group exists: end_processes() says why
    import torch.distributed.nn  # noqa: F401

# Same command, same numbers on a CPU. Intel MKL computes the matmuls and, in AdamW's step, the square
# root (vmsSqrt); unless told otherwise it may pick its code path and its thread count call by call at
# run time, the likely source of the rare last-digit differences seen between runs on a busy machine.
# CBWR=AUTO fixes the code path for this CPU (MKL reads it at its first call: patchgpt.py imports this
# module before any tensor math); set_num_threads turns MKL's dynamic thread count off.
os.environ.setdefault("MKL_CBWR", "AUTO")
torch.set_num_threads(torch.get_num_threads())

CHECKPOINT_FORMAT = "patchgpt-3"
GPT2_VOCAB = 50257  # GPT-2's ids; those from here up to the model's padded table are in no text
# what a resume may change: where it runs and how often it reports (another device may change the last digits)
RESUMABLE = ("out_dir", "device", "compile", "resume", "overwrite", "eval_interval", "log_interval")


class UserError(Exception):
    """Bad input (or a diverged run): main() prints it as one line, exit code 2, nothing overwritten."""


class Ended(Exception):
    """Another torchrun process stopped with an error (it prints the line): this one stops with it."""


# ---------------------------------------------------------------------------------------------
# the flags and the command line


def validate(mc, tc):
    """Every range check of the flags, with messages that name the flag."""
    rules = [
        ("block_size", mc.block_size, 1 <= mc.block_size <= 1e6, "in [1, 1e6]"),
        ("n_layer", mc.n_layer, 1 <= mc.n_layer <= 1000, "in [1, 1000]"),
        ("n_head", mc.n_head, 1 <= mc.n_head <= 1000, "in [1, 1000]"),
        ("n_embd", mc.n_embd, 1 <= mc.n_embd <= 1e5, "in [1, 1e5]"),
        ("k", tc.k, 1 <= tc.k <= 1024, "in [1, 1024]"),
        ("lam", tc.lam, 0 <= tc.lam < 1, "in [0, 1)"),
        ("tokens", tc.tokens, 1 <= tc.tokens <= 1e14, "in [1, 1e14]"),
        ("tokens_per_step", tc.tokens_per_step, 1 <= tc.tokens_per_step <= 1e9, "in [1, 1e9]"),
        ("micro_batch", tc.micro_batch, 1 <= tc.micro_batch <= 1e6, "in [1, 1e6]"),
        ("lr", tc.lr, 0 < tc.lr <= 10, "in (0, 10]"),
        ("min_lr", tc.min_lr, 0 <= tc.min_lr <= tc.lr, f"in [0, --lr {tc.lr:g}]"),
        ("warmup_iters", tc.warmup_iters, 0 <= tc.warmup_iters <= 1e9, "in [0, 1e9]"),
        ("decay_frac", tc.decay_frac, 0 <= tc.decay_frac <= 1, "in [0, 1]"),
        ("weight_decay", tc.weight_decay, 0 <= tc.weight_decay <= 10, "in [0, 10]"),
        ("grad_clip", tc.grad_clip, 0 <= tc.grad_clip <= 1e9, "in [0, 1e9]"),
        ("eval_interval", tc.eval_interval, 1 <= tc.eval_interval, ">= 1"),
        ("eval_iters", tc.eval_iters, 1 <= tc.eval_iters <= 1e6, "in [1, 1e6]"),
        ("log_interval", tc.log_interval, 1 <= tc.log_interval, ">= 1"),
        ("seed", tc.seed, 0 <= tc.seed <= 1e18, "in [0, 1e18]"),
    ]
    for name, value, ok, rule in rules:
        if not ok:  # `not ok` and not `ok is False`: a NaN fails every comparison
            raise UserError(f"--{name} must be {rule}, got {value:g}")
    if mc.n_embd % mc.n_head:
        raise UserError(f"--n_embd must be a multiple of --n_head {mc.n_head}, got {mc.n_embd}")
    if tc.resume and tc.overwrite:
        raise UserError("--resume continues the run in --out_dir and --overwrite discards it: pass one")


def check_plan(tc, block_size, world_size, layout):
    """The checks of the stage plan (patchgpt.plan_stages), for each (name, K, steps) of its layout: a step
    for the patch and the token stage, and an optimizer step's rows split evenly into sequences of
    K x block_size tokens on every process."""
    if layout[-1][2] == 0:
        raise UserError(f"--tokens {tc.tokens} leaves no step for the token stage; raise it or --lam")
    if layout[0][2] == 0 and tc.k > 1:
        raise UserError(f"--tokens {tc.tokens} leaves no step for the patch stage; raise it or --lam")
    rows = tc.tokens_per_step // block_size
    for name, K, steps in layout:
        if tc.tokens_per_step % block_size or rows % (K * world_size):
            need = K * block_size * world_size
            raise UserError(f"--tokens_per_step must be a multiple of K x block_size x processes = {need}")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, as every other input error
        die(message, self.prog, says_why=first_process())


def integer(text):
    """An integer flag, which may be written as 2e9."""
    value = float(text)
    if not math.isfinite(value) or value != int(value):
        raise argparse.ArgumentTypeError(f"must be an integer, got {text}")
    return int(value)


def die(msg, prog="patchgpt", code=2, says_why=True):
    if says_why:
        print(f"{os.path.splitext(os.path.basename(prog))[0]}: error: {msg}", file=sys.stderr)
    sys.exit(code)


def first_process():
    """Whether this is torchrun's first process (or the only one). Before the processes have joined, an
    error (a bad flag) is every process's: the first alone says it, not each of them."""
    return int(os.environ.get("RANK", 0)) == 0


def run_main(action, prog):
    """Runs action(); any expected failure is one line on stderr and exit code 2 (130: Ctrl-C), the same
    code for every torchrun process (end_processes). Returns action's result."""
    sys.stdout.reconfigure(line_buffering=True)  # so that `| tee` and log files show progress at once
    keep_freed_memory()
    result, code, error = None, 0, None
    try:
        result = action()
    except UserError as e:
        code, error = 2, str(e)  # not e: its traceback holds the run, and with it the process group
    except OSError as e:  # a full disk, a read-only folder, an --out_dir that is a file: one line
        code, error = 2, f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}"
    except KeyboardInterrupt as e:
        code, error = 130, f"interrupted{f'; {e}' if str(e) else ''}"
    except Ended:  # the process that stopped first gives the code and the line
        pass
    code, says_why = end_processes(code)
    if code:
        die(error, prog, code, says_why)
    return result


def keep_freed_memory():
    """1.4x-1.8x faster steps on 2 CPU cores (bench.py): glibc gives blocks over 32 MB (the logits:
    200 MB) back to the OS when they are freed, and maps them anew; these settings keep them."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX: no mmap for large blocks
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: never give the heap's top back


# ---------------------------------------------------------------------------------------------
# devices and precision


def join_processes(device):
    """(processes, this one's rank, its device): one process, or torchrun's, each on its own GPU."""
    world = int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
    rank = int(os.environ.get("RANK", 0))
    device = pick_device(device)
    if world > 1 and device.startswith("cuda"):  # one process per GPU
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    if device.startswith("cuda"):  # this GPU, not GPU 0, for whatever uses the current device
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():  # gloo: several processes on the CPU
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return world, rank, device


def pick_device(name):
    mps = torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    m = re.fullmatch(r"(cpu|cuda|mps)(?::(\d+))?", name)
    if not m or int(m[2] or 0) >= {"cpu": 1, "cuda": torch.cuda.device_count(), "mps": int(mps)}[m[1]]:
        raise UserError(f"--device {name}: no such device here (try auto, cpu, cuda, cuda:1 or mps)")
    return name


def resolve_dtype(tc):
    """dtype auto becomes what it means here before it is saved: a resume on another device must say so.
    bf16 only on GPUs that compute it natively (Ampere on): a T4 or V100 emulates it, slower than float32."""
    if tc.dtype != "auto":
        return tc
    device = pick_device(tc.device)
    native = device.startswith("cuda") and torch.cuda.get_device_capability(device) >= (8, 0)
    return replace(tc, dtype="bfloat16" if native else "float32")


def autocast(device_type, dtype):
    """bf16 autocast (on mps: macOS 14 on); float32 runs with no autocast at all, since even a disabled
    one raises on mps with torch 2.3-2.4 and warns with some later torch and macOS versions."""
    if dtype == "bfloat16":
        return torch.autocast(device_type, torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device):
    """Wait for the device's queued work, so that a clock times the work and not its launch."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)  # this GPU, not GPU 0
    elif device == "mps":
        torch.mps.synchronize()


# ---------------------------------------------------------------------------------------------
# the data's vocabulary and files


def read_vocab(folder):
    """The vocabulary of the .bin files in folder, from the meta.json that prepare_data.py writes there:
    {"tokenizer": "gpt2" or "chars", "vocab_size": how many ids the text has, "chars": the characters}."""
    path = os.path.join(folder, "meta.json")
    if not os.path.isfile(path):
        raise UserError(
            f"{path} not found: make the data folder with prepare_data.py (it names the vocabulary)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        tokenizer, n_ids, chars = meta["tokenizer"], meta["vocab_size"], meta.get("chars")
    except (ValueError, TypeError, KeyError, AttributeError):  # not JSON, not an object, a key missing
        tokenizer, n_ids, chars = None, 0, None
    gpt2 = tokenizer == "gpt2" and n_ids == GPT2_VOCAB
    characters = tokenizer == "chars" and isinstance(chars, str) and n_ids == len(chars) > 0
    if not (gpt2 or characters):
        raise UserError(f"{path} is not a meta.json of prepare_data.py (gpt2 tokens or characters)")
    return {"tokenizer": tokenizer, "vocab_size": n_ids, "chars": chars if characters else None}


def load_data(data_dir, val_bin, need, ddp):
    """(vocabulary, train ids, val ids) of a data folder, checked; a file that one torchrun process cannot
    read stops them all."""
    with together(ddp):
        vocab = read_vocab(data_dir)
        train = load_tokens(os.path.join(data_dir, "train.bin"), need, vocab)
        val = load_tokens(val_bin or os.path.join(data_dir, "val.bin"), need, vocab)
    return vocab, train, val


def load_tokens(path, need, vocab):
    """The uint16 ids of path as a memmap, refused unless they hold need tokens (one sequence and its
    target) and are in the vocabulary of the training data."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found; make it with prepare_data.py (python prepare_data.py --help)")
    if os.path.getsize(path) % 2 or os.path.getsize(path) < 2 * need:
        raise UserError(f"{path}: not uint16 tokens, or fewer than one sequence ({need} tokens)")
    if read_vocab(os.path.dirname(path)) != vocab:  # e.g. --val_bin of GPT-2 tokens for a character run
        raise UserError(f"{path} is in another vocabulary than the training data (see the meta.json of each)")
    data = np.memmap(path, dtype=np.uint16, mode="r")
    if int(data.max()) >= vocab["vocab_size"]:
        n = vocab["vocab_size"]
        raise UserError(f"{path} holds token id {int(data.max())} >= {n}, beyond its meta.json's vocabulary")
    return data


# ---------------------------------------------------------------------------------------------
# checkpoints: atomic writes, what a resume may change, loading


def atomic_write(path, data):
    """Write a temp file beside path, then rename: a kill or a full disk mid-write leaves the old file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):  # name the file the user knows, not the temp file
            raise OSError(e.errno, f"{e.strerror} while writing {path}") from None
        raise


def save_checkpoint(path, ckpt, master, ddp):
    """Rank 0 writes, atomically; every process waits for it, and stops with it on a full disk."""
    with together(ddp):
        if master:
            buf = io.BytesIO()  # serialized in memory first, so that a full disk is a plain OSError
            torch.save({"format": CHECKPOINT_FORMAT, **ckpt}, buf)
            atomic_write(path, buf.getvalue())


def load_checkpoint(path, missing="to resume from; run without --resume to start a new run"):
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path} {missing}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if ckpt["format"] != CHECKPOINT_FORMAT:
            raise ValueError(ckpt["format"])
    except Exception as e:  # truncated, not a torch file, or not ours
        raise UserError(f"{path} is not a checkpoint of this patchgpt ({type(e).__name__})") from None
    return ckpt


def out_dir_checkpoint(tc):
    """The checkpoint to resume from (tc.resume), else None; a run already in out_dir is refused unless
    --resume continues it or --overwrite starts over."""
    path = os.path.join(tc.out_dir, "ckpt.pt")
    if os.path.exists(path) and not (tc.resume or tc.overwrite):
        raise UserError(f"{tc.out_dir} holds a run: --resume continues it, --overwrite starts over")
    return load_checkpoint(path) if tc.resume else None


def clean_out_dir(out_dir, resumed):
    """Make out_dir; remove what a kill mid-write left (a temp file) and, for a new run, an old run."""
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):
        if re.fullmatch(r".+\.tmp\d+", name) or (not resumed and name in ("ckpt.pt", "summary.json")):
            os.remove(os.path.join(out_dir, name))


def identity(mc, tc):
    """What a resumed run must share with its checkpoint: every setting but those in RESUMABLE."""
    return {k: v for k, v in {**asdict(mc), **asdict(tc)}.items() if k not in RESUMABLE}


def check_resume(ckpt, mc, tc):
    """Refuses a resume whose settings differ from the checkpoint's, naming the flag and both values."""
    # a flag added after the checkpoint was made counts as its default, the old code's behaviour
    defaults = {f.name: f.default for f in fields(mc) + fields(tc)}
    saved = {**defaults, **ckpt["model_config"], **ckpt["train_config"]}
    for key, new in identity(mc, tc).items():
        if saved[key] != new:  # 4 and '4' print alike: a change of type names the types
            typed = type(saved[key]) is not type(new)
            was, now = (f"{v!r} ({type(v).__name__})" if typed else v for v in (saved[key], new))
            raise UserError(f"the checkpoint was made with --{key} {was}, not {now}")


def load_state(model, optimizer, ckpt):
    """The checkpoint's weights and AdamW state; one line, not a traceback, if the model changed since."""
    for group in ckpt["optimizer"]["param_groups"]:  # AdamW's kernel for this device, not the saver's
        group["fused"] = optimizer.defaults["fused"]
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError) as e:
        raise UserError(f"the checkpoint does not fit this model: {' '.join(str(e).split())}") from None


# ---------------------------------------------------------------------------------------------
# the cost: FLOPs counted from the code, and the time left


def count_flops(run):
    """FLOPs per token of each stage, counted over one whole optimizer step of it: Run.train_step as the run
    will call it (its micro-batches, clipping, AdamW, and whatever a learner adds there), made before
    training on a copy of the model with an AdamW of its own and a copy of the batch generator. The run's
    weights, gradients and random streams are left as they were. Under DDP a parameter that gets no gradient
    in a stage is named here, before training, instead of by DDP's traceback at the next step."""
    flops = []
    for stage in run.stages:
        dry = copy.copy(run)  # the run's data and settings; a model, an optimizer and batches of its own
        dry.raw_model = dry.model = copy.deepcopy(run.raw_model)  # not compiled, not DDP: local gradients
        dry.optimizer = dry.raw_model.configure_optimizer(run.tc, run.device_type)
        dry.rng = copy.deepcopy(run.rng)
        got_grad = set()
        for name, p in dry.raw_model.named_parameters():
            p.register_post_accumulate_grad_hook(lambda p, name=name: got_grad.add(name))
        # the math kernel of attention is matmuls, which the counter knows on every device
        gpu = [run.device] if run.device_type == "cuda" else []  # the CPU's random stream, and this GPU's
        with torch.random.fork_rng(devices=gpu), sdpa_kernel(SDPBackend.MATH):
            with FlopCounterMode(display=False) as counter:
                dry.train_step(stage, run.tc.lr)
        flops.append(counter.get_total_flops() / (stage.tokens_per_step / run.world))  # this process's tokens
        unused = [name for name, p in dry.raw_model.named_parameters() if name not in got_grad]
        if run.ddp and unused and not run.model.find_unused_parameters:
            raise UserError(f"{unused[0]} gets no gradient in the {stage.name} stage, which DDP forbids")
    return flops


def plan_cost(stages, flops):
    """Compute relative to token-level training on the same tokens, from each stage's FLOPs per token
    (count_flops); the last stage is token-level. For the paper's two stages: lam/K + 1 - lam."""
    tokens = [s.steps * s.tokens_per_step for s in stages]
    return sum(n * f for n, f in zip(tokens, flops)) / (sum(tokens) * flops[-1])


def eta(stages, flops, i, step, tok_s):
    """The time left at stage i's speed, in FLOPs per second ("-" before the clock has timed a step)."""
    if not tok_s:
        return "-"
    left = sum(s.steps * s.tokens_per_step * f for s, f in zip(stages[i:], flops[i:]))
    left -= step * stages[i].tokens_per_step * flops[i]
    return f"{left / (tok_s * flops[i]) / 60:.1f} min"


def costs(stages, flops, watch):
    """A run's summary of its cost: each stage's tokens, seconds and speed; the compute (plan_cost); and
    the measured wall time against a token-level run of the same tokens at this run's own token-stage
    speed. A stage that ran a single step here has no speed (NaN, also in summary.json): its first step in
    each process is not timed, since it compiles."""
    tokens = [s.steps * s.tokens_per_step for s in stages]
    tok_s = [n / t if n else math.nan for n, t in zip(watch.timed_tokens, watch.train_time)]
    measured = sum(n / v for n, v in zip(tokens, tok_s)) / (sum(tokens) / tok_s[-1])
    compute = plan_cost(stages, flops)
    return {
        "tokens": tokens,
        "time": watch.train_time,
        "tok_s": tok_s,
        "compute_cost": compute,
        "measured_cost": measured,
    }


# ---------------------------------------------------------------------------------------------
# between steps: the clock, the losses' check and the stop that every process agrees on


class Watch:
    """What a run watches between its steps: the clock of each stage (without its first step, evaluations
    and saves), the losses (checked for NaN when read), and a Ctrl-C or SIGTERM, which sets stop. Under
    torchrun every process checks every step, so that all stop at the same step whichever got the signal
    (torchrun kills them ~30 s after it passes one on)."""

    def __init__(self, n_stages, device, ddp, log):
        self.device = device
        self.ddp = ddp
        self.log = log
        self.train_time = [0.0] * n_stages  # seconds per stage, saved in the checkpoint
        self.timed_tokens = [0] * n_stages  # the tokens trained in those seconds
        self.clock = None  # (time, tokens_seen) at the start of the current progress line's window
        self.losses = []  # the steps' losses since they were last checked
        self.stop = False

    def state(self):
        return {"train_time": self.train_time, "timed_tokens": self.timed_tokens}

    def load(self, ckpt):
        if "timed_tokens" in ckpt:  # older checkpoints timed first steps too: their speeds start over
            self.train_time = ckpt["train_time"]
            self.timed_tokens = ckpt["timed_tokens"]

    def step_done(self, loss, tokens_seen, stage, step, check_due):
        """After an optimizer step. Returns whether every process agreed to stop; raises on a bad loss."""
        self.losses.append(loss)  # read at the next check, not now: reading a loss waits for the GPU
        if self.clock is None:  # the stage's first step in this process (it compiles) is left out of its time
            synchronize(self.device)
            self.clock = (time.time(), tokens_seen)
        if not (check_due or self.stop or self.ddp):
            return False
        n_bad = (~torch.isfinite(torch.stack(self.losses))).sum().float()
        self.losses = []
        flags = torch.stack([n_bad, torch.tensor(float(self.stop), device=self.device)])
        if self.ddp:  # every process learns of a bad loss or a Ctrl-C anywhere
            torch.distributed.all_reduce(flags)
        if flags[0] > 0:  # before any save: a checkpoint never holds weights a bad loss touched
            raise UserError(f"non-finite loss by {stage.name} step {step}; try a lower --lr")
        return bool(flags[1] > 0)  # what every process agreed on; a later Ctrl-C counts at the next check

    def lap(self, i, tokens_seen):
        """Stage i's speed since the clock started (tokens per second), added to its time."""
        synchronize(self.device)  # time the work, not its launch
        seconds = time.time() - self.clock[0]
        tokens = tokens_seen - self.clock[1]
        self.train_time[i] += seconds
        self.timed_tokens[i] += tokens
        return tokens / max(seconds, 1e-9) if tokens else 0.0

    def new_stage(self):
        self.clock = None  # started by the stage's first step_done

    def restart(self, tokens_seen):
        self.clock = (time.time(), tokens_seen)

    @contextlib.contextmanager
    def signals(self, ckpt_path):
        """Ctrl-C or SIGTERM (kill, timeout, a job scheduler, torchrun passing one on) sets stop: the run
        saves at the end of the step and stops, saying whether there is a checkpoint to resume. A second
        Ctrl-C stops a single process at once."""

        def on_signal(signum, frame):
            if self.stop and not self.ddp:
                raise KeyboardInterrupt
            self.stop = True
            self.log(f"{signal.Signals(signum).name}: saving a checkpoint at the end of this step")

        old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        except KeyboardInterrupt:
            if os.path.exists(ckpt_path):
                raise KeyboardInterrupt(f"{ckpt_path} continues with --resume") from None
            raise KeyboardInterrupt("before the first checkpoint, so there is nothing to resume") from None
        finally:
            for s, handler in old_handlers.items():
                signal.signal(s, handler)


# ---------------------------------------------------------------------------------------------
# torchrun: processes that stop together and end together


def gather(value):
    """value from every torchrun process, in rank order (a collective: every process must call it)."""
    values = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


@contextlib.contextmanager
def together(ddp):
    """A block that every torchrun process leaves at the same point: an error in one (a file that it alone
    cannot read or write) stops the others here too, with Ended, instead of leaving them to wait for it in
    their next collective. One small collective: for setup and saves, not every step."""
    try:
        yield
    except BaseException:
        if ddp:
            gather(True)
        raise
    if ddp and any(gather(False)):
        raise Ended


def end_processes(code):
    """The one ending of a torchrun run: every process gives its exit code and waits here for all the
    others, then all exit with the highest code, and the first process that has it prints the line.
    Returns that code and whether this process prints."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return code, first_process()
    codes = gather(code)
    says_why = codes.index(max(codes)) == torch.distributed.get_rank()
    if max(codes):  # torchrun sends SIGTERM to the others once one has exited with an error: keep this code
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # gloo's worker threads must end before Python shuts down: one lets go of a collective's tensors after
    # the call has returned, which takes Python's lock, and once Python is shutting down that aborts the
    # process (SIGABRT, "terminate called without an active exception": rank 1 exited just after its last
    # collective). They end when the process group is freed, by destroy_process_group() if nothing else
    # holds it: not the DDP model (in reference cycles: collected here), nor the defaults of
    # torch.distributed.nn's functions (they hold the group alive when it is imported: imported at the top)
    gc.collect()
    torch.distributed.destroy_process_group()
    return max(codes), says_why
