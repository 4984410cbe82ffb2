#!/usr/bin/env bash
# Encoder comparison: each pretrained encoder frozen, N random labels bought through the label
# database, a linear head (finetune --hidden 0) fitted, test accuracy reported.
#
#   scripts/encoder-compare.sh [--encoders "checkpoints/fashion-vae checkpoints/fashion-simclr"]
#                              [--budgets "1000 2000"] [--seeds "1 2 3"]
#                              [--out checkpoints/encoder-compare] [-- FINETUNE FLAGS]
#
# One label-curve per encoder (scripts/label-curve.sh --strategies random, so the labels of each
# budget are a random sample bought in rounds of 200; same seeds, hence the same items, for every
# encoder), then <out>/compare.md and compare.csv: mean, sd and range over seeds per encoder and
# budget, with each encoder's pretraining method, epochs and wall time (from its summary.json).
set -euo pipefail
cd "$(dirname "$0")/.."

encoders="checkpoints/fashion-vae checkpoints/fashion-simclr"
budgets="1000 2000"
seeds="1 2 3"
out=checkpoints/encoder-compare
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --encoders) encoders=$2; shift 2 ;;
        --budgets) budgets=$2; shift 2 ;;
        --seeds) seeds=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

for encoder in $encoders; do
    if [ ! -f "$encoder/summary.json" ]; then
        echo "error: $encoder has no summary.json: finish its pretraining first" >&2
        exit 1
    fi
done
for encoder in $encoders; do
    echo "==== $encoder"
    scripts/label-curve.sh --encoder "$encoder" --strategies random --budgets "$budgets" \
        --seeds "$seeds" --out "$out/$(basename "$encoder")" -- --hidden 0 "${extra[@]}"
done
python3 scripts/compare_table.py --out "$out" --encoders $encoders --budgets $budgets
