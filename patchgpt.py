"""
patchgpt: patch-level training of a GPT language model (Shao, Meng, Zhou, ICLR 2025), in one file.

Stage 1 (patch level, a fraction lam of the tokens): each K consecutive token embeddings are averaged
into one "patch", and one output distribution per patch predicts all K tokens of the next patch.
Stage 2 (token level, the rest): plain next-token training, starting from the stage-1 weights.
A run costs lam/K + 1 - lam of token-level training on the same tokens (K=4, lam=2/3: 0.5).

  python patchgpt.py --k 4 --lam 0.67    # the default model and data (Tiny Shakespeare); a CPU will do
  python patchgpt.py --k 1               # the token-level baseline; --help lists every flag
  torchrun --standalone --nproc_per_node=8 patchgpt.py --device cuda ...    # data parallel

This file is the method and the plumbing of a nanoGPT-style script. guards.py holds what nanoGPT does not
have (range checks, exact resume, atomic saves, stopping together, the cost in FLOPs); its docstring says
what each promises and which test holds it. Sampling, comparisons and benchmarks: sample.py, compare.py,
bench.py.
"""

import json
import math
import os
import subprocess
import sys
from collections import OrderedDict, namedtuple
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import guards

# ---------------------------------------------------------------------------------------------
# config: every field is a command-line flag of the same name (guards.validate checks their ranges)


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
    # not a flag: the data decides it (fit_vocab). GPT-2's 50257 ids padded to a multiple of 64 (faster
    # matmuls); a checkpoint from before it existed was GPT-2's
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


# ---------------------------------------------------------------------------------------------
# model: a nanoGPT-class GPT; the only patch-specific lines are in forward() and the patch ops

VOCAB_SIZE = GPTConfig.vocab_size  # the embedding table of GPT-2 tokens


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
# data: uint16 token ids (gpt2 tokens or characters) read through np.memmap, in the vocabulary of the
# meta.json beside them (guards.read_vocab); windows of K*T tokens and their shift by K


def fit_vocab(mc, vocab):
    """mc with the embedding table the data needs: GPT-2's ids padded to VOCAB_SIZE (the published
    numbers), or one row per character, as nanoGPT's shakespeare_char."""
    return replace(mc, vocab_size=VOCAB_SIZE if vocab["tokenizer"] == "gpt2" else vocab["vocab_size"])


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
    layout = (("patch", tc.k, patch_steps), ("token", 1, total - patch_steps))
    guards.check_plan(tc, block_size, world_size, layout)  # a step for each stage, whole sequences
    plan = []
    for name, K, steps in layout:
        if steps == 0:
            continue  # the baseline has no patch stage
        mine = rows // (K * world_size)  # this process's sequences per step
        # the fewest equal passes of at most micro_batch sequences each
        accum = next(a for a in range(1, mine + 1) if mine % a == 0 and mine // a <= tc.micro_batch)
        plan.append(Stage(name, K, steps, mine // accum, accum, tc.tokens_per_step))
    return plan


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
# the run: Run holds a run's objects and progress; train_stages() is the method, step by step


def make_model(mc, tc):
    """A run's model, sample.py's too. Every run of a seed starts from the same weights, whatever K or lam:
    the baselines' fairness rests on it, so a module for one stage is made in every run, after the GPT's."""
    torch.manual_seed(tc.seed)
    return GPT(mc)


class Run:
    """What a run trains with (device, data, model, optimizer, batch generator) and how far it has got
    (stage_idx, step, tokens_seen, history, the clock): together, all that a checkpoint holds."""

    def __init__(self, mc, tc, log=print):
        self.tc = tc
        self.world, self.rank, self.device = guards.join_processes(tc.device)  # torchrun's, or one
        self.ddp = self.world > 1
        self.master = self.rank == 0  # the process that logs and saves
        self.log = log if self.master else lambda *a: None
        self.device_type = self.device.split(":")[0]
        self.ctx = guards.autocast(self.device_type, tc.dtype)
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls on an Ampere GPU's tensor cores
        self.stages = plan_stages(tc, mc.block_size, self.world)
        need = (mc.block_size + 1) * tc.k  # tokens in one sequence and its target
        self.vocab, self.train_data, self.val_data = guards.load_data(tc.data_dir, tc.val_bin, need, self.ddp)
        self.mc = mc = fit_vocab(mc, self.vocab)  # the data decides the model's vocabulary
        # fixed evaluation windows, from their own generator so that evaluating never shifts training
        eval_rng = np.random.default_rng(tc.seed + 1)
        n_eval = tc.eval_iters * tc.micro_batch
        self.eval_starts = batch_starts(eval_rng, len(self.val_data), 1, mc.block_size, n_eval)
        self.raw_model = make_model(mc, tc).to(self.device)
        self.model = self.raw_model  # what trains: compiled and/or wrapped for DDP
        if tc.compile:  # static shapes: one graph per stage (K*T tokens, then T)
            self.model = torch.compile(self.model, dynamic=False)
        if self.ddp:  # DDP needs a gradient for every parameter in every stage (guards.count_flops checks)
            ids = [self.device] if self.device_type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = None  # made when a stage starts (train_stages)
        self.rng = np.random.default_rng(tc.seed)  # the training batches
        self.stage_idx = 0
        self.step = 0  # optimizer steps done in the current stage
        self.tokens_seen = 0
        self.history = []  # the evaluations
        self.eval_due = False  # a stop came at an evaluation step: the resumed run evaluates first
        self.watch = guards.Watch(len(self.stages), self.device, self.ddp, self.log)  # clock, NaNs, Ctrl-C
        self.flops = guards.count_flops(self)  # FLOPs per token of each stage's step: the run's cost

    def save(self):
        ckpt = {
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
            **self.watch.state(),  # the clock of each stage
            "eval_due": self.eval_due,
        }
        guards.save_checkpoint(os.path.join(self.tc.out_dir, "ckpt.pt"), ckpt, self.master, self.ddp)

    def load(self, ckpt):
        guards.check_resume(ckpt, self.mc, self.tc)  # every setting but guards.RESUMABLE must be the same
        self.optimizer = self.raw_model.configure_optimizer(self.tc, self.device_type)
        guards.load_state(self.raw_model, self.optimizer, ckpt)
        self.rng.bit_generator.state = ckpt["rng"]
        self.stage_idx = ckpt["stage_idx"]
        self.step = ckpt["step"]
        self.tokens_seen = ckpt["tokens_seen"]
        self.history = ckpt["history"]
        self.watch.load(ckpt)
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
        """One optimizer step: the gradient of grad_accum micro-batches, clipped, then AdamW. Returns the mean
        loss of the micro-batches, not yet read (reading it would wait for the GPU). Before training,
        guards.count_flops makes one such step of each stage on a copy: all it computes is in the cost."""
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
        """The work of one micro-batch (a second forward or an extra loss goes here too). Returns the loss."""
        with self.ctx:
            _, loss = model(x, y, patch_size=stage.K)
        (loss / stage.grad_accum).backward()
        return loss.detach()

    def after_step(self, i, stage, loss, lr):
        """Every log_interval steps a progress line; every eval_interval an evaluation and a checkpoint;
        after a Ctrl-C or SIGTERM that every process agreed on, a checkpoint and a stop."""
        last = self.step == stage.steps
        at_eval = self.step % self.tc.eval_interval == 0 or last
        at_log = self.step % self.tc.log_interval == 0 or at_eval
        # the stop protocol (when processes check, agree and stop) is guards.Watch; a loop edit that breaks
        # exact resume fails test_sigkill_then_resume_gives_identical_weights
        stop = self.watch.step_done(loss, self.tokens_seen, stage, self.step, check_due=at_log)
        if not (at_log or stop):
            return
        tok_s = self.watch.lap(i, self.tokens_seen)
        eta = guards.eta(self.stages, self.flops, i, self.step, tok_s)
        self.log(
            f"{stage.name} K={stage.K} step {self.step}/{stage.steps} | tokens {self.tokens_seen:,} | loss "
            f"{loss.item():.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s | ETA {eta}"
        )
        if stop:  # save now, without the evaluation that may be due: torchrun's kill does not wait for one
            self.eval_due = at_eval  # the resumed run makes it first
            self.save()
            raise KeyboardInterrupt
        if at_eval:
            self.evaluate(stage)
            if not last:  # the last step's save is the switch's (train_stages)
                self.save()
        self.watch.restart(self.tokens_seen)  # the next line times what follows this evaluation


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
        run.watch.new_stage()  # its clock starts after the stage's first step: with --compile it compiles
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
    tc = guards.resolve_dtype(tc)
    run = Run(mc, tc, log)  # first: it joins torchrun's processes, which then stop together on bad input
    with guards.together(run.ddp):
        ckpt = guards.out_dir_checkpoint(tc)  # None for a new run
        if ckpt:
            run.load(ckpt)
        if run.master:
            guards.clean_out_dir(tc.out_dir, resumed=bool(ckpt))
    n_params = sum(p.numel() for p in run.raw_model.parameters())
    where = f"{run.device} x {run.world}" if run.ddp else run.device
    cost = f"compute vs token-level training: {guards.plan_cost(run.stages, run.flops):.3f}"
    run.log(f"model: {n_params / 1e6:.2f}M parameters | {where} | {tc.dtype} | {cost}")
    for s in run.stages:  # a patch stage's sequences are K times longer: K x block_size tokens
        shape = f"{s.grad_accum} x {s.micro_batch} sequences of {s.K * mc.block_size} tokens"
        run.log(f"plan: {s.name} stage K={s.K}: {s.steps} steps of {shape}")
    ckpt_path = os.path.join(tc.out_dir, "ckpt.pt")
    if ckpt:
        run.log(f"resumed from {ckpt_path}: stage {run.stage_idx + 1}, step {run.step}")
    with run.watch.signals(ckpt_path):  # Ctrl-C or SIGTERM: a checkpoint at the end of the step, then a stop
        train_stages(run)
    if not run.master:
        return None  # only rank 0 writes the summary
    summary = {
        "k": tc.k,
        "lam": tc.lam,
        "stages": [s.name for s in run.stages],
        **guards.costs(run.stages, run.flops, run.watch),  # tokens, time, speed, compute and wall cost
        "val_loss": run.history[-1]["val_loss"],
        "history": run.history,
        "identity": guards.identity(run.mc, tc),
    }
    guards.atomic_write(os.path.join(tc.out_dir, "summary.json"), json.dumps(summary, indent=1).encode())
    cost = f"compute {summary['compute_cost']:.3f}, measured wall time {summary['measured_cost']:.3f}"
    run.log(f"cost vs token-level training of the same tokens: {cost}")
    run.log(f"final token-level val loss {summary['val_loss']:.4f}, ppl {math.exp(summary['val_loss']):.1f}")
    return summary


# ---------------------------------------------------------------------------------------------
# command line: a flag per config field


def build_parser(description=__doc__.strip().splitlines()[0]):
    parser = guards.Parser(description=description, conflict_handler="resolve")  # compare.py redefines some
    for f in fields(GPTConfig) + fields(TrainConfig):
        if f.metadata["help"] is None:
            continue  # vocab_size: set by the data, not by a flag
        if f.type is bool:
            parser.add_argument(f"--{f.name}", action="store_true", help=f.metadata["help"])
        else:
            default = f" (default: {f.default})" if f.default != "" else ""
            parser.add_argument(
                f"--{f.name}",
                type=guards.integer if f.type is int else f.type,
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
    guards.validate(mc, tc)
    tc = guards.resolve_dtype(tc)
    if not tc.out_dir:
        tc.out_dir = "out/k1" if tc.k == 1 else f"out/k{tc.k}_lam{tc.lam:g}"
    default_data = TrainConfig.data_dir
    if tc.data_dir == default_data and not os.path.exists(os.path.join(default_data, "train.bin")):
        print(f"{default_data}/train.bin not found: preparing Tiny Shakespeare (it ships with patchgpt)")
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prepare_data.py")
        if subprocess.call([sys.executable, script, "--out_dir", default_data]) != 0:
            raise guards.UserError(f"could not prepare {default_data} (see above)")
    return mc, tc


def main(argv=None, parser=None, action=None):
    """Parse, check, train; an expected failure is one line and exit code 2 (guards.run_main). compare.py,
    bench.py and sample.py pass their own parser and action."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    return guards.run_main(lambda: action(args) if action else train(*configs(args)), parser.prog)


if __name__ == "__main__":
    main()
