"""
bench.py: steady-state speed of patchgpt's training step, per stage, and what it means for a run.

It builds the same Run and calls the same Run.train_step() as patchgpt.py, times a few optimizer
steps of each stage after warm-up (synchronizing the GPU around the timed steps), and prints
tokens/s, ms/step, model FLOPs utilization and peak memory, then the wall time a whole
`--k K --lam lam` run would take relative to token-level training of the same tokens.

Peak memory is the most tensor memory alive during one optimizer step (weights, optimizer state,
gradients, activations, logits): torch.cuda.max_memory_allocated() on a GPU, and on other devices
a count of tensor storages kept by PeakTensorMemory below during one extra, untimed, eager step.

Usage (takes every patchgpt.py flag, plus --warmup_steps and --timed_steps):
  CPU, the default model:   python bench.py --k 4
  one GPU, GPT-2 124M:      python bench.py --device cuda --compile --k 4 --lam 0.67 \\
                                --n_layer 12 --n_head 12 --n_embd 768 --block_size 1024 \\
                                --tokens_per_step 65536 --micro_batch 16
"""

import json
import re
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

import guards
import patchgpt as P

# dense bf16 tensor-core peaks from the vendors' data sheets (FLOP/s), by the words of the name that
# torch.cuda.get_device_name() gives; MFU is left out for a device that none matches
PEAK_BF16 = [  # the first entry all of whose words are in the name: variants before their base model
    ("H200 NVL", 835e12),
    ("H200", 989e12),  # SXM
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
]


def peak_flops(name):
    """The bf16 peak of a device by its name, matched by whole words: "NVIDIA L40" is not an L4."""
    words = set(re.split(r"[\s_-]+", name.upper()))
    return next((peak for key, peak in PEAK_BF16 if set(key.upper().split()) <= words), None)


class PeakTensorMemory(TorchDispatchMode):
    """Counts the bytes of every tensor storage that an operation creates while the context is
    open, takes them off again when Python frees the storage, and keeps the peak: what
    torch.cuda.max_memory_allocated() reports on a GPU, for devices that have no such counter.
    `known` tensors (weights, optimizer state) exist before the step and count from the start."""

    def __init__(self, known=()):
        super().__init__()
        self.seen = WeakIdKeyDictionary()  # storages already counted; views share their base's
        self.now = 0
        for t in known:
            self._count(t.untyped_storage())
        self.peak = self.now

    def _count(self, storage):
        if storage not in self.seen:
            self.seen[storage] = True
            self.now += storage.nbytes()
            weakref.finalize(storage, self._uncount, storage.nbytes())

    def _uncount(self, nbytes):
        self.now -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._count(t.untyped_storage())
        self.peak = max(self.peak, self.now)
        return out


def step_memory(run, stage):
    """Peak tensor bytes of one eager optimizer step, counted by PeakTensorMemory."""
    compiled, run.model = run.model, run.raw_model  # a compiled graph hides its ops from the counter
    state = [v for s in run.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    with PeakTensorMemory(list(run.raw_model.parameters()) + state) as mem:
        run.train_step(stage, run.tc.lr)
    run.model = compiled
    return mem.peak


def time_stage(run, stage, warmup_steps, timed_steps):
    """Mean seconds per optimizer step after warm-up, and the peak memory of a step."""
    run.optimizer = run.raw_model.configure_optimizer(run.tc, run.device_type)
    run.model.train()
    for _ in range(warmup_steps):  # the first steps compile kernels and grow the caching allocator
        run.train_step(stage, run.tc.lr)
    guards.synchronize(run.device)
    if run.device_type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    t0 = time.perf_counter()
    for _ in range(timed_steps):
        run.train_step(stage, run.tc.lr)
    guards.synchronize(run.device)
    secs = (time.perf_counter() - t0) / timed_steps
    if run.device_type == "cuda":
        peak = torch.cuda.max_memory_allocated(run.device)
    else:
        peak = step_memory(run, stage)
    return secs, peak


def bench(mc, tc, warmup_steps=3, timed_steps=10, log=print):
    run = P.Run(mc, tc, log=lambda *a: None)  # the stages of a real run with these flags
    name = torch.cuda.get_device_name(run.device) if run.device_type == "cuda" else run.device
    peak = peak_flops(name)  # None for cpu and mps, as for any device not in the table
    rows = []
    # each stage's FLOPs per token as the run counts them (guards.count_flops: one real step of it)
    for stage, flops in sorted(zip(run.stages, run.flops), key=lambda s: s[0].K):  # token stage first
        secs, mem = time_stage(run, stage, warmup_steps, timed_steps)
        rows.append(
            {
                "stage": stage.name,
                "K": stage.K,
                "tokens_per_step": stage.tokens_per_step,
                "ms_per_step": 1e3 * secs,
                "tok_s": stage.tokens_per_step / secs,
                "mfu": stage.tokens_per_step * flops / secs / peak if peak else None,
                "peak_mem_gb": mem / 2**30,
            }
        )
    token, patch = rows[0], rows[-1]
    n_params = sum(p.numel() for p in run.raw_model.parameters())
    log(
        f"device {name} | {mc.n_layer} layers, {mc.n_embd} wide, block {mc.block_size} | "
        f"{n_params / 1e6:.1f}M params | dtype {tc.dtype} | compile {tc.compile}"
    )
    log(f"{'stage':<7}{'K':>3}{'tokens/step':>13}{'ms/step':>10}{'tokens/s':>11}{'MFU':>7}{'peak mem':>10}")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        mem = f"{r['peak_mem_gb']:.2f}G"
        log(
            f"{r['stage']:<7}{r['K']:>3}{r['tokens_per_step']:>13}{r['ms_per_step']:>10.1f}"
            f"{r['tok_s']:>11,.0f}{mfu:>7}{mem:>10}"
        )
    speedup = patch["tok_s"] / token["tok_s"]
    lam = tc.lam
    # a whole run: lam of the tokens at the patch stage's speed, the rest at the token stage's
    ratio = lam * token["tok_s"] / patch["tok_s"] + 1 - lam
    log(
        f"patch stage speed-up over the token stage: {speedup:.2f}x (ideal K = {patch['K']}); "
        f"peak memory {patch['peak_mem_gb'] / token['peak_mem_gb']:.2f}x the token stage's"
    )
    log(
        f"whole run --k {patch['K']} --lam {lam:.3g}: wall time {ratio:.3f} of token-level training "
        f"of the same tokens (compute {guards.plan_cost(run.stages, run.flops):.3f}, counted in FLOPs)"
    )
    return {"device": name, "rows": rows, "speedup": speedup, "run_ratio": ratio}


def build_parser():
    p = P.build_parser("Time patchgpt's training step per stage (see bench.py's docstring).")
    p.add_argument("--warmup_steps", type=int, default=3, help="untimed optimizer steps per stage")
    p.add_argument("--timed_steps", type=int, default=10, help="timed optimizer steps per stage (>= 1)")
    p.add_argument("--json", default="", help="also write the results to this file")
    return p


def run(args):
    if args.warmup_steps < 0 or args.timed_steps < 1:
        raise guards.UserError("bench needs --warmup_steps >= 0 and --timed_steps >= 1")
    mc, tc = P.configs(args)
    if tc.k == 1:
        raise guards.UserError(
            "bench compares the patch stage with the token stage: use --k >= 2 and --lam > 0"
        )
    result = bench(mc, tc, args.warmup_steps, args.timed_steps)
    if args.json:
        guards.atomic_write(args.json, json.dumps(result, indent=1).encode())
    return result


if __name__ == "__main__":
    P.main(parser=build_parser(), action=run)
