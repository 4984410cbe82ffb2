#!/usr/bin/env bash
# The label-efficiency curve: strategies x budgets x seeds from one pretrained encoder.
#
#   scripts/label-curve.sh [--encoder DIR] [--strategies "random margin"]
#                          [--budgets "1000 2000"] [--seeds "1 2 3"] [--out DIR] [--semi]
#                          [--join DIR] [-- FINETUNE FLAGS]
#
# For each strategy and seed it runs ONE `frugal finetune` to the largest budget; the model of each
# smaller budget is the one trained in the round that reached it (metrics.csv), which is exactly
# what a run with that smaller budget trains (same seed, same rounds, same picks: runs are
# deterministic; README says how this was checked). Budgets must therefore lie on the round
# schedule (--initial + k * --per-round). The random strategy uses a random cold start, the others
# the label-free k-means cold start; `typiclust` is not a strategy of `finetune` but the k-means
# cold start buying the whole budget at once (--initial = budget), one run per budget
# (typiclust-s<seed>-b<budget>).
# --semi: the semi-supervised stage (`--semi fixmatch`, its defaults: trained on every bought label,
# `-- --semi-refit false` keeps the validation slice; test-time flip, off with `--test-time-flip
# false`; mirrored pseudo-labels, on with `--pseudo-label-flip`) trains the final model after the last
# purchase, so every budget is its own run
# (<strategy>-s<seed>-b<budget>); the table shows each strategy before and after the stage (and flip).
# With `-- --validation random` every run of a seed validates on the same random slice (20% of the
# budget, bought first), so curve.md's validation table compares strategies; `audit` holds such a
# slice out of everything (curve.md's audit table). The slice grows with the budget, so run each
# budget in its own --out (the rows of smaller budgets in a larger run's metrics.csv have the larger
# slice). Not with typiclust (its cold start is the whole budget).
# --join DIR (with --semi): each run joins the run of the same name in DIR (a finished curve of
# another encoder): it trains on that run's bought labels and averages both final models
# (`frugal finetune --join`); the table's rows are then the ensemble's.
# Runs that exist are resumed (or skipped when finished).
# Writes <out>/curve.csv, <out>/curve.md and <out>/curve.png (plot needs matplotlib: installed into
# .venv on demand).
set -euo pipefail
cd "$(dirname "$0")/.."

encoder=checkpoints/fashion-vae
strategies="random margin"
budgets="1000 2000"
seeds="1 2 3"
out=checkpoints/label-curve
semi=0
join=
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --encoder) encoder=$2; shift 2 ;;
        --strategies) strategies=$2; shift 2 ;;
        --budgets) budgets=$2; shift 2 ;;
        --seeds) seeds=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --semi) semi=1; shift ;;
        --join) join=$2; shift 2 ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

# FRUGAL_BIN: a copy of the binary, so that rebuilding during a long curve cannot mix versions.
bin=${FRUGAL_BIN:-target/release/frugal}
[ -x "$bin" ] || cargo build --release
if [ -n "$join" ] && [ "$semi" != 1 ]; then
    echo "error: --join needs --semi (it joins the semi-supervised runs of another curve)" >&2
    exit 2
fi
max=$(printf '%s\n' $budgets | sort -n | tail -1)
mkdir -p "$out"

# One finetune run (name, flags...): skipped when finished, resumed when started.
finetune() {
    local run=$1
    shift
    local flags=(finetune "$@" --checkpoints "$out" --run "$run" "${extra[@]}")
    if [ -f "$out/$run/summary.json" ]; then
        echo "== $run: done already"
    elif [ -f "$out/$run/config.toml" ]; then
        echo "== $run: resuming"
        "$bin" "${flags[@]}" --resume
    else
        echo "== $run"
        "$bin" "${flags[@]}"
    fi
}

for strategy in $strategies; do
    case $strategy in
        random) plan=(--strategy random --cold-start random) ;;
        typiclust) plan=(--cold-start kmeans) ;;
        *) plan=(--strategy "$strategy" --cold-start kmeans) ;;
    esac
    for seed in $seeds; do
        if [ "$semi" = 1 ]; then
            for b in $budgets; do
                initial=()
                [ "$strategy" = typiclust ] && initial=(--initial "$b")
                joining=()
                [ -n "$join" ] && joining=(--join "$join/$strategy-s$seed-b$b")
                finetune "$strategy-s$seed-b$b" --encoder "$encoder" --labels "$b" "${plan[@]}" \
                    "${initial[@]}" --semi fixmatch --seed "$seed" "${joining[@]}"
            done
        elif [ "$strategy" = typiclust ]; then
            # One purchase per run: each budget is its own run.
            for b in $budgets; do
                finetune "$strategy-s$seed-b$b" --encoder "$encoder" --labels "$b" "${plan[@]}" \
                    --initial "$b" --seed "$seed"
            done
        else
            finetune "$strategy-s$seed" --encoder "$encoder" --labels "$max" "${plan[@]}" \
                --seed "$seed"
        fi
    done
done

table=(--out "$out" --budgets $budgets --strategies $strategies --seeds $seeds)
[ "$semi" = 1 ] && table+=(--semi)
python3 scripts/curve_table.py "${table[@]}"
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/python -c 'import matplotlib' 2>/dev/null || .venv/bin/python -m pip install -q matplotlib
.venv/bin/python scripts/curve_table.py "${table[@]}" --plot
