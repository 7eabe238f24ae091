#!/usr/bin/env python3
"""loraplex against torch + transformers + peft on the same steps, case by case, back to back.

For each case of `loraplex bench train` it runs loraplex, then the torch reference
(benches/torch_train_reference.py), each in its own process, and prints one table with the
ratio loraplex speed / torch speed (= torch seconds per step / loraplex seconds per step;
above 1 means loraplex is faster). Running the pair back to back keeps machine drift out of
the ratio. Needs the venv of benches/requirements-torch.txt for the torch side:

    cargo build --release
    PYTHON=/path/to/venv/bin/python python3 benches/compare_torch.py --steps 3
"""
import argparse
import json
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CASES = [
    "fwd 1x128 (all)",
    "train 1x128 q,v",
    "train 4x128 q,v",
    "train 1x128 all",
    "train 4x128 all",
    "4 adapters x 1x128 all, one batch",
    "4 adapters x 1x128 all, one after another",
]


def loraplex(case, args):
    exe = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "loraplex")
    out = subprocess.run([exe, "bench", "train", "--case", case, "--steps", str(args.steps), "--model-path", args.gguf],
                         check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] == case:
            return float(cells[1]), cells[3]
    raise RuntimeError(f"no row for {case!r} in:\n{out}")


def torch(case, args):
    py = os.environ.get("PYTHON", sys.executable)
    out = subprocess.run([py, os.path.join(HERE, "torch_train_reference.py"), "--json", "--case", case,
                          "--steps", str(args.steps), "--gguf", args.gguf],
                         check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            if r["case"] == case:
                return float(r["median_s_per_step"]), f"{r['peak_rss_mb']:.0f}"
    raise RuntimeError(f"no JSON row for {case!r} in:\n{out}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--gguf", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--case", help="only cases containing this")
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.2f}; {args.steps} timed steps per case, medians")
    print("| case | loraplex s/step | torch s/step | loraplex/torch speed | loraplex RSS MB | torch RSS MB |")
    print("|---|---|---|---|---|---|")
    for case in CASES:
        if args.case and args.case not in case:
            continue
        ls, lr = loraplex(case, args)
        ts, tr = torch(case, args)
        print(f"| {case} | {ls:.3f} | {ts:.3f} | {ts / ls:.2f}x | {lr} | {tr} |", flush=True)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
