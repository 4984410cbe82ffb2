#!/usr/bin/env python3
"""Judges a change on audit slices: run A (the change) against run B (without it), seed by seed.

Each arm is a label-curve output folder (scripts/label-curve.sh --out DIR ... -- --validation
audit) holding <strategy>-s<seed>-b<labels>/summary.json. The rule reads only the final audit
accuracy (bought labels that nothing trained or validated on): A is kept if its mean gain over the
seeds is at least --min-gain points and A is higher in at least --min-wins seeds (a tie is not
higher). Test accuracy is printed after the verdict, for the report only.

    scripts/audit_judge.py checkpoints/judge500-mirror checkpoints/judge500-plain \\
        --strategy margin --labels 1500 --seeds 4 5 6 --min-gain 0.4 --min-wins 2
"""
import argparse
import json
import statistics
import sys
from pathlib import Path


def load(arm: Path, strategy: str, seed: int, labels: int) -> dict:
    path = arm / f"{strategy}-s{seed}-b{labels}" / "summary.json"
    try:
        s = json.loads(path.read_text())
    except FileNotFoundError:
        sys.exit(f"error: {path} is missing: has the run finished?")
    except json.JSONDecodeError as e:
        sys.exit(f"error: {path} is not valid JSON ({e})")
    if s.get("audit_accuracy") is None or not s.get("audit_labels"):
        sys.exit(f"error: {path} has no audit slice: run it with `-- --validation audit`")
    return s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path, help="the arm with the change (a label-curve --out folder)")
    p.add_argument("b", type=Path, help="the arm without it")
    p.add_argument("--strategy", default="margin")
    p.add_argument("--labels", type=int, required=True, help="the runs' --labels (strategy + audit)")
    p.add_argument("--seeds", type=int, nargs="+", required=True)
    p.add_argument("--min-gain", type=float, default=0.0,
                   help="points of audit accuracy A must gain on average (default 0: any gain)")
    p.add_argument("--min-wins", type=int, default=2, help="seeds in which A must be higher")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    a = p.parse_args()

    rows = []
    for seed in a.seeds:
        sa, sb = (load(arm, a.strategy, seed, a.labels) for arm in (a.a, a.b))
        if sa["audit_labels"] != sb["audit_labels"]:
            sys.exit(f"error: seed {seed}: audit slices of {sa['audit_labels']} and {sb['audit_labels']} labels")
        rows.append((seed, sa, sb))

    gains = [100 * (sa["audit_accuracy"] - sb["audit_accuracy"]) for _, sa, sb in rows]
    wins = sum(g > 1e-9 for g in gains)
    mean_gain = statistics.mean(gains)
    keep = mean_gain >= a.min_gain - 1e-9 and wins >= a.min_wins

    def pct(x):
        return f"{100 * x:.1f}"

    head = ["seed", "audit labels", "audit B", "audit A", "A - B (points)", "A - B (images)",
            "test B (report only)", "test A (report only)"]
    table = []
    for (seed, sa, sb), g in zip(rows, gains):
        n = sa["audit_labels"]
        table.append([str(seed), str(n), pct(sb["audit_accuracy"]), pct(sa["audit_accuracy"]),
                      f"{g:+.2f}", f"{round(g * n / 100):+d}",
                      f"{100 * sb['test_accuracy']:.2f}", f"{100 * sa['test_accuracy']:.2f}"])
    mean = lambda key, side: statistics.mean(r[2 if side == "b" else 1][key] for r in rows)
    table.append(["mean", "", pct(mean("audit_accuracy", "b")), pct(mean("audit_accuracy", "a")),
                  f"{mean_gain:+.2f}", "", f"{100 * mean('test_accuracy', 'b'):.2f}",
                  f"{100 * mean('test_accuracy', 'a'):.2f}"])
    if a.markdown:
        print("| " + " | ".join(head) + " |")
        print("|---" * len(head) + "|")
        for r in table:
            print("| " + " | ".join(r) + " |")
    else:
        widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(head)]
        for r in [head] + table:
            print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    verdict = "KEEP A" if keep else "KEEP B"
    print(f"\nrule: mean gain >= {a.min_gain:+.2f} points and A higher in >= {a.min_wins} of "
          f"{len(rows)} seeds; got {mean_gain:+.2f} points, higher in {wins}: {verdict}")


if __name__ == "__main__":
    main()
