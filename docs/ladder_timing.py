"""The table of docs/ladder_timing.sh's runs: tokens (characters) per second of each stage, and the
measured wall cost against the compute cost.   python docs/ladder_timing.py out/timing"""

import json
import os
import sys

root = sys.argv[1]
print("| chars/step | recipe | patch stage chars/s | token stage chars/s | patch / token speed | compute | wall |")
print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
for name in sorted(os.listdir(root), key=lambda n: (int(n[1:].split("_")[0]), n)):
    with open(os.path.join(root, name, "summary.json")) as f:
        s = json.load(f)
    tps = dict(zip(s["stages"], s["tok_s"]))
    recipe = "token-level" if s["k"] == 1 else f"K={s['k']}, λ={s['lam']:g}"
    patch = f"{tps['patch']:,.0f}" if "patch" in tps else ""
    ratio = f"{tps['patch'] / tps['token']:.2f}" if "patch" in tps else ""
    print(f"| {s['identity']['tokens_per_step']} | {recipe} | {patch} | {tps['token']:,.0f} | {ratio} | "
          f"{s['compute_cost']:.3f} | {s['measured_cost']:.3f} |")
