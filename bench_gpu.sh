#!/usr/bin/env bash
# bench_gpu.sh: the GPU numbers the README's benchmark section asks for, in one call sized to take
# about five minutes on one H100/H200 (an estimate: it has only been dry-run on CPU so far):
#   1. bench.py at the GPT-2 124M shape (block 1024, bf16 autocast, --compile): tokens/s, ms/step, MFU
#      and peak memory of the token stage (K=1) and the patch stage (K=4), and the whole-run ratio
#      those speeds imply;
#   2. two real runs of the same tokens, token level and --k 4 --lam 0.67, eager (compile time would
#      swamp runs this short), and the ratio of their training times from their summary.json files;
#   3. the device's Ctrl-C path: a small run stopped by SIGTERM in its token stage and resumed, against
#      the same run never stopped (pinned copies, autocast, the fused AdamW of a resumed optimizer).
# Needs data/tinyshakespeare (python prepare_data.py). The printed results go to $OUT (out/gpu_check),
# seven small files; the runs' checkpoints (about 1.5 GB each at this shape: the weights and AdamW's two
# moments, float32) to $RUNS (out/gpu_check_runs).
# A dry run on CPU, to check the script itself:
#   DEVICE=cpu COMPILE= SHAPE="--n_layer 2 --n_head 2 --n_embd 64 --block_size 64" TOKENS=2e5 bash bench_gpu.sh
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-out/gpu_check}
RUNS=${RUNS:-out/gpu_check_runs}
DEVICE=${DEVICE:-cuda}
COMPILE=${COMPILE---compile}
SHAPE=${SHAPE:---n_layer 12 --n_head 12 --n_embd 768 --block_size 1024}
BATCH=${BATCH:---tokens_per_step 65536 --micro_batch 16}
TOKENS=${TOKENS:-2e7}
DATA=${DATA:-data/tinyshakespeare}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
COMMON="--data_dir $DATA --device $DEVICE $SHAPE $BATCH"

{
  date -u
  git rev-parse --short HEAD 2>/dev/null || true
  $PY -c "import torch; print('torch', torch.__version__, '|',
             torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
} | tee "$OUT/env.txt"

echo "== 1. steady-state speed and memory per stage"
# torch.compile needs Triton, which builds a small C launcher at run time: on a machine without a C
# compiler it fails, and then the eager numbers are still worth having, so are the runs of step 2
bench() { $PY bench.py --k 4 --lam 0.67 $COMMON "$@" --json "$OUT/bench.json" | tee -a "$OUT/bench.txt"; }
rm -f "$OUT/bench.txt"
bench $COMPILE || { echo "bench.py $COMPILE failed (see above); timing the eager model instead"; bench; }

echo "== 2. whole runs of $TOKENS tokens: token level, then --k 4 --lam 0.67"
for name in k1 k4; do
  flags="--k 1"
  [ $name = k4 ] && flags="--k 4 --lam 0.67"
  $PY patchgpt.py $flags $COMMON --tokens "$TOKENS" --eval_interval 1000000 --eval_iters 4 \
    --log_interval 50 --out_dir "$RUNS/$name" --overwrite | tee "$OUT/$name.txt"
done
$PY - "$RUNS" <<'EOF' | tee "$OUT/whole_run.txt"
import json, sys
k1, k4 = (json.load(open(f"{sys.argv[1]}/{n}/summary.json")) for n in ("k1", "k4"))
# each stage's time at its measured speed (its first, compiling step is not timed)
t1, t4 = (sum(n / v for n, v in zip(k["tokens"], k["tok_s"])) for k in (k1, k4))
# (no losses here: this many tokens are dozens of passes over Tiny Shakespeare, so they would measure
# overfitting; the runs are for time)
print(f"training time: token level {t1:.1f}s, --k 4 --lam 0.67 {t4:.1f}s -> ratio {t4 / t1:.3f} "
      f"(its compute {k4['compute_cost']:.3f})")
EOF

echo "== 3. SIGTERM in the token stage, then --resume, against the same run never stopped"
SMALL=${SMALL:---n_layer 2 --n_head 2 --n_embd 64 --block_size 64 --tokens 2e5 --tokens_per_step 2048}
SMALL="--k 4 --lam 0.67 --data_dir $DATA --device $DEVICE $SMALL --eval_interval 1000 --log_interval 1"
$PY patchgpt.py $SMALL --out_dir "$RUNS/whole" --overwrite | tail -1 | tee "$OUT/resume.txt"
# The stop lands inside the token stage by construction, not by speed (a loop that looked for the token
# stage's first line every 0.1 s was a race: a fast device ended the run first). The run prints a line a
# step into a socket whose buffer holds only a few lines, and nothing reads it from that first line until
# the SIGTERM is sent: a run with more steps left than the buffer holds lines waits there for the signal.
$PY - "$RUNS/stopped.log" $PY patchgpt.py $SMALL --out_dir "$RUNS/stopped" --overwrite <<'EOF'
import os, re, signal, socket, subprocess, sys
log, cmd = sys.argv[1], sys.argv[2:]
def small_socket():
    ours, theirs = socket.socketpair()
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # the kernel's smallest send buffer
    return ours, theirs
probe, full = small_socket()
full.setblocking(False)
fits = 0  # the lines of 70 bytes (the shortest progress line) its buffer takes
while fits < 1000:
    try:
        full.send(b"x" * 69 + b"\n")
    except BlockingIOError:
        break
    fits += 1
ours, theirs = small_socket()
proc = subprocess.Popen(cmd, stdout=theirs, stderr=subprocess.STDOUT)
theirs.close()
with open(ours.detach(), "rb", buffering=0) as run, open(log, "wb") as out:  # unbuffered: reads a line, no more
    for line in run:
        out.write(line)
        steps = re.match(rb"plan: token stage K=1: (\d+) steps", line)
        if steps and int(steps[1]) - 2 <= fits:  # the last step checks for a stop before its line
            proc.kill()
            sys.exit(f"the token stage is shorter than the {fits} lines a socket holds: raise --tokens in SMALL")
        if line.startswith(b"token K=1 step 1/"):
            proc.send_signal(signal.SIGTERM)
if proc.wait() != 130:
    sys.exit(f"the run stopped by SIGTERM ended with exit code {proc.returncode}, not 130: see {log}")
EOF
$PY patchgpt.py $SMALL --out_dir "$RUNS/stopped" --resume | grep -E "^resumed|^final" | tee -a "$OUT/resume.txt"
