"""The table of docs/ladder_timing.sh's runs: characters per second of each stage by CPU time (and by
patchgpt.py's wall clock), and the wall cost against the compute cost.
  python docs/ladder_timing.py out/timing 300"""

import json
import os
import sys

root, S = sys.argv[1], int(sys.argv[2])


def run(name):
    with open(os.path.join(root, name, "summary.json")) as f:
        s = json.load(f)
    with open(os.path.join(root, name + ".time")) as f:
        user, system, wall = map(float, f.read().split()[-3:])
    return s, user + system


print(
    "| chars/step | recipe | patch stage chars/s (CPU) | token stage chars/s (CPU) | patch / token | "
    "chars/s by wall clock (patch; token) | compute cost | CPU cost | wall cost (patchgpt.py) |"
)
print("| ---: | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
fixed_all = []
for tps in (768, 3072):
    (s1, c1), (s2, c2) = run(f"t{tps}_k1a"), run(f"t{tps}_k1b")
    tok_cpu = (c2 - c1) / S  # CPU seconds per token step
    fixed = c1 - S * tok_cpu
    fixed_all.append(f"{fixed:.1f} at {tps}")
    print(
        f"| {tps} | token-level | | {tps / tok_cpu:,.0f} | | ; {s2['tok_s'][0]:,.0f} "
        "| 1.000 | 1.000 | 1.000 |"
    )
    for name in (f"t{tps}_k2a", f"t{tps}_k4a"):
        s, c = run(name)
        steps = [round(n / tps) for n in s["tokens"]]
        patch_cpu = (c - fixed - steps[1] * tok_cpu) / steps[0]
        cpu_cost = (c - fixed) / ((steps[0] + steps[1]) * tok_cpu)
        wall = "; ".join(f"{x:,.0f}" for x in s["tok_s"])
        print(
            f"| {tps} | K={s['k']}, λ={s['lam']:g} | {tps / patch_cpu:,.0f} | {tps / tok_cpu:,.0f} | "
            f"{tok_cpu / patch_cpu:.2f} | {wall} | {s['compute_cost']:.3f} | {cpu_cost:.3f} | "
            f"{s['measured_cost']:.3f} |"
        )
print(f"\nfixed CPU seconds of a run (start, data, evaluation) at characters a step: {', '.join(fixed_all)}")
