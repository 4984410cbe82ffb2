#!/usr/bin/env python3
"""Collects the label-curve runs (<out>/<strategy>-s<seed>/metrics.csv, summary.json) into
curve.csv (one row per run and budget), curve.md (mean, spread over seeds) and, with --plot,
curve.png (labels vs test accuracy, one line per strategy, min-max band over seeds).
With --semi: one run per budget (<out>/<strategy>-s<seed>-b<budget>/summary.json), each strategy
shown before ("<strategy>") and after ("<strategy> + fixmatch") the semi-supervised stage, and
with `--test-time-flip` the same model's flipped predictions ("<strategy> + fixmatch + flip"), and
with `--join` that model averaged with the joined run's ("... + joined run").
Runs with an audit slice (`--validation audit`) also get a table of their accuracy on it."""
import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--budgets", nargs="+", type=int, required=True)
p.add_argument("--strategies", nargs="+", required=True)
p.add_argument("--seeds", nargs="+", type=int, required=True)
p.add_argument("--plot", action="store_true")
p.add_argument("--semi", action="store_true")
a = p.parse_args()
out = Path(a.out)

rows = []
names = list(a.strategies)
if a.semi:
    names = [n for s in a.strategies for n in (s, f"{s} + fixmatch")]
for strategy in a.strategies if a.semi else []:
    for seed in a.seeds:
        for b in a.budgets:
            summary = json.loads((out / f"{strategy}-s{seed}-b{b}" / "summary.json").read_text())
            semi = summary["semi"]
            stages = [
                (strategy, semi["test_accuracy_before"], semi["validation_accuracy_before"],
                 semi.get("audit_accuracy_before")),
                (f"{strategy} + fixmatch", summary["test_accuracy"], semi["validation_accuracy"],
                 summary.get("audit_accuracy")),
            ]
            flip = summary.get("test_time_flip")
            if flip:  # the same model without and with the flip
                stages[1] = (stages[1][0], flip["test_accuracy_without"], stages[1][2],
                             flip.get("audit_accuracy_without"))
                stages.append((f"{strategy} + fixmatch + flip", summary["test_accuracy"],
                               semi["validation_accuracy"], summary.get("audit_accuracy")))
                if f"{strategy} + fixmatch + flip" not in names:
                    names.insert(names.index(f"{strategy} + fixmatch") + 1, stages[2][0])
            join = summary.get("join")
            if join:  # this run's model alone, then averaged with the joined run's
                last = stages[-1]
                stages[-1] = (last[0], join["test_accuracy_alone"], last[2],
                              join.get("audit_accuracy_alone"))
                stages.append((f"{last[0]} + joined run", summary["test_accuracy"], last[2],
                               summary.get("audit_accuracy")))
                if stages[-1][0] not in names:
                    names.insert(names.index(last[0]) + 1, stages[-1][0])
            for name, acc, val, audit in stages:
                rows.append({"strategy": name, "seed": seed, "labels": b, "test_accuracy": acc,
                             "validation_accuracy": val, "audit_accuracy": audit,
                             "run_seconds": round(summary["seconds"], 1)})
def last_round(run):
    """A run's summary and its metrics rows by labels bought."""
    summary = json.loads((run / "summary.json").read_text())
    with open(run / "metrics.csv") as f:
        return summary, {int(r["labels"]): r for r in csv.DictReader(f)}


def round_row(strategy, seed, b, r, summary, plot_only=False):
    """The table row of the round `r` (a metrics.csv row) that reached `b` labels."""
    row = {"strategy": strategy, "seed": seed, "labels": b,
           "test_accuracy": float(r["test_accuracy"]),
           "validation_accuracy": float(r["validation_accuracy"]),
           "audit_accuracy": float(r["audit_accuracy"]) if r.get("audit_accuracy") else None,
           "run_seconds": round(summary["seconds"], 1)}
    if plot_only:
        row["_plot_only"] = True
    return row


for strategy in [] if a.semi else a.strategies:
    for seed in a.seeds:
        if strategy == "typiclust":  # one purchase per run, a run per budget
            for b in a.budgets:
                summary, metrics = last_round(out / f"{strategy}-s{seed}-b{b}")
                rows.append(round_row(strategy, seed, b, metrics[b], summary))
            continue
        run = out / f"{strategy}-s{seed}"
        summary, metrics = last_round(run)
        for b in a.budgets:
            if b not in metrics:
                sys.exit(f"error: {run}/metrics.csv has no round at {b} labels: pick budgets on "
                         f"the round schedule (--initial + k * --per-round)")
            rows.append(round_row(strategy, seed, b, metrics[b], summary))
        # Every round of the run, for the plot.
        for b, r in sorted(metrics.items()):
            if b not in a.budgets:
                rows.append(round_row(strategy, seed, b, r, summary, plot_only=True))

table = [r for r in rows if not r.get("_plot_only")]
with open(out / "curve.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["strategy", "seed", "labels", "test_accuracy",
                                      "validation_accuracy", "audit_accuracy", "run_seconds"])
    w.writeheader()
    w.writerows(table)

def cell(values):
    if not values or None in values:
        return "–"
    m = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100*m:.2f} ± {100*sd:.2f} ({100*min(values):.2f}–{100*max(values):.2f})"

def accuracy_table(key):
    rows = ["| strategy | " + " | ".join(f"{b} labels" for b in a.budgets) + " |",
            "|---|" + "---|" * len(a.budgets)]
    for strategy in names:
        cells = []
        for b in a.budgets:
            v = [r[key] for r in table if r["strategy"] == strategy and r["labels"] == b]
            cells.append(cell(v))
        rows.append(f"| {strategy} | " + " | ".join(cells) + " |")
    return rows


lines = accuracy_table("test_accuracy")
lines.append("")
lines.append(f"Test accuracy in %: mean ± standard deviation (min–max) over seeds {a.seeds}.")
lines.append("")
lines += accuracy_table("validation_accuracy")
lines.append("")
lines.append("Validation accuracy in % on the bought validation labels (the kept weights'). Only "
             "with `--validation random` do all strategies of a seed validate on the same images; "
             "otherwise each validates on a share of its own purchases and the rows do not "
             "compare. –: no validation labels were left (the stage's refit trains on them).")
if any(r["audit_accuracy"] is not None for r in table):
    lines.append("")
    lines += accuracy_table("audit_accuracy")
    lines.append("")
    lines.append("Audit accuracy in % on the audit slice (`--validation audit`): bought labels that "
                 "no training, early stopping or choice has seen, the same images for every run of "
                 "a seed and budget.")
(out / "curve.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))

if a.plot:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for strategy in names:
        xs = sorted({r["labels"] for r in rows if r["strategy"] == strategy})
        acc = [[r["test_accuracy"] * 100 for r in rows
                if r["strategy"] == strategy and r["labels"] == x] for x in xs]
        mean = [statistics.mean(v) for v in acc]
        ax.plot(xs, mean, marker="o", label=strategy)
        ax.fill_between(xs, [min(v) for v in acc], [max(v) for v in acc], alpha=0.2)
    ax.set_xlabel("labels bought")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Fashion-MNIST, frugal finetune (mean, min–max over {len(a.seeds)} seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=120)
    print(f"wrote {out / 'curve.png'}")
