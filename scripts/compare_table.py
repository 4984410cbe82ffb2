#!/usr/bin/env python3
"""Joins the per-encoder label curves of scripts/encoder-compare.sh (<out>/<encoder>/curve.csv)
with each encoder's pretraining summary into <out>/compare.csv and <out>/compare.md."""
import argparse
import csv
import json
import statistics
from pathlib import Path

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--encoders", nargs="+", required=True)
p.add_argument("--budgets", nargs="+", type=int, required=True)
a = p.parse_args()
out = Path(a.out)


def cell(values):
    m = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100*m:.2f} ± {100*sd:.2f} ({100*min(values):.2f}–{100*max(values):.2f})"


rows, lines = [], []
header = ["encoder", "method", "pretraining epochs", "pretraining time (training steps)"]
lines.append("| " + " | ".join(header + [f"{b} labels" for b in a.budgets]) + " |")
lines.append("|---" * (len(header) + len(a.budgets)) + "|")
for encoder in a.encoders:
    name = Path(encoder).name
    summary = json.loads((Path(encoder) / "summary.json").read_text())
    with open(out / name / "curve.csv") as f:
        curve = list(csv.DictReader(f))
    cells = []
    for b in a.budgets:
        accs = [float(r["test_accuracy"]) for r in curve if int(r["labels"]) == b]
        seeds = [r["seed"] for r in curve if int(r["labels"]) == b]
        for s, acc in zip(seeds, accs):
            rows.append({"encoder": name, "method": summary["method"], "labels": b, "seed": s,
                         "test_accuracy": acc})
        cells.append(cell(accs))
    minutes = summary["train_seconds"] / 60
    lines.append(f"| {name} | {summary['method']} | {summary['epochs']} | {minutes:.0f} min | "
                 + " | ".join(cells) + " |")

with open(out / "compare.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["encoder", "method", "labels", "seed", "test_accuracy"])
    w.writeheader()
    w.writerows(rows)
(out / "compare.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
