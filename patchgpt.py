"""
patchgpt: patch-level training of a GPT language model, in one file.

Patch-level training (Shao, Meng, Zhou, ICLR 2025) trains an ordinary GPT in two stages:
  stage 1 (patch level, a fraction lam of the tokens): every K consecutive tokens are averaged into
          one "patch" embedding and the model predicts all K tokens of the next patch at once;
  stage 2 (token level, the rest): plain next-token training, starting from the stage-1 weights.
A patch step reads K times more text for the same compute, so the run costs lam/K + 1 - lam of
token-level training on the same data (K=4, lam=2/3 -> 0.5). The final model is an ordinary GPT.

Usage (run `python prepare_data.py` first, or let the default run prepare Tiny Shakespeare):
  CPU, the default small model:   python patchgpt.py --k 4 --lam 0.67
  token-level baseline:           python patchgpt.py --k 1
  one GPU, a GPT-2-small shape:   python patchgpt.py --k 4 --lam 0.67 --device cuda --compile \\
                                      --n_layer 12 --n_head 12 --n_embd 768 --block_size 1024 \\
                                      --batch_size 16 --grad_accum 32 --tokens 2e9 --data_dir data/mydata
  several GPUs:                   torchrun --standalone --nproc_per_node=8 patchgpt.py --k 4 --lam 0.67 ...
  sample from a trained model:    python patchgpt.py --sample --out_dir out/k4_lam0.67 --prompt "ROMEO:"
  compare with the baselines:     python patchgpt.py --compare --k 2,4,8 --lam 0.5,0.67
"""

import argparse
import ctypes
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# config


@dataclass
class GPTConfig:
    block_size: int = 128  # positions per sequence (tokens at K=1, patches at K>1)
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for faster matmuls
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 128  # embedding width
    dropout: float = 0.0  # the paper trains without dropout
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2


@dataclass
class TrainConfig:
    k: int = 4  # patch size K for stage 1 (1 = ordinary token-level training)
    lam: float = 0.67  # fraction of the token budget trained at patch level
    tokens: int = 500_000  # total training tokens, both stages together
    batch_size: int = 8  # sequences per micro-step in the token stage
    grad_accum: int = 2  # micro-steps per optimizer step in the token stage
    lr: float = 1e-3  # peak learning rate of each stage's cosine schedule
    min_lr: float = 1e-4  # learning rate at the end of the cosine
    warmup_iters: int = 20  # linear warmup steps at the start of each stage
    schedule: str = "restart"  # "restart": fresh AdamW + warmup per stage (paper); "global": one of each
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # clip the global gradient norm (0 = off)
    eval_interval: int = 50  # optimizer steps between evaluations and checkpoints
    eval_iters: int = 20  # validation batches per evaluation (a fixed set, the same every time)
    log_interval: int = 10  # optimizer steps between progress lines
    data_dir: str = "data/tinyshakespeare"  # folder with train.bin and val.bin (uint16 gpt2 tokens)
    val_bin: str = ""  # a different val.bin to evaluate on (e.g. WikiText-103 test), optional
    out_dir: str = ""  # checkpoints and logs; default out/k{K}_lam{lam}
    device: str = "auto"  # auto picks cuda, then mps, then cpu
    dtype: str = "auto"  # auto: bfloat16 autocast on cuda, float32 elsewhere
    compile: bool = False  # torch.compile the model (recompiles once, at the stage switch)
    seed: int = 1337
    resume: bool = False  # continue the run saved in out_dir
    overwrite: bool = False  # start over even if out_dir holds a run
    allow_budget_change: bool = False  # with resume: accept a different --tokens than the checkpoint's


# -----------------------------------------------------------------------------
# model: a nanoGPT-class GPT; the only patch-specific lines are in forward() and the patch ops below


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied input/output embeddings
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections down so the residual stream does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None, patch_size=1):
        """idx: (B, K*T) token ids; targets: the same window shifted by K tokens, or None.
        Returns logits (B, T, vocab), one distribution per patch, and the next-patch loss.
        patch_size=1 is ordinary next-token prediction through exactly the same lines."""
        K = patch_size
        B, L = idx.shape
        assert L % K == 0, f"sequence length {L} is not a multiple of the patch size {K}"
        T = L // K
        assert T <= self.config.block_size, f"{T} positions > block_size {self.config.block_size}"
        tok_emb = self.transformer.wte(idx)  # (B, K*T, C)
        x = patch_embed(tok_emb, K)  # (B, T, C): patch t = mean of its K token embeddings
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(x + self.transformer.wpe(pos))  # patch t gets position t
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab)
        loss = None if targets is None else next_patch_loss(logits, targets, K)
        return logits, loss

    def configure_optimizer(self, tc, device_type):
        # weight decay on matrices only, not on biases and LayerNorm gains (GPT-2 / nanoGPT)
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # the fused kernel is one launch for all parameters instead of several per tensor
        fused = device_type == "cuda"
        return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=1e-8, fused=fused)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Token-level sampling: after stage 2 the model is an ordinary GPT."""
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size :]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            next_id = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, next_id), dim=1)
        return idx


def flops_per_position(config):
    """Training FLOPs (forward + backward) for one position of a full block: 6 per weight that
    multiplies the position (the lm_head included, the position table excluded), plus attention
    scores and values (PaLM appendix B / nanoGPT). The patch average is a mean of K vectors:
    negligible, so a patch position costs what a token position costs."""
    c = config
    n_matmul = 12 * c.n_layer * c.n_embd**2 + c.n_embd * c.vocab_size
    return 6 * n_matmul + 12 * c.n_layer * c.n_embd * c.block_size


# -----------------------------------------------------------------------------
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


# -----------------------------------------------------------------------------
# data: uint16 token files read through np.memmap; batches of K*T tokens and their shift by K


def say(msg):
    print(msg, flush=True)  # flushed so that `| tee` and log files show progress as it happens


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit code 2, nothing overwritten."""


def load_tokens(path, vocab_size):
    """Open a .bin of uint16 gpt2 token ids, checking what would otherwise fail mid-run."""
    if not os.path.exists(path):
        raise UserError(f"{path} not found; run prepare_data.py first (see --help)")
    size = os.path.getsize(path)
    if size == 0:
        raise UserError(f"{path} is empty")
    if size % 2:
        raise UserError(f"{path} has an odd size ({size} bytes): not a file of uint16 tokens")
    data = np.memmap(path, dtype=np.uint16, mode="r")
    top = int(data.max())
    if top >= vocab_size:
        raise UserError(f"{path} holds token id {top} >= vocab size {vocab_size}: not gpt2 tokens")
    return data


def data_paths(tc):
    return os.path.join(tc.data_dir, "train.bin"), tc.val_bin or os.path.join(tc.data_dir, "val.bin")


def data_fingerprint(data):
    """Identify a token file by content, cheaply: its length and a hash of a few slices."""
    n = len(data)
    picks = np.concatenate([data[i : i + 4096] for i in (0, n // 2, max(0, n - 4096))])
    return f"{n}:{hashlib.sha1(picks.tobytes()).hexdigest()[:16]}"


def batch_starts(rng, n_tokens, K, block_size, n):
    """n random window starts; a window is K*T tokens for x plus K more for the last patch's target."""
    return rng.integers(0, n_tokens - (block_size + 1) * K + 1, size=n)


def get_batch(data, starts, K, block_size, device):
    """x: (B, K*T) tokens from each start; y: the same windows shifted by K tokens, so every patch,
    the last one included, has a target patch (the paper's code instead drops the last patch)."""
    L = K * block_size
    x = torch.from_numpy(np.stack([data[i : i + L] for i in starts]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + K : i + K + L] for i in starts]).astype(np.int64))
    if device.startswith("cuda"):
        # pinned host memory lets the copy overlap with the previous step's kernels
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# -----------------------------------------------------------------------------
# training


@dataclass
class Stage:
    name: str  # "patch" or "token"
    K: int  # patch size (1 = token level)
    steps: int  # optimizer steps
    micro_batch: int  # sequences per micro-step (per process)
    grad_accum: int  # micro-steps per optimizer step
    tokens_per_step: int  # tokens read per optimizer step, all processes together

    @property
    def tokens(self):
        return self.steps * self.tokens_per_step


def plan_stages(tc, block_size, world_size=1):
    """Split the token budget into a patch stage (lam) and a token stage (1 - lam).
    As in the paper, both stages read the same number of tokens per optimizer step; a patch
    sequence holds K*block_size tokens, so a patch step has 1/K of the sequences of a token
    step and costs about 1/K of the compute. With several processes the tokens per step stay
    the same and each process does its share of the micro-steps."""
    K, _ = effective_k_lam(tc)
    rows = tc.batch_size * tc.grad_accum  # token-level sequences per optimizer step, all processes
    tokens_per_step = rows * block_size
    total_steps = max(1, round(tc.tokens / tokens_per_step))
    steps1 = round(tc.lam * total_steps) if K > 1 else 0
    if steps1 == total_steps:
        raise UserError(f"--tokens {tc.tokens} makes only {total_steps} steps of {tokens_per_step} tokens, "
                        f"none left for the token stage at lam={tc.lam}; raise --tokens or lower --lam")
    stages = [("patch", K, steps1)] if steps1 > 0 else []
    stages.append(("token", 1, total_steps - steps1))
    plan = []
    for name, k, steps in stages:
        if rows % (k * world_size):
            raise UserError(f"batch_size*grad_accum = {rows} sequences per step must be divisible by "
                            f"K*processes = {k}*{world_size}, so that every stage and process gets whole sequences")
        mine = rows // (k * world_size)  # this process's sequences per step
        # fewest micro-steps whose micro-batch still fits in batch_size sequences
        accum = next(a for a in range(1, mine + 1) if mine % a == 0 and mine // a <= tc.batch_size)
        plan.append(Stage(name, k, steps, mine // accum, accum, tokens_per_step))
    return plan


def effective_k_lam(tc):
    """(K, lam) as trained: K=1 or lam=0 both mean the token-level baseline."""
    return (tc.k, tc.lam) if tc.k > 1 and tc.lam > 0 else (1, 0.0)


def cost_factor(K, lam):
    """Compute of patch-level training relative to token-level training on the same tokens."""
    return lam / K + 1 - lam


def get_lr(step, total_steps, tc):
    """Linear warmup, then cosine decay from lr to min_lr at the last step."""
    if step < tc.warmup_iters:
        return tc.lr * (step + 1) / (tc.warmup_iters + 1)
    progress = (step - tc.warmup_iters) / max(1, total_steps - 1 - tc.warmup_iters)
    return tc.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))) * (tc.lr - tc.min_lr)


@torch.no_grad()
def estimate_loss(model, data, starts, K, block_size, batch_size, device, ctx):
    """Mean loss over a fixed set of windows (the same starts at every evaluation, so the
    curve moves only because the model does). K=1 gives the token-level loss that patch runs
    and baselines are compared on."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(starts), batch_size):
        x, y = get_batch(data, starts[i : i + batch_size], K, block_size, device)
        with ctx:
            _, loss = model(x, y, patch_size=K)
        total += loss.float() * len(x)  # weighted by rows: a short last batch counts as much as it holds
    model.train(was_training)
    return (total / len(starts)).item()


def atomic_save(obj, path):
    """Write to a temp file in the same folder, fsync, then rename: a kill mid-save leaves the
    previous checkpoint as it was, since rename replaces a file in one step."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk or Ctrl-C mid-save: drop the partial file, keep the old one
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path):
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path} to resume from")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, or not a torch file at all
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "patchgpt-1":
        raise UserError(f"{path} is not a patchgpt checkpoint")
    return ckpt


def run_identity(mc, tc, train_data, val_data):
    """What a resumed run must share with the checkpoint it continues: everything that changes
    the weights or the evaluation (not logging, device or eval_interval)."""
    return {
        "model": asdict(mc),
        "k": tc.k,
        "lam": tc.lam,
        "tokens": tc.tokens,
        "batch": [tc.batch_size, tc.grad_accum],
        "optimizer": [tc.lr, tc.min_lr, tc.warmup_iters, tc.schedule, tc.weight_decay, tc.beta1, tc.beta2,
                      tc.grad_clip],
        "seed": tc.seed,
        "eval_iters": tc.eval_iters,
        "train_data": data_fingerprint(train_data),
        "val_data": data_fingerprint(val_data),
    }


def check_identity(saved, now, allow_budget_change):
    for key in now:
        if key == "tokens" and allow_budget_change:
            continue
        was, new = saved.get(key), now[key]
        if was != new:
            if isinstance(was, dict) and isinstance(new, dict):  # name the one field that differs
                key, was, new = next((f"{key}.{k}", was.get(k), v) for k, v in new.items() if was.get(k) != v)
            hint = " (pass --allow_budget_change to accept)" if key == "tokens" else ""
            raise UserError(f"checkpoint was made with {key}={was}, this command has {key}={new}{hint}")


class Run:
    """Everything a training run holds: model, data, optimizer, progress. Small on purpose:
    the loop itself is in run_stage()."""

    def __init__(self, mc, tc, log=say):
        self.mc, self.tc, self.log = mc, tc, log
        # distributed data parallel when launched by torchrun
        self.ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.master = self.rank == 0
        self.device = pick_device(tc.device)
        if self.ddp:
            import torch.distributed as dist

            if self.device.startswith("cuda"):
                self.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group(backend="nccl" if self.device.startswith("cuda") else "gloo")
        self.device_type = self.device.split(":")[0]  # cuda, mps or cpu
        self.dtype = tc.dtype if tc.dtype != "auto" else ("bfloat16" if self.device_type == "cuda" else "float32")
        ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype]
        self.ctx = (nullcontext() if ptdtype == torch.float32
                    else torch.autocast(device_type=self.device_type, dtype=ptdtype))
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=(ptdtype == torch.float16))
        if self.device_type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        self.stages = plan_stages(tc, mc.block_size, self.world)
        self.train_data, self.val_data = (load_tokens(p, mc.vocab_size) for p in data_paths(tc))
        for name, data in (("train", self.train_data), ("val", self.val_data)):
            need = (mc.block_size + 1) * max(s.K for s in self.stages)
            if len(data) < need:
                raise UserError(f"{name} data has {len(data)} tokens, fewer than one sequence "
                                f"of (block_size+1)*K = {need}; use more data or a smaller --block_size")
        # fixed evaluation windows, from their own generator so evaluating never shifts training
        eval_rng = np.random.default_rng(tc.seed + 1)
        n_eval = tc.eval_iters * tc.batch_size
        self.eval_token = batch_starts(eval_rng, len(self.val_data), 1, mc.block_size, n_eval)
        K = self.stages[0].K
        self.eval_patch = batch_starts(eval_rng, len(self.val_data), K, mc.block_size, n_eval // K or 1)

        torch.manual_seed(tc.seed)
        self.raw_model = GPT(mc).to(self.device)
        self.model = self.raw_model
        if tc.compile:
            # static shapes: one graph per stage (K*T tokens, then T), instead of a slower dynamic one
            self.model = torch.compile(self.model, dynamic=False)
        if self.ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.model, device_ids=[self.device] if self.device_type == "cuda" else None)
        self.optimizer = None
        self.rng = np.random.default_rng(tc.seed)  # the training batches; saved in checkpoints
        # progress, all saved in checkpoints
        self.stage_idx = 0
        self.step = 0
        self.tokens_seen = 0
        self.history = []  # one dict per evaluation
        self.train_time = [0.0] * len(self.stages)  # seconds spent in training steps, per stage
        self.identity = run_identity(mc, tc, self.train_data, self.val_data)
        self.ckpt_path = os.path.join(tc.out_dir, "ckpt.pt")
        self.stop_requested = False

    # ---- checkpoints

    def state_dict(self):
        return {
            "format": "patchgpt-1",
            "identity": self.identity,
            "model_config": asdict(self.mc),
            "train_config": asdict(self.tc),
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "stage_idx": self.stage_idx,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "history": self.history,
            "train_time": self.train_time,
            "rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if self.device_type == "cuda" else None,
            "scaler": self.scaler.state_dict(),
        }

    def save(self):
        if self.master:
            atomic_save(self.state_dict(), self.ckpt_path)

    def restore(self, ckpt):
        check_identity(ckpt["identity"], self.identity, self.tc.allow_budget_change)
        self.raw_model.load_state_dict(ckpt["model"])
        self.stage_idx, self.step, self.tokens_seen = ckpt["stage_idx"], ckpt["step"], ckpt["tokens_seen"]
        self.history, self.train_time = ckpt["history"], ckpt["train_time"]
        self.rng.bit_generator.state = ckpt["rng"]
        torch.set_rng_state(ckpt["torch_rng"])
        if ckpt["cuda_rng"] is not None and self.device_type == "cuda":
            torch.cuda.set_rng_state(ckpt["cuda_rng"])
        if ckpt["scaler"]:
            self.scaler.load_state_dict(ckpt["scaler"])
        if ckpt["optimizer"] is not None:
            self.optimizer = self.raw_model.configure_optimizer(self.tc, self.device_type)
            self.optimizer.load_state_dict(ckpt["optimizer"])

    # ---- evaluation

    def evaluate(self, stage):
        """Token-level (and, in the patch stage, patch-level) val loss of the uncompiled model:
        eval shapes differ from training shapes, and a compiled graph per shape is not worth it."""
        mc, tc = self.mc, self.tc
        args = (mc.block_size, tc.batch_size, self.device, self.ctx)
        rec = {"stage": stage.name, "step": self.step, "tokens": self.tokens_seen,
               "flops": self.flops_done(), "train_time": sum(self.train_time)}
        rec["val_loss"] = estimate_loss(self.raw_model, self.val_data, self.eval_token, 1, *args)
        if stage.K > 1:
            rec["val_patch_loss"] = estimate_loss(self.raw_model, self.val_data, self.eval_patch, stage.K, *args)
        self.history.append(rec)
        extra = f" | val patch loss {rec['val_patch_loss']:.4f}" if "val_patch_loss" in rec else ""
        self.log(f"eval {stage.name} step {self.step}: val loss {rec['val_loss']:.4f} "
                 f"(ppl {math.exp(rec['val_loss']):.1f}){extra}")
        write_jsonl(os.path.join(tc.out_dir, "log.jsonl"), self.history)

    def evaluated(self, stage):
        return any(h["stage"] == stage.name and h["step"] == self.step for h in self.history)

    def flops_done(self):
        """Training FLOPs so far: positions processed times FLOPs per position."""
        per_pos = flops_per_position(self.mc)
        done = 0
        for i, s in enumerate(self.stages):
            steps = s.steps if i < self.stage_idx else (self.step if i == self.stage_idx else 0)
            done += steps * s.tokens_per_step // s.K * per_pos
        return done


def write_jsonl(path, records):
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=1))


def write_text(path, text):
    tmp = path + ".tmp"  # written whole, then renamed: readers never see half a file
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def pick_device(name):
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


class TrainingDiverged(Exception):
    pass


def check_finite(run, losses, first_step, stage):
    """Losses are checked in batches (at log time, before every save) so the GPU is not synced
    every step. Under DDP every process learns whether any of them saw a bad loss, so all stop."""
    vals = torch.stack(losses).float().cpu()
    bad = (~torch.isfinite(vals)).nonzero()
    any_bad = len(bad) > 0
    if run.ddp:
        flag = torch.tensor([float(any_bad)], device=run.device)
        torch.distributed.all_reduce(flag)
        any_bad = flag.item() > 0
    if any_bad:
        where = (f"loss is {vals[bad[0]].item()} at {stage.name} stage step {first_step + int(bad[0]) + 1}"
                 if len(bad) else f"another process saw a non-finite loss in the {stage.name} stage")
        raise TrainingDiverged(f"{where}; stopped without saving, the last good checkpoint is kept "
                               "(try a lower --lr)")


def train_step(run, stage, lr):
    """One optimizer step: grad_accum micro-steps of micro_batch sequences of K*T tokens each.
    Returns the last micro-step's loss as a tensor (reading it would sync the GPU)."""
    model = run.model
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    n_rows = stage.micro_batch * run.world  # rows drawn per micro-step, all processes together
    for micro in range(stage.grad_accum):
        # every process draws the same starts and takes its own slice: one RNG state to save,
        # and N processes see exactly the batches one process would see with N times the rows
        starts = batch_starts(run.rng, len(run.train_data), stage.K, run.mc.block_size, n_rows)
        mine = starts[run.rank * stage.micro_batch : (run.rank + 1) * stage.micro_batch]
        x, y = get_batch(run.train_data, mine, stage.K, run.mc.block_size, run.device)
        if run.ddp:  # average gradients across processes only on the last micro-step
            model.require_backward_grad_sync = micro == stage.grad_accum - 1
        with run.ctx:
            _, loss = model(x, y, patch_size=stage.K)
        run.scaler.scale(loss / stage.grad_accum).backward()
    if run.tc.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), run.tc.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def run_stage(run, stage):
    """Train one stage from run.step to stage.steps: the classic loop of micro-steps with
    gradient accumulation, clipping, AdamW, logging, periodic evaluation and checkpoints."""
    tc = run.tc
    if run.optimizer is None:
        run.optimizer = run.raw_model.configure_optimizer(tc, run.device_type)
    # the global schedule spans both stages; the paper restarts warmup + cosine for stage 2
    offset = sum(s.steps for s in run.stages[: run.stage_idx]) if tc.schedule == "global" else 0
    sched_steps = sum(s.steps for s in run.stages) if tc.schedule == "global" else stage.steps
    losses, first = [], run.step  # losses since the last check, and the step of the first one
    clock = StageClock(run)
    run.model.train()
    while run.step < stage.steps:
        if run.step % tc.eval_interval == 0 and not run.evaluated(stage):
            clock.pause()
            if losses:  # never checkpoint weights that a bad loss has already touched
                check_finite(run, losses, first, stage)
                losses, first = [], run.step
            if run.master:
                run.evaluate(stage)
                run.save()
            clock.resume()
        lr = get_lr(run.step + offset, sched_steps, tc)
        losses.append(train_step(run, stage, lr))
        run.step += 1
        run.tokens_seen += stage.tokens_per_step
        last = run.step == stage.steps
        if run.step % tc.log_interval == 0 or last or (run.stop_requested and not run.ddp):
            check_finite(run, losses, first, stage)  # the one host sync per log interval
            tok_s = clock.tokens_per_sec()
            if run.master:
                run.log(f"{stage.name} K={stage.K} step {run.step}/{stage.steps} | tokens "
                        f"{fmt_count(run.tokens_seen)} | loss {losses[-1].item():.4f} | lr {lr:.2e} | "
                        f"{fmt_count(tok_s)} tok/s | ETA {fmt_time(eta(run, stage, tok_s))}")
            losses, first = [], run.step
            if run.ddp:  # every process must stop at the same step on Ctrl-C
                flag = torch.tensor([float(run.stop_requested)], device=run.device)
                torch.distributed.all_reduce(flag)
                run.stop_requested = flag.item() > 0
            if run.stop_requested:
                clock.pause()
                run.save()
                raise KeyboardInterrupt
    clock.pause()
    # end of stage: a final evaluation, then a checkpoint that starts the next stage
    if run.master and not run.evaluated(stage):
        run.evaluate(stage)
    run.stage_idx += 1
    run.step = 0
    if tc.schedule == "restart":
        run.optimizer = None  # the paper: stage 2 starts with a fresh optimizer
    run.save()


def sync_device(device):
    """Wait for queued GPU work, so wall-clock timings measure the work itself."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


class StageClock:
    """Wall time of training steps only (evaluation and checkpoints excluded), added to
    run.train_time so that throughput and cost ratios compare like with like."""

    def __init__(self, run):
        self.run, self.idx = run, run.stage_idx
        self.t = time.time()
        self.tokens = run.tokens_seen

    def sync(self):
        sync_device(self.run.device)

    def pause(self):
        self.sync()
        self.run.train_time[self.idx] += time.time() - self.t
        self.t = None

    def resume(self):
        self.t = time.time()
        self.tokens = self.run.tokens_seen

    def tokens_per_sec(self):
        """Throughput since the last call; the clock keeps running."""
        self.sync()
        now = time.time()
        self.run.train_time[self.idx] += now - self.t
        rate = (self.run.tokens_seen - self.tokens) / max(now - self.t, 1e-9)
        self.t, self.tokens = now, self.run.tokens_seen
        return rate


def eta(run, stage, tok_s):
    """Seconds left: the rest of this stage at its speed, later stages scaled by their cost."""
    left = (stage.steps - run.step) * stage.tokens_per_step
    for s in run.stages[run.stage_idx + 1 :]:
        left += s.tokens * stage.K / s.K  # a token step costs K patch steps
    return left / max(tok_s, 1e-9)


def fmt_count(n):
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def summarize(run):
    """Per stage and in total: tokens, steps, positions, FLOPs, training time, throughput;
    and the measured cost against token-level training of the same tokens."""
    per_pos = flops_per_position(run.mc)
    rows = []
    for s, secs in zip(run.stages, run.train_time):
        positions = s.tokens // s.K
        rows.append({"stage": s.name, "K": s.K, "tokens": s.tokens, "steps": s.steps, "positions": positions,
                     "flops": positions * per_pos, "time": secs, "tok_s": s.tokens / max(secs, 1e-9)})
    total = {key: sum(r[key] for r in rows) for key in ("tokens", "steps", "positions", "flops", "time")}
    total["tok_s"] = total["tokens"] / max(total["time"], 1e-9)
    K, lam = effective_k_lam(run.tc)
    # a token-level run of the same tokens, timed at this run's own token-stage speed
    token_time = total["tokens"] / rows[-1]["tok_s"]
    final = run.history[-1] if run.history else {}
    return {
        "k": K, "lam": lam, "stages": rows, "total": total,
        "predicted_cost": cost_factor(K, lam),
        "flops_ratio": total["flops"] / (total["tokens"] * per_pos),
        "measured_cost": total["time"] / token_time,
        "val_loss": final.get("val_loss"), "history": run.history,
        "params": run.raw_model.num_params(), "model": asdict(run.mc), "identity": run.identity,
    }


def print_summary(s, log=say):
    log("")
    log(f"{'stage':<8}{'K':>3}{'tokens':>10}{'steps':>7}{'positions':>11}{'FLOPs':>10}{'time':>9}{'tok/s':>9}")
    for r in s["stages"] + [dict(s["total"], stage="total", K="")]:
        log(f"{r['stage']:<8}{r['K']:>3}{fmt_count(r['tokens']):>10}{r['steps']:>7}{fmt_count(r['positions']):>11}"
            f"{fmt_count(r['flops']):>10}{fmt_time(r['time']):>9}{fmt_count(r['tok_s']):>9}")
    log(f"cost vs token-level training of the same tokens: predicted {s['predicted_cost']:.3f} "
        f"(lam/K + 1 - lam), FLOPs {s['flops_ratio']:.3f}, measured wall time {s['measured_cost']:.3f} "
        "(timed against this run's own token-stage speed)")
    if s["val_loss"] is not None:
        log(f"final token-level val loss {s['val_loss']:.4f} (perplexity {math.exp(s['val_loss']):.2f})")


def train(mc, tc, log=say):
    """One two-stage run (or a token-level baseline when K=1 or lam=0). Returns the summary."""
    ckpt_path = os.path.join(tc.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(ckpt_path) if tc.resume else None
    if ckpt is None and os.path.exists(ckpt_path) and not tc.overwrite:
        raise UserError(f"{tc.out_dir} already holds a run; pass --resume to continue it, "
                        "--overwrite to start over, or choose another --out_dir")
    run = Run(mc, tc, log)
    if ckpt is not None:
        run.restore(ckpt)
    master_log = log if run.master else (lambda *a: None)
    run.log = master_log
    if run.master:
        os.makedirs(tc.out_dir, exist_ok=True)
        if ckpt is None:  # a fresh run must not inherit an old eval log or summary
            write_jsonl(os.path.join(tc.out_dir, "log.jsonl"), [])
            if os.path.exists(os.path.join(tc.out_dir, "summary.json")):
                os.remove(os.path.join(tc.out_dir, "summary.json"))
    K, lam = effective_k_lam(tc)
    master_log(f"model: {run.raw_model.num_params(False) / 1e6:.2f}M parameters "
               f"({run.raw_model.num_params() / 1e6:.2f}M without the position table) | device {run.device}"
               f"{f' x {run.world} processes' if run.ddp else ''}")
    for s in run.stages:
        master_log(f"plan: {s.name} stage K={s.K}: {s.steps} steps x {fmt_count(s.tokens_per_step)} tokens = "
                   f"{fmt_count(s.tokens)} tokens ({s.grad_accum} x {s.micro_batch} sequences of {s.K * mc.block_size} tokens)")
    master_log(f"predicted cost vs token-level training: lam/K + 1 - lam = {cost_factor(K, lam):.3f}")
    if ckpt is not None:
        master_log(f"resumed from {ckpt_path}: stage {run.stage_idx + 1}, step {run.step}, "
                   f"{fmt_count(run.tokens_seen)} tokens seen")

    def on_sigint(signum, frame):
        if run.stop_requested and not run.ddp:  # a second Ctrl-C stops at once (torchrun sends two)
            raise KeyboardInterrupt
        run.stop_requested = True
        master_log("Ctrl-C: saving a checkpoint at the end of this step (Ctrl-C again to quit now)")

    in_main = threading.current_thread() is threading.main_thread()  # signals work only there
    old = signal.signal(signal.SIGINT, on_sigint) if in_main else None
    try:
        for stage in run.stages[run.stage_idx :]:
            run_stage(run, stage)
    finally:
        if in_main:
            signal.signal(signal.SIGINT, old)
    summary = summarize(run)
    if run.master:
        write_json(os.path.join(tc.out_dir, "summary.json"), summary)
        print_summary(summary, master_log)
    return summary


# -----------------------------------------------------------------------------
# compare mode: the patch runs against a token-level baseline on the same tokens and against
# baselines of equal compute, on the same data, seed and model


def compare(mc, tc, ks, lams, log=say):
    from dataclasses import replace

    root = tc.out_dir or "out/compare"
    N = tc.tokens
    plan = [("baseline", 1, 0.0, N)]
    patch_costs = []
    for K in ks:
        for lam in lams:
            if K > 1 and lam > 0:
                plan.append((f"patch_k{K}_lam{lam:g}", K, lam, N))
                patch_costs.append(round(cost_factor(K, lam), 4))
    for c in sorted(set(patch_costs)):  # shared by every patch run of the same cost
        plan.append((f"baseline_cost{c:g}", 1, 0.0, round(c * N)))
    results = []
    for name, K, lam, tokens in plan:
        out = os.path.join(root, name)
        sub = replace(tc, k=K, lam=lam, tokens=tokens, out_dir=out)
        summary = finished_summary(mc, sub) if tc.resume else None
        if summary is not None:
            log(f"== {name}: finished earlier, reusing {out}/summary.json")
        else:
            log(f"== {name}: K={K} lam={lam:g} tokens={fmt_count(tokens)}")
            resume = tc.resume and os.path.exists(os.path.join(out, "ckpt.pt"))
            summary = train(mc, replace(sub, resume=resume), log)
        results.append({"name": name, "k": K, "lam": lam, "tokens": tokens, "summary": summary})
    table = compare_table(results)
    for line in table:
        log(line)
    write_json(os.path.join(root, "results.json"), {"model": asdict(mc), "train": asdict(tc), "results": results})
    plot_compare(results, os.path.join(root, "compare.png"), log)
    return results


def finished_summary(mc, tc):
    """The summary of a finished run in tc.out_dir made with exactly these settings, else None."""
    path = os.path.join(tc.out_dir, "summary.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        summary = json.load(f)
    identity = run_identity(mc, tc, *(load_tokens(p, mc.vocab_size) for p in data_paths(tc)))
    return summary if summary.get("identity") == identity else None


def compare_table(results):
    base = results[0]["summary"]
    lines = [f"{'run':<22}{'tokens':>9}{'val loss':>10}{'ppl':>9}{'FLOPs':>8}{'time':>7}"
             f"{'patch tok/s':>13}{'token tok/s':>13}",
             "(FLOPs and time relative to the token-level baseline on the same tokens)"]
    for r in results:
        s = r["summary"]
        rate = {st["stage"]: fmt_count(st["tok_s"]) for st in s["stages"]}
        lines.append(f"{r['name']:<22}{fmt_count(s['total']['tokens']):>9}{s['val_loss']:>10.4f}"
                     f"{math.exp(s['val_loss']):>9.2f}{s['total']['flops'] / base['total']['flops']:>8.3f}"
                     f"{s['total']['time'] / base['total']['time']:>7.3f}"
                     f"{rate.get('patch', '-'):>13}{rate.get('token', '-'):>13}")
    return lines


def plot_compare(results, path, log=say):
    """Token-level val loss against training tokens and against compute, like the paper's Figure 1.
    matplotlib is optional: without it the JSON results are all there is."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed: skipping the plot (pip install matplotlib)")
        return
    base_flops = results[0]["summary"]["total"]["flops"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, r in enumerate(results):
        hist = r["summary"]["history"]
        color = f"C{i % 10}"
        for stage, style in (("patch", ":"), ("token", "-")):
            pts = [h for h in hist if h["stage"] == stage]
            if r["k"] > 1 and stage == "token":  # join the curve across the stage switch
                pts = [h for h in hist if h["stage"] == "patch"][-1:] + pts
            if not pts:
                continue
            label = r["name"] + (" (patch stage)" if stage == "patch" else "")
            axes[0].plot([h["tokens"] for h in pts], [h["val_loss"] for h in pts], style, color=color, label=label)
            axes[1].plot([h["flops"] / base_flops for h in pts], [h["val_loss"] for h in pts], style, color=color)
    axes[0].set_xlabel("training tokens")
    axes[1].set_xlabel("training compute (1 = the token-level baseline)")
    for ax in axes:
        ax.set_ylabel("token-level val loss")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("patch-level training (dotted: patch stage) vs token-level baselines")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log(f"wrote {path}")


# -----------------------------------------------------------------------------
# sampling


def sample(out_dir, prompt, num_samples, max_new_tokens, temperature, top_k, device, seed, log=say):
    ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
    mc = GPTConfig(**ckpt["model_config"])
    model = GPT(mc)
    model.load_state_dict(ckpt["model"])
    device = pick_device(device)
    model.to(device).eval()
    two_stage = len(plan_stages(TrainConfig(**ckpt["train_config"]), mc.block_size)) == 2
    no_token_steps = ckpt["stage_idx"] == 0 or (ckpt["stage_idx"] == 1 and ckpt["step"] == 0)
    if two_stage and no_token_steps:
        log("note: this checkpoint has had no token-level training yet; expect poor samples")
    enc = get_encoder()
    ids = enc.encode(prompt, allowed_special={"<|endoftext|>"}) if prompt else [enc.eot_token]
    torch.manual_seed(seed)
    x = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k)
    texts = [enc.decode(row.tolist()) for row in y]
    for t in texts:
        log(t)
        log("-" * 40)
    return texts


def get_encoder():
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise UserError(f"could not load tiktoken's gpt2 encoding ({type(e).__name__}); offline, set "
                        "TIKTOKEN_CACHE_DIR to a folder holding its files") from None


# -----------------------------------------------------------------------------
# main


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, like every other input error here
        die(message)


def keep_freed_memory():
    """CPU speed-up, 1.4x to 1.8x for the default model on 2 cores (bench.py): glibc hands every
    block over 32 MB (the logits are 200 MB) back to the OS when it is freed, so each step pays page
    faults to get it again. Keeping such blocks on the heap lets the next step reuse them."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc (macOS, Windows): nothing to do
    libc.mallopt(-4, 0)  # M_MMAP_MAX = 0: serve large blocks from the heap, not from fresh mmaps
    libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: do not shrink the heap after each step


def die(msg):
    print(f"patchgpt: error: {msg}", file=sys.stderr)
    sys.exit(2)


def parse_list(text, kind, name):
    try:
        return [kind(v) for v in str(text).split(",")]
    except ValueError:
        raise UserError(f"--{name} expects {kind.__name__} values separated by commas, got {text!r}") from None


def parse_k(text):
    ks = parse_list(text, float, "k")
    if any(not math.isfinite(k) or k != int(k) or k < 1 for k in ks):
        raise UserError(f"--k must be a whole number >= 1 (the tokens per patch), got {text}")
    return [int(k) for k in ks]


def parse_lam(text):
    lams = parse_list(text, float, "lam")
    for lam in lams:
        if lam == 1:
            raise UserError("--lam 1 would leave no token-level stage, so the model would never learn "
                            "single-token prediction; use lam < 1 (the paper uses 2/3)")
        if not 0 <= lam < 1:  # also refuses nan
            raise UserError(f"--lam is the fraction of tokens trained at patch level: 0 <= lam < 1, got {lam}")
    return lams


def build_parser():
    m, t = GPTConfig(), TrainConfig()
    p = Parser(description="Patch-level training of a GPT (Shao et al., ICLR 2025) in one file.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--k", default=str(t.k), help="patch size K for stage 1; 1 = token-level baseline. A list (2,4,8) with --compare")
    a("--lam", default=str(t.lam), help="fraction of the tokens trained at patch level, in [0, 1). A list with --compare")
    a("--tokens", type=float, default=t.tokens, help="token budget for the whole run, both stages (e.g. 2e9)")
    a("--data_dir", default=t.data_dir, help="folder with train.bin/val.bin from prepare_data.py")
    a("--val_bin", default=t.val_bin, help="evaluate on this val .bin instead (e.g. WikiText-103 test)")
    a("--out_dir", default=t.out_dir, help="checkpoints, log.jsonl, summary.json (default out/k{K}_lam{lam})")
    a("--n_layer", type=int, default=m.n_layer, help="transformer blocks")
    a("--n_head", type=int, default=m.n_head, help="attention heads")
    a("--n_embd", type=int, default=m.n_embd, help="embedding width")
    a("--block_size", type=int, default=m.block_size, help="positions per sequence (patches in stage 1)")
    a("--dropout", type=float, default=m.dropout, help="dropout (the paper uses none)")
    a("--batch_size", type=int, default=t.batch_size, help="sequences per micro-step in the token stage")
    a("--grad_accum", type=int, default=t.grad_accum, help="micro-steps per optimizer step (token stage; patch stage uses 1/K of the sequences)")
    a("--lr", type=float, default=t.lr, help="peak learning rate")
    a("--min_lr", type=float, default=t.min_lr, help="final learning rate of the cosine")
    a("--warmup_iters", type=int, default=t.warmup_iters, help="warmup steps (per stage with --schedule restart)")
    a("--schedule", choices=["restart", "global"], default=t.schedule,
      help="restart: fresh AdamW, warmup and cosine per stage (the paper); global: one over the whole run")
    a("--weight_decay", type=float, default=t.weight_decay, help="AdamW weight decay")
    a("--grad_clip", type=float, default=t.grad_clip, help="clip gradient norm (0 = off)")
    a("--eval_interval", type=int, default=t.eval_interval, help="steps between evals + checkpoints")
    a("--eval_iters", type=int, default=t.eval_iters, help="fixed val batches per eval")
    a("--log_interval", type=int, default=t.log_interval, help="steps between progress lines")
    a("--device", default=t.device, help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    a("--dtype", default=t.dtype, choices=["auto", "float32", "bfloat16", "float16"], help="autocast dtype; auto = bfloat16 on cuda")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--seed", type=int, default=t.seed, help="seed for the initial weights and the batches")
    a("--resume", action="store_true", help="continue the run in --out_dir from its checkpoint")
    a("--overwrite", action="store_true", help="start over even if --out_dir holds a run")
    a("--allow_budget_change", action="store_true", help="with --resume, accept a different --tokens")
    a("--compare", action="store_true", help="run the baseline, the patch runs and equal-compute baselines; print a table")
    a("--sample", action="store_true", help="generate text from the checkpoint in --out_dir")
    a("--prompt", default="", help="with --sample: text to continue")
    a("--num_samples", type=int, default=3, help="with --sample: how many samples")
    a("--max_new_tokens", type=int, default=200, help="with --sample: tokens per sample")
    a("--temperature", type=float, default=0.8, help="with --sample: softmax temperature")
    a("--top_k", type=int, default=200, help="with --sample: keep the top k tokens")
    return p


def configs_from_args(args):
    """Validate the command line and build the configs; raises UserError naming the bad value."""
    ks, lams = parse_k(args.k), parse_lam(args.lam)
    if not args.compare and (len(ks) > 1 or len(lams) > 1):
        raise UserError("lists of --k or --lam need --compare")
    for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum", "eval_interval",
                 "eval_iters", "log_interval"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.n_embd % args.n_head:
        raise UserError(f"--n_embd {args.n_embd} must be divisible by --n_head {args.n_head}")
    if not 1 <= args.tokens < float("inf"):
        raise UserError(f"--tokens must be positive, got {args.tokens:g}")
    if not args.lr > 0:
        raise UserError(f"--lr must be positive, got {args.lr:g}")
    mc = GPTConfig(block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                   dropout=args.dropout)
    names = {f.name for f in fields(TrainConfig)}
    tc = TrainConfig(**{k: v for k, v in vars(args).items() if k in names and k not in ("k", "lam", "tokens")},
                     k=ks[0], lam=lams[0], tokens=int(args.tokens))
    if not tc.out_dir and not args.compare:
        tc.out_dir = "out/k1" if tc.k == 1 or tc.lam == 0 else f"out/k{tc.k}_lam{tc.lam:g}"
    return mc, tc, ks, lams


def ensure_default_data(tc):
    """With no --data_dir, prepare Tiny Shakespeare on first use, as a new user expects."""
    if tc.data_dir != TrainConfig.data_dir or os.path.exists(os.path.join(tc.data_dir, "train.bin")):
        return
    import subprocess

    print(f"{tc.data_dir}/train.bin not found: preparing Tiny Shakespeare with prepare_data.py")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prepare_data.py")
    if subprocess.call([sys.executable, script, "--out_dir", tc.data_dir]) != 0:
        raise UserError("could not prepare the default data (see above); run prepare_data.py --input PATH")


def main(argv=None):
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    try:
        if args.sample:
            if not (args.temperature > 0 and args.top_k >= 1 and args.num_samples >= 1 and args.max_new_tokens >= 0):
                raise UserError("--sample needs --temperature > 0, --top_k >= 1, --num_samples >= 1, --max_new_tokens >= 0")
            sample(args.out_dir or "out/k4_lam0.67", args.prompt, args.num_samples, args.max_new_tokens,
                   args.temperature, args.top_k, args.device, args.seed)
            return
        mc, tc, ks, lams = configs_from_args(args)
        ensure_default_data(tc)
        if args.compare and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError("--compare runs one process; launch it without torchrun")
        if args.compare:
            compare(mc, tc, ks, lams)
        else:
            train(mc, tc)
    except UserError as e:
        die(str(e))
    except TrainingDiverged as e:
        print(f"patchgpt: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("patchgpt: interrupted; the checkpoint in the out dir resumes with --resume", file=sys.stderr)
        sys.exit(130)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
