#!/usr/bin/env python3
"""Measures VAE pretraining on this machine: one run per seed, over all 60,000 training images by
default, and prints a Markdown table (wall time, training time, images/s, peak RSS, losses) with
mean and spread. Standard library only.

Usage: scripts/pretrain_epoch.py [--seeds 1 2 3] [--epochs 1] [--limit N] [--threads 0]
                                 [--checkpoints checkpoints/bench-epoch] [--binary target/release/frugal]
Build first: cargo build --release
"""
import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--checkpoints", default="checkpoints/bench-epoch")
    ap.add_argument("--binary", default="target/release/frugal")
    args = ap.parse_args()
    if not os.path.exists(args.binary):
        sys.exit(f"{args.binary} not found: run `cargo build --release` first")

    rows = []
    for seed in args.seeds:
        run = f"seed{seed}"
        shutil.rmtree(os.path.join(args.checkpoints, run), ignore_errors=True)
        cmd = [args.binary, "ssl-pretrain", "--epochs", str(args.epochs), "--seed", str(seed),
               "--threads", str(args.threads), "--checkpoints", args.checkpoints, "--run", run]
        if args.limit:
            cmd += ["--limit", str(args.limit)]
        print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t0 = time.monotonic()
        subprocess.run(cmd, check=True)
        wall = time.monotonic() - t0
        # ru_maxrss of children is the largest of any child so far (KiB on Linux).
        rss = max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, before) / 1024
        with open(os.path.join(args.checkpoints, run, "summary.json")) as f:
            s = json.load(f)
        losses = s["last_epoch_losses"]
        rows.append({"seed": seed, "wall_s": wall, "train_s": s["train_seconds"],
                     "img_per_s": s["images_per_second"], "peak_rss_mib": rss,
                     "loss": losses.get("loss", losses.get("total")), "reconstruction": losses["reconstruction"], "kl": losses["kl"],
                     "images": s["images"], "epochs": s["epochs"]})

    cols = ["seed", "wall_s", "train_s", "img_per_s", "peak_rss_mib", "loss", "reconstruction", "kl"]
    print(f"{rows[0]['images']} images, {rows[0]['epochs']} epoch(s), threads={args.threads or 'all cores'}\n")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) if c == "seed" else f"{r[c]:.1f}" for c in cols) + " |")
    if len(rows) > 1:
        for name, fn in [("mean", statistics.mean), ("min", min), ("max", max)]:
            print(f"| {name} | " + " | ".join(f"{fn(r[c] for r in rows):.1f}" for c in cols[1:]) + " |")


if __name__ == "__main__":
    main()
