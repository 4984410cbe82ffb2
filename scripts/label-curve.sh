#!/usr/bin/env bash
# The label-efficiency curve: strategies x budgets x seeds from one pretrained encoder.
#
#   scripts/label-curve.sh [--encoder DIR] [--strategies "random margin-kcenter"]
#                          [--budgets "1000 2000"] [--seeds "1 2 3"] [--out DIR] [-- FINETUNE FLAGS]
#
# For each strategy and seed it runs ONE `frugal finetune` to the largest budget; the model of each
# smaller budget is the one trained in the round that reached it (metrics.csv), which is exactly
# what a run with that smaller budget trains (same seed, same rounds, same picks: runs are
# deterministic; README says how this was checked). Budgets must therefore lie on the round
# schedule (--initial + k * --per-round). The random strategy uses a random cold start, the others
# the label-free k-means cold start. Runs that exist are resumed (or skipped when finished).
# Writes <out>/curve.csv, <out>/curve.md and <out>/curve.png (plot needs matplotlib: installed into
# .venv on demand).
set -euo pipefail
cd "$(dirname "$0")/.."

encoder=checkpoints/fashion-vae
strategies="random margin-kcenter"
budgets="1000 2000"
seeds="1 2 3"
out=checkpoints/label-curve
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --encoder) encoder=$2; shift 2 ;;
        --strategies) strategies=$2; shift 2 ;;
        --budgets) budgets=$2; shift 2 ;;
        --seeds) seeds=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

# FRUGAL_BIN: a copy of the binary, so that rebuilding during a long curve cannot mix versions.
bin=${FRUGAL_BIN:-target/release/frugal}
[ -x "$bin" ] || cargo build --release
max=$(printf '%s\n' $budgets | sort -n | tail -1)
mkdir -p "$out"

for strategy in $strategies; do
    cold=kmeans
    [ "$strategy" = random ] && cold=random
    for seed in $seeds; do
        run="$strategy-s$seed"
        flags=(finetune --encoder "$encoder" --labels "$max" --strategy "$strategy"
               --cold-start "$cold" --seed "$seed" --checkpoints "$out" --run "$run" "${extra[@]}")
        if [ -f "$out/$run/summary.json" ]; then
            echo "== $run: done already"
            continue
        elif [ -f "$out/$run/config.toml" ]; then
            echo "== $run: resuming"
            "$bin" "${flags[@]}" --resume
        else
            echo "== $run"
            "$bin" "${flags[@]}"
        fi
    done
done

python3 scripts/curve_table.py --out "$out" --budgets $budgets --strategies $strategies --seeds $seeds
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/python -c 'import matplotlib' 2>/dev/null || .venv/bin/python -m pip install -q matplotlib
.venv/bin/python scripts/curve_table.py --out "$out" --budgets $budgets --strategies $strategies --seeds $seeds --plot
