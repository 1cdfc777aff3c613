"""
patchgpt: patch-level training of a GPT language model (Shao, Meng, Zhou, ICLR 2025), in one file.

Stage 1 (patch level, a fraction lam of the tokens): each K consecutive token embeddings are averaged
into one "patch", and one output distribution per patch predicts all K tokens of the next patch.
Stage 2 (token level, the rest): plain next-token training, starting from the stage-1 weights.
A run costs lam/K + 1 - lam of token-level training on the same tokens (K=4, lam=2/3: 0.5): the
paper's formula, which the cost a run reports, counted in the FLOPs its code computes (plan_cost),
gives up to its rounding to whole steps.

  python patchgpt.py --k 4 --lam 0.67    # the default model and data (Tiny Shakespeare); a CPU will do
  python patchgpt.py --k 1               # the token-level baseline; --help lists every flag
  torchrun --standalone --nproc_per_node=8 patchgpt.py --device cuda ...    # data parallel

Sampling, comparisons and benchmarks: sample.py, compare.py, bench.py.
"""

import argparse
import contextlib
import ctypes
import gc
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections import OrderedDict, namedtuple
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

if torch.distributed.is_available():  # before any process group exists: end_processes() says why
    import torch.distributed.nn  # noqa: F401

# ---------------------------------------------------------------------------------------------
# config: every field is a command-line flag of the same name; validate() checks their ranges


def flag(default, help, choices=None):
    """A config field that is also a command-line flag, with its help text."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class GPTConfig:
    block_size: int = flag(128, "positions per sequence (tokens at K=1, patches at K>1)")
    n_layer: int = flag(4, "transformer blocks")
    n_head: int = flag(4, "attention heads per block")
    n_embd: int = flag(128, "embedding width, a multiple of n_head")
    untied: bool = flag(False, "separate input and output embedding matrices (default: tied, as in GPT-2)")
    # not a flag: the data decides it (fit_vocab); a checkpoint from before it existed was GPT-2's
    vocab_size: int = field(default=50304, metadata={"help": None})


@dataclass
class TrainConfig:
    k: int = flag(4, "patch size K of stage 1; 1 = ordinary token-level training")
    lam: float = flag(0.67, "fraction of the tokens trained at patch level, in [0, 1)")
    tokens: int = flag(500_000, "training tokens, both stages together (e.g. 2e9)")
    # as in the paper, a patch step reads as many tokens as a token step: 1/K the sequences, each K times
    # longer, so it costs 1/K the compute
    tokens_per_step: int = flag(2048, "tokens per optimizer step in both stages (patch: 1/K the sequences)")
    micro_batch: int = flag(8, "most sequences per forward/backward pass and process (more: accumulated)")
    lr: float = flag(1e-3, "peak learning rate")
    min_lr: float = flag(1e-4, "learning rate at the end of the schedule, <= lr")
    warmup_iters: int = flag(20, "linear warmup steps (per stage with --schedule restart)")
    schedule: str = flag(
        "restart",
        "restart: per stage a fresh AdamW, warmup and cosine (the paper); global: one AdamW and one "
        "cosine over both stages; wsd: one AdamW, warmup, the peak lr, then a linear decay over the last "
        "--decay_frac",
        ["restart", "global", "wsd"],
    )
    decay_frac: float = flag(0.2, "with --schedule wsd: the last fraction of all steps decays to min_lr")
    weight_decay: float = flag(0.1, "AdamW weight decay of the matrices")
    grad_clip: float = flag(1.0, "clip the global gradient norm to this (0 = off)")
    eval_interval: int = flag(50, "optimizer steps between evaluations and checkpoints")
    eval_iters: int = flag(20, "validation batches per evaluation (the same fixed windows every time)")
    log_interval: int = flag(10, "optimizer steps between progress lines")
    data_dir: str = flag("data/tinyshakespeare", "folder with train.bin and val.bin (see prepare_data.py)")
    val_bin: str = flag("", "evaluate on this .bin instead of data_dir/val.bin (e.g. WikiText-103 test)")
    out_dir: str = flag("", "folder for ckpt.pt and summary.json (default: out/k{K}_lam{lam}, or out/k1)")
    device: str = flag("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:1 or mps")
    dtype: str = flag("auto", "auto: bf16 on a GPU that has it natively", ["auto", "float32", "bfloat16"])
    compile: bool = flag(False, "torch.compile the model (one graph per stage)")
    seed: int = flag(1337, "seed of the initial weights and of the batches")
    resume: bool = flag(False, "continue the run saved in out_dir")
    overwrite: bool = flag(False, "start over even if out_dir holds a run")

    def __post_init__(self):
        if self.k == 1 or self.lam == 0:  # the one place that says what the token-level baseline is
            self.k = 1
            self.lam = 0.0


# what a resume may change: where it runs and how often it reports (another device may change the last digits)
RESUMABLE = ("out_dir", "device", "compile", "resume", "overwrite", "eval_interval", "log_interval")


class UserError(Exception):
    """Bad input (or a diverged run): main() prints it as one line, exit code 2, nothing overwritten."""


class Ended(Exception):
    """Another torchrun process stopped with an error (it prints the line): this one stops with it."""


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


# ---------------------------------------------------------------------------------------------
# model: a nanoGPT-class GPT; the only patch-specific lines are in forward() and the patch ops

VOCAB_SIZE = GPTConfig.vocab_size  # GPT-2's 50257 padded to a multiple of 64 (faster matmuls)
GPT2_VOCAB = 50257  # ids from here up to VOCAB_SIZE pad the embedding table; no text has them


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        C = config.n_embd
        self.n_head = config.n_head
        # GPT-2's order of modules: parameters() follows it, and so does grad clipping's float sum of norms
        self.ln_1 = nn.LayerNorm(C)
        self.attn = nn.ModuleDict(dict(c_attn=nn.Linear(C, 3 * C), c_proj=nn.Linear(C, C)))
        self.ln_2 = nn.LayerNorm(C)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(C, 4 * C), gelu=nn.GELU(), c_proj=nn.Linear(4 * C, C))
        )

    def forward(self, x):
        B, T, C = x.shape
        # causal self-attention: (B, T, 3C) -> 3 x (B, T, C) -> 3 x (B, nh, T, hs)
        qkv = self.attn.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in qkv)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        x = x + self.attn.c_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if not config.untied:  # GPT-2 ties the input and output embeddings: one matrix, both roles
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections down so the residual stream does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None, patch_size=1):
        """idx: (B, K*T) token ids; targets: the same window shifted by K tokens, or None.
        Returns logits (B, T, vocab), one distribution per patch, and the next-patch loss;
        patch_size=1 is ordinary next-token prediction through the same lines."""
        K = patch_size
        B, L = idx.shape
        assert L % K == 0 and L // K <= self.config.block_size, f"{L} tokens are not K x T <= block_size"
        x = patch_embed(self.transformer.wte(idx), K)  # (B, K*T, C) -> (B, T, C)
        x = x + self.transformer.wpe(torch.arange(L // K, device=idx.device))  # patch t at position t
        for block in self.transformer.h:
            x = block(x)  # (B, T, C) throughout
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab)
        if targets is None:
            return logits, None
        return logits, next_patch_loss(logits, targets, K)

    def configure_optimizer(self, tc, device_type):
        # GPT-2's AdamW: weight decay on matrices only, not on biases and LayerNorm gains. On a GPU the
        # fused kernel is one launch for all parameters instead of several per tensor (mps: torch 2.5 on);
        # the CPU keeps the per-tensor loop that every published CPU number was made with
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0}]
        return torch.optim.AdamW(groups, lr=tc.lr, betas=(0.9, 0.95), fused=device_type in ("cuda", "mps"))


# ---------------------------------------------------------------------------------------------
# patch ops: the whole idea of patch-level training is in these two functions


def patch_embed(tok_emb, K):
    """Average each group of K consecutive token embeddings into one patch embedding.
    No new parameters: the model keeps the token embedding table it will use in stage 2."""
    B, L, C = tok_emb.shape
    return tok_emb.view(B, L // K, K, C).mean(dim=2)  # (B, K*T, C) -> (B, T, K, C) -> (B, T, C)


def next_patch_loss(logits, targets, K):
    """Cross-entropy of the one distribution at patch t against each of the K tokens of patch t+1,
    averaged over the K tokens. One log_softmax, then K gathers from the same row: the logits are
    never copied K times, so a patch step needs no more memory than a token step."""
    B, T, V = logits.shape
    # float32 so that the normalizer of a bf16 logit row does not round away small probabilities
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    tgt = targets.view(B, T, K)  # (B, K*T) -> (B, T, K): the K tokens of the next patch
    nll = -logp.gather(dim=-1, index=tgt)  # (B, T, K)
    return nll.mean()  # mean over K, then over positions; K=1 is exactly F.cross_entropy


# ---------------------------------------------------------------------------------------------
# data: uint16 token ids (gpt2 tokens or characters) read through np.memmap, and the vocabulary they are
# in from the meta.json beside them; windows of K*T tokens and their shift by K


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


def fit_vocab(mc, vocab):
    """mc with the embedding table the data needs: GPT-2's ids padded to VOCAB_SIZE (the published
    numbers), or one row per character, as nanoGPT's shakespeare_char."""
    return replace(mc, vocab_size=VOCAB_SIZE if vocab["tokenizer"] == "gpt2" else vocab["vocab_size"])


def load_tokens(path, need, vocab):
    if not os.path.isfile(path):
        raise UserError(f"{path} not found; make it with prepare_data.py (python prepare_data.py --help)")
    if os.path.getsize(path) % 2 or os.path.getsize(path) < 2 * need:  # need: (block_size + 1) * K
        raise UserError(f"{path}: not uint16 tokens, or fewer than one sequence ({need} tokens)")
    if read_vocab(os.path.dirname(path)) != vocab:  # e.g. --val_bin of GPT-2 tokens for a character run
        raise UserError(f"{path} is in another vocabulary than the training data (see the meta.json of each)")
    data = np.memmap(path, dtype=np.uint16, mode="r")
    if int(data.max()) >= vocab["vocab_size"]:
        n = vocab["vocab_size"]
        raise UserError(f"{path} holds token id {int(data.max())} >= {n}, beyond its meta.json's vocabulary")
    return data


def batch_starts(rng, n_tokens, K, block_size, n):
    """n random window starts; a window is K*T tokens for x plus K more for the last patch's target."""
    return rng.integers(0, n_tokens - (block_size + 1) * K + 1, size=n)


def get_batch(data, starts, K, block_size, device):
    """x: (B, K*T) tokens from each start; y: the same windows shifted by K tokens, so every patch,
    the last one too, has a target patch (the paper's code drops the last patch instead)."""
    L = K * block_size
    x = torch.from_numpy(np.stack([data[i : i + L] for i in starts]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + K : i + K + L] for i in starts]).astype(np.int64))
    if device.startswith("cuda"):  # from pinned memory the copy is queued behind the GPU's work, not
        # waited for: the CPU prepares the next batch while the GPU still computes this one (as nanoGPT)
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# ---------------------------------------------------------------------------------------------
# the stage plan and the learning rate

# micro_batch: sequences per forward pass and process; tokens_per_step: all processes together
Stage = namedtuple("Stage", "name K steps micro_batch grad_accum tokens_per_step")


def plan_stages(tc, block_size, world_size=1):
    """Split the budget into a patch stage (lam) and a token stage. As in the paper both read the same
    tokens per optimizer step: a patch step has 1/K of the sequences, each K times longer (1/K compute)."""
    rows = tc.tokens_per_step // block_size  # token-level sequences per optimizer step
    total = max(1, round(tc.tokens / tc.tokens_per_step))
    patch_steps = round(tc.lam * total)
    if patch_steps == total:
        raise UserError(f"--tokens {tc.tokens} leaves no step for the token stage; raise it or --lam")
    if patch_steps == 0 and tc.k > 1:
        raise UserError(f"--tokens {tc.tokens} leaves no step for the patch stage; raise it or --lam")
    plan = []
    for name, K, steps in (("patch", tc.k, patch_steps), ("token", 1, total - patch_steps)):
        if tc.tokens_per_step % block_size or rows % (K * world_size):
            need = K * block_size * world_size
            raise UserError(f"--tokens_per_step must be a multiple of K x block_size x processes = {need}")
        if steps == 0:
            continue  # the baseline has no patch stage
        mine = rows // (K * world_size)  # this process's sequences per step
        # the fewest equal passes of at most micro_batch sequences each
        accum = next(a for a in range(1, mine + 1) if mine % a == 0 and mine // a <= tc.micro_batch)
        plan.append(Stage(name, K, steps, mine // accum, accum, tc.tokens_per_step))
    return plan


def plan_cost(stages, flops):
    """Compute relative to token-level training on the same tokens, from each stage's FLOPs per token
    (Run.count_flops); the last stage is token-level. For the paper's two stages: lam/K + 1 - lam."""
    tokens = [s.steps * s.tokens_per_step for s in stages]
    return sum(n * f for n, f in zip(tokens, flops)) / (sum(tokens) * flops[-1])


def seconds_left(stages, flops, i, step, tok_s):
    """At stage i's speed, in FLOPs per second."""
    left = sum(s.steps * s.tokens_per_step * f for s, f in zip(stages[i:], flops[i:]))
    return (left - step * stages[i].tokens_per_step * flops[i]) / (tok_s * flops[i])


def get_lr(step, total_steps, tc):
    """Linear warmup, then a cosine from lr to min_lr at the last step; or, with wsd, lr held until
    the last decay_frac of the steps, then a straight line down to min_lr at the last step."""
    if step < tc.warmup_iters:
        return tc.lr * (step + 1) / (tc.warmup_iters + 1)  # step 0 learns too
    if tc.schedule == "wsd":
        decay = max(1, round(tc.decay_frac * total_steps))
        progress = min(1.0, max(0.0, (step + 1 - total_steps + decay) / decay))
        return tc.lr - progress * (tc.lr - tc.min_lr)
    progress = min(1.0, (step - tc.warmup_iters) / max(1, total_steps - 1 - tc.warmup_iters))
    return tc.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (tc.lr - tc.min_lr)


# ---------------------------------------------------------------------------------------------
# training: Run holds a run's objects and progress; train_stages() is the method, step by step

CHECKPOINT_FORMAT = "patchgpt-3"


def make_model(mc, tc):
    """A run's model, sample.py's too. Every run of a seed starts from the same weights, whatever K or lam:
    the baselines' fairness rests on it, so a module for one stage is made in every run, after the GPT's."""
    torch.manual_seed(tc.seed)
    return GPT(mc)


class Run:
    """What a run trains with (device, data, model, optimizer, batch generator) and how far it has got
    (stage_idx, step, tokens_seen, history, train_time): together, all that a checkpoint holds."""

    def __init__(self, mc, tc, log=print):
        self.tc = tc
        self.world = int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
        self.rank = int(os.environ.get("RANK", 0))
        self.ddp = self.world > 1
        self.master = self.rank == 0  # the process that logs and saves
        self.log = log if self.master else lambda *a: None
        self.device = pick_device(tc.device)
        if self.ddp and self.device.startswith("cuda"):  # one process per GPU
            self.device = f"cuda:{os.environ['LOCAL_RANK']}"
        if self.device.startswith("cuda"):  # this GPU, not GPU 0, for whatever uses the current device
            torch.cuda.set_device(self.device)
        if self.ddp and not torch.distributed.is_initialized():  # gloo: several processes on the CPU
            torch.distributed.init_process_group("nccl" if self.device.startswith("cuda") else "gloo")
        self.device_type = self.device.split(":")[0]
        self.ctx = autocast(self.device_type, tc.dtype)
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls on an Ampere GPU's tensor cores
        self.stages = plan_stages(tc, mc.block_size, self.world)
        need = (mc.block_size + 1) * tc.k  # tokens in one sequence and its target
        with together(self):  # before DDP's first collective, below
            self.vocab = read_vocab(tc.data_dir)  # the data decides the model's vocabulary
            self.mc = mc = fit_vocab(mc, self.vocab)
            self.train_data = load_tokens(os.path.join(tc.data_dir, "train.bin"), need, self.vocab)
            self.val_data = load_tokens(tc.val_bin or os.path.join(tc.data_dir, "val.bin"), need, self.vocab)
        # fixed evaluation windows, from their own generator so that evaluating never shifts training
        eval_rng = np.random.default_rng(tc.seed + 1)
        n_eval = tc.eval_iters * tc.micro_batch
        self.eval_starts = batch_starts(eval_rng, len(self.val_data), 1, mc.block_size, n_eval)
        self.raw_model = make_model(mc, tc).to(self.device)
        self.model = self.raw_model  # what trains: compiled and/or wrapped for DDP
        if tc.compile:  # static shapes: one graph per stage (K*T tokens, then T)
            self.model = torch.compile(self.model, dynamic=False)
        if self.ddp:  # DDP needs a gradient for every parameter in every stage, unless it is told to look
            # for unused ones (find_unused_parameters=True: slower); count_flops() names one that has none
            ids = [self.device] if self.device_type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = None  # made when a stage starts (train_stages)
        self.rng = np.random.default_rng(tc.seed)  # the training batches
        self.stage_idx = 0
        self.step = 0  # optimizer steps done in the current stage
        self.tokens_seen = 0
        self.history = []  # the evaluations
        self.train_time = [0.0] * len(self.stages)  # seconds per stage, without evaluations and saves
        self.timed_tokens = [0] * len(self.stages)  # the tokens trained in those seconds
        self.clock = None  # (time, tokens_seen) at the start of the current progress line's window
        self.losses = []  # the steps' losses since they were last checked
        self.stop = False  # set by Ctrl-C or SIGTERM: save at the end of the step, then stop
        self.eval_due = False  # a stop came at an evaluation step: the resumed run evaluates first
        self.flops = self.count_flops()  # FLOPs per token of each stage, the measure of the run's cost

    def save(self):
        with together(self):  # every process waits for rank 0's write, and stops with it on a full disk
            if self.master:
                self.write_checkpoint()

    def write_checkpoint(self):
        ckpt = {
            "format": CHECKPOINT_FORMAT,
            "model_config": asdict(self.mc),
            "train_config": asdict(self.tc),
            "vocab": self.vocab,  # what sample.py decodes with
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": self.rng.bit_generator.state,
            "stage_idx": self.stage_idx,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "history": self.history,
            "train_time": self.train_time,
            "timed_tokens": self.timed_tokens,
            "eval_due": self.eval_due,
        }
        buf = io.BytesIO()  # serialized in memory first, so that a full disk is a plain OSError
        torch.save(ckpt, buf)
        atomic_write(os.path.join(self.tc.out_dir, "ckpt.pt"), buf.getvalue())

    def load(self, ckpt):
        # a flag added after the checkpoint was made counts as its default, the old code's behaviour
        defaults = {f.name: f.default for f in fields(GPTConfig) + fields(TrainConfig)}
        saved = {**defaults, **ckpt["model_config"], **ckpt["train_config"]}
        for key, new in identity(self.mc, self.tc).items():
            if saved[key] != new:  # 4 and '4' print alike: a change of type names the types
                typed = type(saved[key]) is not type(new)
                was, now = (f"{v!r} ({type(v).__name__})" if typed else v for v in (saved[key], new))
                raise UserError(f"the checkpoint was made with --{key} {was}, not {now}")
        self.optimizer = self.raw_model.configure_optimizer(self.tc, self.device_type)
        for group in ckpt["optimizer"]["param_groups"]:  # AdamW's kernel for this device, not the saver's
            group["fused"] = self.optimizer.defaults["fused"]
        try:
            self.raw_model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError) as e:  # the model was changed since: one line, not a traceback
            raise UserError(f"the checkpoint does not fit this model: {' '.join(str(e).split())}") from None
        self.rng.bit_generator.state = ckpt["rng"]
        self.stage_idx = ckpt["stage_idx"]
        self.step = ckpt["step"]
        self.tokens_seen = ckpt["tokens_seen"]
        self.history = ckpt["history"]
        if "timed_tokens" in ckpt:  # older checkpoints timed first steps too: their speeds start over
            self.train_time = ckpt["train_time"]
            self.timed_tokens = ckpt["timed_tokens"]
        self.eval_due = ckpt.get("eval_due", False)

    @torch.no_grad()
    def evaluate(self, stage):
        """Token-level val loss on the fixed windows, by the uncompiled model (eval shapes differ). DDP
        processes score every world-th batch each: none waits for another (NCCL's watchdog aborts waits)."""
        self.raw_model.eval()
        total = torch.zeros((), device=self.device)
        bs = self.tc.micro_batch
        for i in range(self.rank * bs, len(self.eval_starts), self.world * bs):
            x, y = get_batch(self.val_data, self.eval_starts[i : i + bs], 1, self.mc.block_size, self.device)
            with self.ctx:  # weighted by rows: a short last batch counts for what it holds
                total += self.raw_model(x, y)[1].float() * len(x)
        if self.ddp:
            torch.distributed.all_reduce(total)
        self.raw_model.train()
        loss = (total / len(self.eval_starts)).item()
        self.history.append(dict(stage=stage.name, step=self.step, tokens=self.tokens_seen, val_loss=loss))
        self.eval_due = False
        self.log(f"eval {stage.name} step {self.step}: val loss {loss:.4f} (ppl {math.exp(loss):.1f})")

    def train_step(self, stage, lr):
        """One optimizer step: the gradient of grad_accum micro-batches, clipped, then AdamW.
        Returns the mean loss of the micro-batches, not yet read (reading it would wait for the GPU)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        n = stage.micro_batch
        losses = []
        for micro in range(stage.grad_accum):
            # every process draws the same starts and takes its own slice: one RNG state to save,
            # and N processes see exactly the batches one process would see with N times the rows
            starts = batch_starts(self.rng, len(self.train_data), stage.K, self.mc.block_size, n * self.world)
            mine = starts[self.rank * n : (self.rank + 1) * n]
            x, y = get_batch(self.train_data, mine, stage.K, self.mc.block_size, self.device)
            if self.ddp:  # average gradients across processes on the last micro-step only
                self.model.require_backward_grad_sync = micro == stage.grad_accum - 1
            losses.append(self.forward_backward(self.model, stage, x, y))  # a bad loss in any spoils the step
        if self.tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.tc.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return torch.stack(losses).mean()

    def forward_backward(self, model, stage, x, y):
        """The work of one micro-batch: all that a step computes is here (a second forward, an extra loss),
        so that count_flops(), which runs these lines too, counts it in the cost. Returns the loss."""
        with self.ctx:
            _, loss = model(x, y, patch_size=stage.K)
        (loss / stage.grad_accum).backward()
        return loss.detach()

    def count_flops(self):
        """Before training, a sequence of each stage through forward_backward: its FLOPs per token, and under
        DDP a parameter with no gradient in it. It draws no random number and leaves no gradient."""
        flops = []
        for stage in self.stages:
            x = torch.zeros((1, stage.K * self.mc.block_size), dtype=torch.long, device=self.device)
            # the math kernel of attention is matmuls, which the counter knows on every device
            with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
                self.forward_backward(self.raw_model, stage, x, x)
            flops.append(counter.get_total_flops() / x.numel())
            unused = [name for name, p in self.raw_model.named_parameters() if p.grad is None]
            if self.ddp and unused and not self.model.find_unused_parameters:
                raise UserError(f"{unused[0]} gets no gradient in the {stage.name} stage, which DDP forbids")
            self.raw_model.zero_grad(set_to_none=True)
        return flops

    def after_step(self, i, stage, loss, lr):
        """After an optimizer step: every log_interval steps a check (a bad loss, a Ctrl-C) and a progress
        line; after a Ctrl-C a checkpoint and a stop; every eval_interval an evaluation and a checkpoint."""
        self.losses.append(loss)  # read at the next check, not now: reading a loss waits for the GPU
        if self.clock is None:  # the stage's first step in this process (it compiles) is left out of its time
            synchronize(self.device)
            self.clock = (time.time(), self.tokens_seen)
        last = self.step == stage.steps
        at_eval = self.step % self.tc.eval_interval == 0 or last
        at_log = self.step % self.tc.log_interval == 0 or at_eval
        # one process checks to log or to stop; DDP processes check every step, so that all stop at the same
        # step whichever got the Ctrl-C (torchrun kills them ~30 s after it passes one on)
        stop = self.check(stage) if at_log or self.stop or self.ddp else False
        if not (at_log or stop):  # nothing to report (a DDP process may only have checked)
            return
        synchronize(self.device)  # time the work, not its launch
        seconds = time.time() - self.clock[0]
        tokens = self.tokens_seen - self.clock[1]
        self.train_time[i] += seconds
        self.timed_tokens[i] += tokens
        tok_s = tokens / max(seconds, 1e-9)
        eta = f"{seconds_left(self.stages, self.flops, i, self.step, tok_s) / 60:.1f} min" if tokens else "-"
        self.log(
            f"{stage.name} K={stage.K} step {self.step}/{stage.steps} | tokens {self.tokens_seen:,} | loss "
            f"{loss.item():.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s | ETA {eta}"
        )
        if stop:  # save now, without the evaluation that may be due: torchrun's kill does not wait for one
            self.eval_due = at_eval  # the resumed run makes it first
            self.save()  # every process waits for rank 0's save: torchrun ends all when one exits
            raise KeyboardInterrupt
        if at_eval:
            self.evaluate(stage)
            if not last:  # the last step's save is the switch's (train_stages)
                self.save()
        self.clock = (time.time(), self.tokens_seen)  # the next line times what follows this evaluation

    def check(self, stage):
        """Whether a Ctrl-C came to any process; raises on a non-finite loss in any."""
        n_bad = (~torch.isfinite(torch.stack(self.losses))).sum().float()
        self.losses = []
        flags = torch.stack([n_bad, torch.tensor(float(self.stop), device=self.device)])
        if self.ddp:  # every process learns of a bad loss or a Ctrl-C anywhere
            torch.distributed.all_reduce(flags)
        if flags[0] > 0:  # before any save: a checkpoint never holds weights a bad loss touched
            raise UserError(f"non-finite loss by {stage.name} step {self.step}; try a lower --lr")
        return bool(flags[1] > 0)  # what every process agreed on; a later Ctrl-C counts at the next check


def train_stages(run):
    """The method as code: the stages in order, each with its optimizer and its loop over the steps.
    Starts at run.stage_idx and run.step, so a resumed run goes on exactly where it was saved."""
    tc = run.tc
    for i, stage in enumerate(run.stages):
        if i < run.stage_idx:
            continue  # finished before a resume
        # the switch: the paper starts stage 2 with a fresh AdamW, warmup and cosine (restart);
        # global and wsd keep one AdamW, with its moments, and one schedule across both stages
        restart = tc.schedule == "restart"
        if run.optimizer is None or (restart and run.step == 0):
            run.optimizer = run.raw_model.configure_optimizer(tc, run.device_type)
        first_step = 0 if restart else sum(s.steps for s in run.stages[:i])
        schedule_steps = stage.steps if restart else sum(s.steps for s in run.stages)
        if run.step == 0 or run.eval_due:  # after the switch too: the first point of the stage-2 curve
            run.evaluate(stage)
        run.clock = None  # timing starts after this stage's first step: with --compile it compiles
        while run.step < stage.steps:
            lr = get_lr(first_step + run.step, schedule_steps, tc)
            loss = run.train_step(stage, lr)  # micro-steps, clip, AdamW
            run.step += 1
            run.tokens_seen += stage.tokens_per_step
            run.after_step(i, stage, loss, lr)  # progress, evaluation, checkpoint, stop
        run.stage_idx = i + 1
        run.step = 0
        run.save()  # at the switch and at the end


def train(mc, tc, log=print):
    """One run, new or resumed (tc.resume): the patch stage, then the token stage, or the baseline
    alone. Returns its summary, also written to out_dir/summary.json (None on DDP's other processes)."""
    tc = resolve_dtype(tc)
    run = Run(mc, tc, log)  # first: it joins torchrun's processes, which then stop together on bad input
    ckpt_path = os.path.join(tc.out_dir, "ckpt.pt")
    with together(run):
        if os.path.exists(ckpt_path) and not (tc.resume or tc.overwrite):
            raise UserError(f"{tc.out_dir} holds a run: --resume continues it, --overwrite starts over")
        ckpt = load_checkpoint(ckpt_path) if tc.resume else None
        if ckpt:
            run.load(ckpt)
        if run.master:
            os.makedirs(tc.out_dir, exist_ok=True)
            # a kill mid-write leaves a temp file; --overwrite, an old run
            for name in os.listdir(tc.out_dir):
                if re.fullmatch(r".+\.tmp\d+", name) or (not ckpt and name in ("ckpt.pt", "summary.json")):
                    os.remove(os.path.join(tc.out_dir, name))
    n_params = sum(p.numel() for p in run.raw_model.parameters())
    where = f"{run.device} x {run.world}" if run.ddp else run.device
    cost = f"compute vs token-level training: {plan_cost(run.stages, run.flops):.3f}"
    run.log(f"model: {n_params / 1e6:.2f}M parameters | {where} | {tc.dtype} | {cost}")
    for s in run.stages:  # a patch stage's sequences are K times longer: K x block_size tokens
        shape = f"{s.grad_accum} x {s.micro_batch} sequences of {s.K * mc.block_size} tokens"
        run.log(f"plan: {s.name} stage K={s.K}: {s.steps} steps of {shape}")
    if ckpt:
        run.log(f"resumed from {ckpt_path}: stage {run.stage_idx + 1}, step {run.step}")
    try:
        with ctrl_c_saves(run):
            train_stages(run)
    except KeyboardInterrupt:
        if os.path.exists(ckpt_path):
            raise KeyboardInterrupt(f"{ckpt_path} continues with --resume") from None
        raise KeyboardInterrupt("before the first checkpoint, so there is nothing to resume") from None
    if not run.master:
        return None  # only rank 0 writes the summary
    tokens = [s.steps * s.tokens_per_step for s in run.stages]
    # speeds from the timed steps (a stage's first step in each process is not: it compiles); NaN, also
    # in summary.json, for a stage that ran a single step here
    tok_s = [n / t if n else math.nan for n, t in zip(run.timed_tokens, run.train_time)]
    summary = {
        "k": tc.k,
        "lam": tc.lam,
        "stages": [s.name for s in run.stages],
        "tokens": tokens,
        "time": run.train_time,
        "tok_s": tok_s,
        "compute_cost": plan_cost(run.stages, run.flops),
        # wall time against a token-level run of the same tokens at this run's own token-stage speed
        "measured_cost": sum(n / v for n, v in zip(tokens, tok_s)) / (sum(tokens) / tok_s[-1]),
        "val_loss": run.history[-1]["val_loss"],
        "history": run.history,
        "identity": identity(run.mc, tc),
    }
    atomic_write(os.path.join(tc.out_dir, "summary.json"), json.dumps(summary, indent=1).encode())
    cost = f"compute {summary['compute_cost']:.3f}, measured wall time {summary['measured_cost']:.3f}"
    run.log(f"cost vs token-level training of the same tokens: {cost}")
    run.log(f"final token-level val loss {summary['val_loss']:.4f}, ppl {math.exp(summary['val_loss']):.1f}")
    return summary


# ---------------------------------------------------------------------------------------------
# infrastructure: devices, precision, signals and files; none of it is the method

# Same command, same numbers on a CPU. Intel MKL computes the matmuls and, in AdamW's step, the square
# root (vmsSqrt); unless told otherwise it may pick its code path and its thread count call by call at
# run time, the likely source of the rare last-digit differences seen between runs on a busy machine.
# CBWR=AUTO fixes the code path for this CPU (MKL reads it at its first call: no tensor math happens
# before this line runs at import); set_num_threads turns MKL's dynamic thread count off.
os.environ.setdefault("MKL_CBWR", "AUTO")
torch.set_num_threads(torch.get_num_threads())


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


@contextlib.contextmanager
def ctrl_c_saves(run):
    """Ctrl-C or SIGTERM (kill, timeout, a job scheduler, torchrun passing one on) sets run.stop: the run
    saves at the end of the step and stops. A second Ctrl-C stops a single process at once."""

    def on_signal(signum, frame):
        if run.stop and not run.ddp:
            raise KeyboardInterrupt
        run.stop = True
        run.log(f"{signal.Signals(signum).name}: saving a checkpoint at the end of this step")

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old_handlers.items():
            signal.signal(s, handler)


def gather(value):
    """value from every torchrun process, in rank order (a collective: every process must call it)."""
    values = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


@contextlib.contextmanager
def together(run):
    """A block that every torchrun process leaves at the same point: an error in one (a file that it alone
    cannot read or write) stops the others here too, with Ended, instead of leaving them to wait for it in
    their next collective. One small collective: for setup and saves, not every step."""
    try:
        yield
    except BaseException:
        if run.ddp:
            gather(True)
        raise
    if run.ddp and any(gather(False)):
        raise Ended


def end_processes(code):
    """The one ending of a torchrun run: every process gives its exit code and waits here for all the
    others, then all exit with the highest code, and the first process that has it prints the line.
    Returns that code and whether this process prints."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return code, True
    codes = gather(code)
    says_why = codes.index(max(codes)) == torch.distributed.get_rank()
    if max(codes):  # torchrun sends SIGTERM to the others once one has exited with an error: keep this code
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # gloo's worker threads must end before Python shuts down: one lets go of a collective's tensors after
    # the call has returned, which takes Python's lock, and once Python is shutting down that aborts the
    # process (SIGABRT, "terminate called without an active exception": rank 1 exited just after its last
    # collective, issue 30). They end when the process group is freed, by destroy_process_group() if
    # nothing else holds it: not the DDP model (in reference cycles: collected here), nor the defaults of
    # torch.distributed.nn's functions (they hold the group alive when it is imported: imported before)
    gc.collect()
    torch.distributed.destroy_process_group()
    return max(codes), says_why


def keep_freed_memory():
    """1.4x-1.8x faster steps on 2 CPU cores (bench.py): glibc gives blocks over 32 MB (the logits:
    200 MB) back to the OS when they are freed, and maps them anew; these settings keep them."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX: no mmap for large blocks
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: never give the heap's top back


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


def identity(mc, tc):
    """What a resumed run must share with its checkpoint: every setting but those in RESUMABLE."""
    return {k: v for k, v in {**asdict(mc), **asdict(tc)}.items() if k not in RESUMABLE}


# ---------------------------------------------------------------------------------------------
# command line: a flag per config field; every range check in validate()


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, as every other input error
        die(message, self.prog)


def integer(text):
    """An integer flag, which may be written as 2e9."""
    value = float(text)
    if not math.isfinite(value) or value != int(value):
        raise argparse.ArgumentTypeError(f"must be an integer, got {text}")
    return int(value)


def build_parser(description=__doc__.strip().splitlines()[0]):
    parser = Parser(description=description, conflict_handler="resolve")  # compare.py redefines some
    for f in fields(GPTConfig) + fields(TrainConfig):
        if f.metadata["help"] is None:
            continue  # vocab_size: set by the data, not by a flag
        if f.type is bool:
            parser.add_argument(f"--{f.name}", action="store_true", help=f.metadata["help"])
        else:
            default = f" (default: {f.default})" if f.default != "" else ""
            parser.add_argument(
                f"--{f.name}",
                type=integer if f.type is int else f.type,
                default=f.default,
                choices=f.metadata["choices"],
                help=f.metadata["help"] + default,
            )
    return parser


def configs(args):
    """The two configs from parsed flags, checked; the default data is prepared on first use."""
    flags = vars(args)
    mc = GPTConfig(**{f.name: flags[f.name] for f in fields(GPTConfig) if f.name in flags})
    tc = TrainConfig(**{f.name: flags[f.name] for f in fields(TrainConfig)})
    validate(mc, tc)
    tc = resolve_dtype(tc)
    if not tc.out_dir:
        tc.out_dir = "out/k1" if tc.k == 1 else f"out/k{tc.k}_lam{tc.lam:g}"
    default_data = TrainConfig.data_dir
    if tc.data_dir == default_data and not os.path.exists(os.path.join(default_data, "train.bin")):
        print(f"{default_data}/train.bin not found: preparing Tiny Shakespeare (it ships with patchgpt)")
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prepare_data.py")
        if subprocess.call([sys.executable, script, "--out_dir", default_data]) != 0:
            raise UserError(f"could not prepare {default_data} (see above)")
    return mc, tc


def die(msg, prog="patchgpt", code=2):
    print(f"{os.path.splitext(os.path.basename(prog))[0]}: error: {msg}", file=sys.stderr)
    sys.exit(code)


def main(argv=None, parser=None, action=None):
    """Parse, check, run; any expected failure is one line on stderr and exit code 2 (130: Ctrl-C), the
    same code for every torchrun process (end_processes). compare.py, bench.py and sample.py pass their
    own parser and action."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # so that `| tee` and log files show progress at once
    keep_freed_memory()
    result, code, error = None, 0, None
    try:
        result = action(args) if action else train(*configs(args))
    except UserError as e:
        code, error = 2, str(e)  # not e: its traceback holds the run, and with it the process group
    except OSError as e:  # a full disk, a read-only folder, an --out_dir that is a file: one line
        code, error = 2, f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}"
    except KeyboardInterrupt as e:
        code, error = 130, f"interrupted{f'; {e}' if str(e) else ''}"
    except Ended:  # the process that stopped first gives the code and the line
        pass
    code, says_why = end_processes(code)
    if code and says_why:
        die(error, parser.prog, code)
    if code:
        sys.exit(code)
    return result


if __name__ == "__main__":
    main()
