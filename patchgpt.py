"""
patchgpt: patch-level training of a GPT language model (Shao, Meng, Zhou, ICLR 2025), in one file.

Stage 1 (patch level, a fraction lam of the tokens): each K consecutive token embeddings are averaged
into one "patch", and one output distribution per patch predicts all K tokens of the next patch.
Stage 2 (token level, the rest): plain next-token training, starting from the stage-1 weights.
A run costs lam/K + 1 - lam of token-level training on the same tokens (K=4, lam=2/3: 0.5).
  python patchgpt.py --k 4 --lam 0.67    # the default model and data (Tiny Shakespeare); a CPU will do
  python patchgpt.py --k 1               # the token-level baseline; --help lists every flag
  torchrun --standalone --nproc_per_node=8 patchgpt.py --device cuda ...    # data parallel
Sampling, comparisons and benchmarks: sample.py, compare.py, bench.py.
"""
import argparse, ctypes, inspect, io, json, math, os, re, signal, sys, time  # noqa: E401
from collections import OrderedDict, namedtuple
from dataclasses import asdict, dataclass, fields
from typing import ClassVar
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# --- config: each field is a command-line flag, its comment the flag's help; a comment that starts
# with [lo, hi] or {a, b} gives the range or the choices that the command line enforces
@dataclass
class GPTConfig:
    block_size: int = 128  # [1, 1e6] positions per sequence (tokens at K=1, patches at K>1)
    vocab_size: ClassVar[int] = 50304  # GPT-2's 50257 padded to a multiple of 64 (faster matmuls)
    n_layer: int = 4  # [1, 1000] transformer blocks
    n_head: int = 4  # [1, 1000] attention heads per block
    n_embd: int = 128  # [1, 1e5] embedding width, a multiple of n_head

@dataclass
class TrainConfig:
    k: int = 4  # [1, 1024] patch size K of stage 1; 1 = ordinary token-level training
    lam: float = 0.67  # [0, 1) fraction of the tokens trained at patch level (1 leaves no token stage)
    tokens: int = 500_000  # [1, 1e14] training tokens, both stages together (e.g. 2e9)
    batch_size: int = 8  # [1, 1e6] sequences per micro-step in the token stage
    grad_accum: int = 2  # [1, 1e6] micro-steps per optimizer step in the token stage
    lr: float = 1e-3  # (0, 10] peak learning rate
    min_lr: float = 1e-4  # [0, lr] learning rate at the end of the schedule
    warmup_iters: int = 20  # [0, 1e9] linear warmup steps (per stage with --schedule restart)
    schedule: str = "restart"  # {restart, global, wsd} restart: per stage a new AdamW, warmup and cosine
    #   (the paper); global: one AdamW and one cosine over both stages; wsd: one AdamW, warmup-stable-decay
    decay_frac: float = 0.2  # [0, 1] with --schedule wsd: the last fraction of all steps decays to min_lr
    weight_decay: float = 0.1  # [0, 10] AdamW weight decay of the matrices
    grad_clip: float = 1.0  # [0, 1e9] clip the global gradient norm (0 = off)
    eval_interval: int = 50  # [1, 1e12] optimizer steps between evaluations and checkpoints
    eval_iters: int = 20  # [1, 1e6] validation batches per evaluation (the same fixed set every time)
    log_interval: int = 10  # [1, 1e12] optimizer steps between progress lines
    data_dir: str = "data/tinyshakespeare"  # folder with train.bin and val.bin (see prepare_data.py)
    val_bin: str = ""  # evaluate on this .bin instead of data_dir/val.bin (e.g. WikiText-103 test)
    out_dir: str = ""  # ckpt.pt and summary.json (default: out/k{K}_lam{lam}, or out/k1)
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps
    dtype: str = "auto"  # {auto, float32, bfloat16} autocast dtype; auto: bfloat16 on cuda, else float32
    compile: bool = False  # torch.compile the model (one graph per stage)
    seed: int = 1337  # [0, 1e18] seed of the initial weights and of the batches
    resume: bool = False  # continue the run saved in out_dir
    overwrite: bool = False  # start over even if out_dir holds a run

    def __post_init__(self):
        if self.k == 1 or self.lam == 0:  # the one place that says what the token-level baseline is
            self.k, self.lam = 1, 0.0
        if self.dtype == "auto":  # resolved here, so that a resume on another device must say so
            self.dtype = "bfloat16" if pick_device(self.device).startswith("cuda") else "float32"

# what a resume may change: it changes neither the weights nor the evaluation
RESUMABLE = ("out_dir", "device", "compile", "resume", "overwrite", "eval_interval", "log_interval")

# --- model: a nanoGPT-class GPT; the only patch-specific lines are in forward() and the patch ops
class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        C, self.n_head = config.n_embd, config.n_head
        self.ln_1 = nn.LayerNorm(C)  # in GPT-2's order: the order in which grad clipping adds up norms
        self.attn = nn.ModuleDict(dict(c_attn=nn.Linear(C, 3 * C), c_proj=nn.Linear(C, C)))
        self.ln_2 = nn.LayerNorm(C)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(C, 4 * C), gelu=nn.GELU(),
                                             c_proj=nn.Linear(4 * C, C)))

    def forward(self, x):
        B, T, C = x.shape
        # causal self-attention: (B, T, 3C) -> 3 x (B, T, C) -> 3 x (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.attn.c_attn(self.ln_1(x)).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        x = x + self.attn.c_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln_2(x))

class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd)))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied input/output embeddings
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections down so the residual stream does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"): nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None: torch.nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None, patch_size=1):
        """idx: (B, K*T) token ids; targets: the same window shifted by K tokens, or None.
        Returns logits (B, T, vocab), one distribution per patch, and the next-patch loss;
        patch_size=1 is ordinary next-token prediction through the same lines."""
        K, (B, L) = patch_size, idx.shape
        assert L % K == 0 and L // K <= self.config.block_size, f"{L} tokens are not K x T <= block_size"
        x = patch_embed(self.transformer.wte(idx), K)  # (B, K*T, C) -> (B, T, C)
        x = x + self.transformer.wpe(torch.arange(L // K, device=idx.device))  # patch t at position t
        for block in self.transformer.h: x = block(x)  # (B, T, C) throughout
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab)
        return logits, None if targets is None else next_patch_loss(logits, targets, K)

    def configure_optimizer(self, tc, device_type):
        # GPT-2's AdamW: weight decay on matrices only, not on biases and LayerNorm gains; on cuda the
        # fused kernel is one launch for all parameters instead of several per tensor
        decay = [p for p in self.parameters() if p.dim() >= 2]
        groups = [{"params": decay, "weight_decay": tc.weight_decay},
                  {"params": [p for p in self.parameters() if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=tc.lr, betas=(0.9, 0.95), fused=device_type == "cuda")

# --- patch ops: the whole idea of patch-level training is in these two functions
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

# --- data: uint16 gpt2 token files read through np.memmap; windows of K*T tokens and their shift by K
GPT2_VOCAB = 50257  # ids from here up to vocab_size pad the embedding table; no text has them

class UserError(Exception):
    """Bad input (or a diverged run): main() prints it as one line, exit code 2, nothing overwritten."""

def load_tokens(path, need):
    if not os.path.isfile(path):
        raise UserError(f"{path} not found; make it with prepare_data.py (python prepare_data.py --help)")
    if os.path.getsize(path) % 2 or os.path.getsize(path) < 2 * need:  # need: (block_size + 1) * K
        raise UserError(f"{path}: not uint16 tokens, or fewer than one sequence ({need} tokens)")
    data = np.memmap(path, dtype=np.uint16, mode="r")
    if int(data.max()) >= GPT2_VOCAB:
        raise UserError(f"{path} holds token id {int(data.max())} >= {GPT2_VOCAB}: not gpt2 tokens")
    return data

def batch_starts(rng, n_tokens, K, block_size, n):
    """n random window starts; a window is K*T tokens for x plus K more for the last patch's target."""
    return rng.integers(0, n_tokens - (block_size + 1) * K + 1, size=n)

def get_batch(data, starts, K, block_size, device):
    """x: (B, K*T) tokens from each start; y: the same windows shifted by K tokens, so every patch,
    the last one too, has a target patch (the paper's code drops the last patch instead)."""
    x = torch.from_numpy(np.stack([data[i: i + K * block_size] for i in starts]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + K: i + K + K * block_size] for i in starts]).astype(np.int64))
    return x.to(device), y.to(device)

# --- stage plan and learning rate
# micro_batch: sequences per micro-step and process; tokens_per_step: all processes together
Stage = namedtuple("Stage", "name K steps micro_batch grad_accum tokens_per_step")

def plan_stages(tc, block_size, world_size=1):
    """Split the budget into a patch stage (lam) and a token stage. As in the paper both read the same
    tokens per optimizer step: a patch step has 1/K of the sequences, each K times longer (1/K compute)."""
    rows = tc.batch_size * tc.grad_accum  # token-level sequences per optimizer step
    total = max(1, round(tc.tokens / (rows * block_size)))
    steps1 = round(tc.lam * total)
    if steps1 == total:
        raise UserError(f"--tokens {tc.tokens} leaves no step for the token stage; raise it or --lam")
    plan = []
    for name, K, steps in (("patch", tc.k, steps1), ("token", 1, total - steps1)):
        if rows % (K * world_size):
            raise UserError(f"--batch_size x --grad_accum = {rows} is not a multiple of K x processes")
        mine = rows // (K * world_size)
        accum = next(a for a in range(1, mine + 1) if mine % a == 0 and mine // a <= tc.batch_size)
        plan += [Stage(name, K, steps, mine // accum, accum, rows * block_size)] if steps else []
    return plan

def cost_factor(K, lam):
    """Compute of patch-level training relative to token-level training on the same tokens."""
    return lam / K + 1 - lam

def get_lr(step, total_steps, tc):
    """Linear warmup, then a cosine from lr to min_lr at the last step; or, with wsd, lr held until
    the last decay_frac of the steps, then a straight line down to min_lr at the last step."""
    if step < tc.warmup_iters: return tc.lr * (step + 1) / (tc.warmup_iters + 1)  # step 0 learns too
    if tc.schedule == "wsd":
        decay = max(1, round(tc.decay_frac * total_steps))
        return tc.lr - min(1.0, max(0.0, (step + 1 - total_steps + decay) / decay)) * (tc.lr - tc.min_lr)
    progress = min(1.0, (step - tc.warmup_iters) / max(1, total_steps - 1 - tc.warmup_iters))
    return tc.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (tc.lr - tc.min_lr)

# --- training
def atomic_write(path, data):
    """Write a temp file beside path, then rename: a kill or a full disk mid-write leaves the old file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp): os.remove(tmp)
        raise OSError(e.errno, f"{e.strerror} while writing {path}") if isinstance(e, OSError) else e

def load_checkpoint(path, missing="to resume from; run without --resume to start a new run"):
    if not os.path.exists(path): raise UserError(f"no checkpoint at {path} {missing}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert ckpt["format"] == "patchgpt-2"
    except Exception as e:  # truncated, not a torch file, or not ours
        raise UserError(f"{path} is not a checkpoint of this patchgpt ({type(e).__name__})") from None
    return ckpt

def identity(mc, tc):  # what a resumed run must share with its checkpoint
    return {k: v for k, v in {**asdict(mc), **asdict(tc)}.items() if k not in RESUMABLE}

def pick_device(name):
    mps = torch.backends.mps.is_available()
    if name == "auto": return "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    m = re.fullmatch(r"(cpu|cuda|mps)(?::(\d+))?", name)
    if not m or int(m[2] or 0) >= dict(cpu=1, cuda=torch.cuda.device_count(), mps=mps)[m[1]]:
        raise UserError(f"--device {name}: no such device here (try auto, cpu, cuda, cuda:1 or mps)")
    return name

class Run:
    """A training run: what save() writes is all that a resumed run needs to go on bit for bit."""
    PROGRESS = ("stage_idx", "step", "tokens_seen", "history", "train_time")

    def __init__(self, mc, tc, log=print):
        self.mc, self.tc = mc, tc
        self.world, self.rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
        self.ddp, self.master = self.world > 1, self.rank == 0
        self.log, self.device = log if self.master else (lambda *a: None), pick_device(tc.device)
        if self.ddp and self.device.startswith("cuda"):  # launched by torchrun: one process per GPU
            self.device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(self.device)
        if self.ddp and not torch.distributed.is_initialized():  # gloo: several processes on the CPU
            torch.distributed.init_process_group("nccl" if self.device.startswith("cuda") else "gloo")
        self.device_type = self.device.split(":")[0]
        self.ctx = torch.autocast(self.device_type, torch.bfloat16, enabled=tc.dtype == "bfloat16")
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self.stages = plan_stages(tc, mc.block_size, self.world)
        need = (mc.block_size + 1) * tc.k  # tokens in one sequence and its target
        self.train_data = load_tokens(os.path.join(tc.data_dir, "train.bin"), need)
        self.val_data = load_tokens(tc.val_bin or os.path.join(tc.data_dir, "val.bin"), need)
        # fixed evaluation windows, from their own generator so that evaluating never shifts training
        self.eval_starts = batch_starts(np.random.default_rng(tc.seed + 1), len(self.val_data), 1,
                                        mc.block_size, tc.eval_iters * tc.batch_size)
        torch.manual_seed(tc.seed)
        self.raw_model = self.model = GPT(mc).to(self.device)
        if tc.compile:  # static shapes: one graph per stage (K*T tokens, then T)
            self.model = torch.compile(self.model, dynamic=False)
        if self.ddp:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device] if self.device_type == "cuda" else None)
        self.optimizer, self.rng = None, np.random.default_rng(tc.seed)  # rng: the training batches
        self.stage_idx = self.step = self.tokens_seen = 0
        self.history, self.train_time = [], [0.0] * len(self.stages)  # evaluations; seconds per stage
        self.stop = None  # a Ctrl-C or SIGTERM: save at the end of the step, then stop

    def save(self):
        if not self.master: return
        buf = io.BytesIO()  # serialized in memory first, so that a full disk is a plain OSError
        torch.save({"format": "patchgpt-2", "model_config": asdict(self.mc), "train_config": asdict(self.tc),
                    "model": self.raw_model.state_dict(), "rng": self.rng.bit_generator.state,
                    "optimizer": self.optimizer and self.optimizer.state_dict(),
                    **{name: getattr(self, name) for name in self.PROGRESS}}, buf)
        atomic_write(os.path.join(self.tc.out_dir, "ckpt.pt"), buf.getvalue())

    def load(self, ckpt):
        saved = {**ckpt["model_config"], **ckpt["train_config"]}
        for key, new in identity(self.mc, self.tc).items():
            if saved.get(key) != new:
                raise UserError(f"the checkpoint was made with --{key} {saved.get(key)}, not {new}")
        self.raw_model.load_state_dict(ckpt["model"])
        self.rng.bit_generator.state = ckpt["rng"]
        for name in self.PROGRESS: setattr(self, name, ckpt[name])
        if ckpt["optimizer"]:  # the stage-2 optimizer of a restart run is made when stage 2 starts
            self.optimizer = self.raw_model.configure_optimizer(self.tc, self.device_type)
            self.optimizer.load_state_dict(ckpt["optimizer"])

    @torch.no_grad()
    def evaluate(self, stage):
        """Token-level val loss on the fixed windows, by the uncompiled model (eval shapes differ)."""
        self.raw_model.eval()
        total, bs = 0.0, self.tc.batch_size
        for i in range(0, len(self.eval_starts), bs):
            x, y = get_batch(self.val_data, self.eval_starts[i: i + bs], 1, self.mc.block_size, self.device)
            with self.ctx:  # weighted by rows: a short last batch counts for what it holds
                total += self.raw_model(x, y)[1].float() * len(x)
        self.raw_model.train()
        loss = (total / len(self.eval_starts)).item()
        self.history.append(dict(stage=stage.name, step=self.step, tokens=self.tokens_seen, val_loss=loss))
        self.log(f"eval {stage.name} step {self.step}: val loss {loss:.4f} (ppl {math.exp(loss):.1f})")

    def train_step(self, stage, lr):
        """One optimizer step of grad_accum micro-steps; returns the last loss, unread (no GPU sync)."""
        for group in self.optimizer.param_groups: group["lr"] = lr
        for micro in range(stage.grad_accum):
            # every process draws the same starts and takes its own slice: one RNG state to save,
            # and N processes see exactly the batches one process would see with N times the rows
            starts = batch_starts(self.rng, len(self.train_data), stage.K, self.mc.block_size,
                                  stage.micro_batch * self.world)[self.rank * stage.micro_batch:]
            x, y = get_batch(self.train_data, starts[:stage.micro_batch], stage.K, self.mc.block_size,
                             self.device)
            if self.ddp:  # average gradients across processes on the last micro-step only
                self.model.require_backward_grad_sync = micro == stage.grad_accum - 1
            with self.ctx:
                _, loss = self.model(x, y, patch_size=stage.K)
            (loss / stage.grad_accum).backward()
        if self.tc.grad_clip: torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.tc.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def train_stage(self):
        """The loop of one stage, from self.step to its last step: train, log, evaluate, save."""
        i, tc, losses = self.stage_idx, self.tc, []
        stage = self.stages[i]
        self.optimizer = self.optimizer or self.raw_model.configure_optimizer(tc, self.device_type)
        whole = tc.schedule != "restart"  # global and wsd: one schedule over both stages
        offset = sum(s.steps for s in self.stages[:i]) if whole else 0
        sched_steps = sum(s.steps for s in self.stages) if whole else stage.steps
        if self.step == 0 and self.master:  # after the switch too: the first point of the stage-2 curve
            self.evaluate(stage)
        while self.step < stage.steps:
            t0, tokens0 = time.time(), self.tokens_seen
            while True:  # the steps up to the next progress line
                lr = get_lr(self.step + offset, sched_steps, tc)
                losses.append(self.train_step(stage, lr))
                self.step += 1
                self.tokens_seen += stage.tokens_per_step
                if (self.step % tc.log_interval == 0 or self.step % tc.eval_interval == 0
                        or self.step == stage.steps or (self.stop and not self.ddp)):
                    break
            if self.device_type == "cuda": torch.cuda.synchronize()  # time the work, not its launch
            self.train_time[i] += time.time() - t0
            tok_s = (self.tokens_seen - tokens0) / max(time.time() - t0, 1e-9)
            later = sum(s.steps * s.tokens_per_step * stage.K / s.K for s in self.stages[i + 1:])
            eta = ((stage.steps - self.step) * stage.tokens_per_step + later) / max(tok_s, 1e-9)
            self.log(f"{stage.name} K={stage.K} step {self.step}/{stage.steps} | tokens {self.tokens_seen:,}"
                     f" | loss {losses[-1].item():.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s"
                     f" | ETA {eta / 60:.1f} min")
            # losses are read here, not every step, so that the GPU is not synced every step; under DDP
            # every process learns of a bad loss or a Ctrl-C anywhere, so that all stop at the same step
            flags = torch.stack([(~torch.isfinite(torch.stack(losses))).sum().float(),
                                 torch.tensor(float(bool(self.stop)), device=self.device)])
            if self.ddp: torch.distributed.all_reduce(flags)
            if flags[0] > 0:  # before any save: a checkpoint never holds weights a bad loss touched
                raise UserError(f"non-finite loss by {stage.name} step {self.step}; try a lower --lr")
            self.stop, losses = self.stop or (flags[1] > 0 and signal.SIGINT), []
            if (self.step % tc.eval_interval == 0 or self.step == stage.steps) and self.master:
                self.evaluate(stage)
            if self.stop or self.step % tc.eval_interval == 0 and self.step < stage.steps:
                self.save()
            if self.stop: raise KeyboardInterrupt
        # the switch: the paper starts stage 2 with a fresh optimizer; global and wsd keep the one
        self.stage_idx, self.step = i + 1, 0
        self.optimizer = self.optimizer if whole else None
        self.save()

def train(mc, tc, log=print):
    """One run: the patch stage then the token stage (or the baseline alone). Returns its summary."""
    ckpt_path = os.path.join(tc.out_dir, "ckpt.pt")
    if tc.resume and tc.overwrite:
        raise UserError("--resume continues the run in --out_dir and --overwrite discards it: pass one")
    if os.path.exists(ckpt_path) and not (tc.resume or tc.overwrite):
        raise UserError(f"{tc.out_dir} already holds a run; pass --resume to continue it, "
                        "--overwrite to start over, or choose another --out_dir")
    ckpt = load_checkpoint(ckpt_path) if tc.resume else None
    run = Run(mc, tc, log)
    if ckpt: run.load(ckpt)
    if run.master:
        os.makedirs(tc.out_dir, exist_ok=True)
        for name in os.listdir(tc.out_dir):  # a kill mid-write leaves a temp file; --overwrite, an old run
            if re.fullmatch(r".+\.tmp\d+", name) or (not ckpt and name in ("ckpt.pt", "summary.json")):
                os.remove(os.path.join(tc.out_dir, name))
    log, n_params = run.log, sum(p.numel() for p in run.raw_model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters | {run.device}{f' x {run.world}' if run.ddp else ''} | "
        f"{tc.dtype} | cost vs token-level training: lam/K + 1 - lam = {cost_factor(tc.k, tc.lam):.3f}")
    log("plan: " + "; ".join(f"{s.name} stage K={s.K}: {s.steps} steps of {s.grad_accum} x {s.micro_batch} "
                             f"sequences of {s.K * mc.block_size} tokens" for s in run.stages))
    if ckpt: log(f"resumed from {ckpt_path}: stage {run.stage_idx + 1}, step {run.step}")

    def on_signal(signum, frame):  # Ctrl-C, or SIGTERM from kill, timeout or a job scheduler
        if run.stop and not run.ddp: raise KeyboardInterrupt  # a second one stops at once
        run.stop = signum
        log(f"{signal.Signals(signum).name}: saving a checkpoint at the end of this step")
    old = [(s, signal.signal(s, on_signal)) for s in (signal.SIGINT, signal.SIGTERM)]
    try:
        while run.stage_idx < len(run.stages): run.train_stage()
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"{ckpt_path} continues with --resume" if os.path.exists(ckpt_path)
                                else "before the first checkpoint, so there is nothing to resume") from None
    finally:
        for s, handler in old: signal.signal(s, handler)
    if not run.master:
        return None  # the other processes of a DDP run have neither the evaluations nor a summary
    tokens = [s.steps * s.tokens_per_step for s in run.stages]
    tok_s = [n / max(t, 1e-9) for n, t in zip(tokens, run.train_time)]
    summary = {"k": tc.k, "lam": tc.lam, "stages": [s.name for s in run.stages], "tokens": tokens,
               "time": run.train_time, "tok_s": tok_s, "predicted_cost": cost_factor(tc.k, tc.lam),
               "compute_cost": sum(n // s.K for n, s in zip(tokens, run.stages)) / sum(tokens),
               # wall time against a token-level run of the same tokens at this run's own token-stage speed
               "measured_cost": sum(run.train_time) / (sum(tokens) / tok_s[-1]),
               "val_loss": run.history[-1]["val_loss"], "history": run.history, "identity": identity(mc, tc)}
    atomic_write(os.path.join(tc.out_dir, "summary.json"), json.dumps(summary, indent=1).encode())
    log(f"cost vs token-level training of the same tokens: predicted {summary['predicted_cost']:.3f}, "
        f"compute {summary['compute_cost']:.3f}, measured wall time {summary['measured_cost']:.3f}")
    log(f"final token-level val loss {summary['val_loss']:.4f}, ppl {math.exp(summary['val_loss']):.1f}")
    return summary

# --- command line: the flags are the config fields, their help the fields' comments
def flag_type(f, comment):
    """The field's type (an int may be written 2e9), in the range its comment starts with (if any)."""
    m = re.match(r"([\[(])([\d.e]+), ([\d.e]+|\w+)([\])])", comment)
    def number(text):  # noqa: E306  (argparse says "invalid number value" when float() fails)
        v, lo, hi = float(text), float(m[2]), float(m[3]) if m[3][0].isdigit() else math.inf
        if (lo <= v if m[1] == "[" else lo < v) and (v <= hi if m[4] == "]" else v < hi) and v == f.type(v):
            return f.type(v)
        raise argparse.ArgumentTypeError(f"must be {'an integer ' * (f.type is int)}in {m[0]}, got {text}")
    return number if m else str

def build_parser(description=__doc__.strip().splitlines()[0]):
    p = argparse.ArgumentParser(description=description, conflict_handler="resolve")  # tools redefine some
    p.error = lambda message: die(message, p.prog)  # one line and exit code 2, as every input error
    for cls in (GPTConfig, TrainConfig):
        found = re.findall(r"^    (\w+): \w+ = .*?  # (.*(?:\n    #   .*)*)", inspect.getsource(cls), re.M)
        comments = {name: text.replace("\n    #  ", "") for name, text in found}
        for f in fields(cls):
            text, choices = comments[f.name], re.match(r"\{(.*?)\}", comments[f.name])
            if f.type is bool:
                p.add_argument(f"--{f.name}", action="store_true", help=text)
            else:
                p.add_argument(f"--{f.name}", type=flag_type(f, text), default=f.default,
                               choices=choices and choices[1].split(", "),
                               help=text + (f" (default: {f.default})" if f.default != "" else ""))
    return p

def configs(args):  # after the checks that involve two flags; the default data is made on first use
    if args.n_embd % args.n_head:
        raise UserError(f"--n_embd {args.n_embd} must be a multiple of --n_head {args.n_head}")
    if args.min_lr > args.lr: raise UserError(f"--min_lr {args.min_lr:g} must be <= --lr {args.lr:g}")
    mc = GPTConfig(**{f.name: getattr(args, f.name) for f in fields(GPTConfig)})
    tc = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    tc.out_dir = tc.out_dir or ("out/k1" if tc.k == 1 else f"out/k{tc.k}_lam{tc.lam:g}")
    if tc.data_dir == TrainConfig.data_dir and not os.path.exists(f"{tc.data_dir}/train.bin"):
        print(f"{tc.data_dir}/train.bin not found: preparing Tiny Shakespeare (it ships with patchgpt)")
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prepare_data.py")
        if os.spawnv(os.P_WAIT, sys.executable, [sys.executable, script, "--out_dir", tc.data_dir]):
            raise UserError(f"could not prepare {tc.data_dir} (see above)")
    return mc, tc

def die(msg, prog="patchgpt", code=2):
    print(f"{os.path.splitext(os.path.basename(prog))[0]}: error: {msg}", file=sys.stderr)
    sys.exit(code)

def main(argv=None, parser=None, action=None):
    """Parse, check, run; any expected failure is one line on stderr and exit code 2 (130: Ctrl-C)."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # so that `| tee` and log files show progress at once
    if sys.platform.startswith("linux"):  # 1.4x-1.8x faster steps on 2 CPU cores (bench.py): glibc gives
        # blocks over 32 MB (the logits: 200 MB) back to the OS when freed; these two settings keep them
        ctypes.CDLL("libc.so.6").mallopt(-4, 0)
        ctypes.CDLL("libc.so.6").mallopt(-1, 2**31 - 1)
    try:
        if action: return action(args)  # compare.py and bench.py do something else with the flags
        return train(*configs(args))
    except UserError as e:
        die(e, parser.prog)
    except OSError as e:  # a full disk, a read-only folder, an --out_dir that is a file: one line
        die(f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}", parser.prog)
    except KeyboardInterrupt as e:
        die(f"interrupted{f'; {e}' if str(e) else ''}", parser.prog, code=130)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

if __name__ == "__main__":
    main()
