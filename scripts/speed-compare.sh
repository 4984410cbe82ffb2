#!/usr/bin/env bash
# Speed ratio ours / PyTorch on the same machine and threads: for each model, alternates
# `frugal bench speed` (A) and scripts/peer_torch.py (B), A B A B ..., for --rounds rounds, then
# prints images/s of each run and the ratio per round with its min / median / max.
# A benchmark, not a test: it installs PyTorch (CPU build from PyPI, several GB) into .venv-torch
# on first use.
#
# usage: scripts/speed-compare.sh [--models "vae simclr score mc-dropout"] [--rounds 3]
#                                 [--steps 30] [--warmup 5] [--threads 2] [--out DIR]
# Models: vae and simclr are the reference training steps of ../shared/notes/burn-cpu.md (ours:
# `--model reference-vae|reference-simclr`), score and mc-dropout the pool-scoring pass.
# Writes DIR/results.txt (every RESULT line) and DIR/speed.md (the table); DIR defaults to
# checkpoints/speed.
set -euo pipefail
cd "$(dirname "$0")/.."

models="vae simclr score mc-dropout"
rounds=3
steps=30
warmup=5
threads=2
out=checkpoints/speed
while [ $# -gt 0 ]; do
  case "$1" in
    --models) models="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --warmup) warmup="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "speed-compare: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

if ! .venv-torch/bin/python -c "import torch, numpy" 2>/dev/null; then
  echo "speed-compare: installing PyTorch into .venv-torch (once; several GB)" >&2
  python3 -m venv .venv-torch
  .venv-torch/bin/pip install -q --disable-pip-version-check torch numpy
fi
cargo build --release --quiet
mkdir -p "$out"
results="$out/results.txt"
: > "$results"

ours_model() {
  case "$1" in
    vae) echo reference-vae ;;
    simclr) echo reference-simclr ;;
    *) echo "$1" ;;
  esac
}

batch_for() {
  case "$1" in
    score|mc-dropout) echo 1024 ;;
    *) echo 256 ;;
  esac
}

for model in $models; do
  for round in $(seq 1 "$rounds"); do
    echo "speed-compare: $model round $round/$rounds: frugal" >&2
    ./target/release/frugal bench speed --model "$(ours_model "$model")" --batch "$(batch_for "$model")" --steps "$steps" \
      --warmup "$warmup" --threads "$threads" | sed "s/^RESULT /RESULT side=ours round=$round /" \
      | tee -a "$results"
    echo "speed-compare: $model round $round/$rounds: torch" >&2
    OMP_NUM_THREADS="$threads" .venv-torch/bin/python scripts/peer_torch.py "$model" \
      "$(batch_for "$model")" "$warmup" "$steps" \
      | sed "s/^RESULT /RESULT side=torch round=$round /" | tee -a "$results"
  done
done

python3 - "$results" "$out/speed.md" "$steps" "$warmup" "$threads" <<'EOF'
import re, statistics, sys
results, md, steps, warmup, threads = sys.argv[1:]
runs = {}
for line in open(results):
    kv = dict(re.findall(r"(\S+?)=(\S+)", line))
    runs.setdefault(kv["model"].replace("frugal-", ""), {}).setdefault(kv["side"], {})[int(kv["round"])] = kv
rows = ["| model | ours img/s (rounds) | PyTorch img/s (rounds) | ratio min / median / max | peak RSS ours / PyTorch |",
        "|---|---|---|---|---|"]
for model, sides in runs.items():
    ours, torch = sides.get("ours", {}), sides.get("torch", {})
    rounds = sorted(set(ours) & set(torch))
    if not rounds:
        continue
    ratios = sorted(float(ours[r]["img_per_s"]) / float(torch[r]["img_per_s"]) for r in rounds)
    fmt = lambda side: ", ".join(f'{float(side[r]["img_per_s"]):.0f}' for r in rounds)
    rss = lambda side: max(int(side[r].get("maxrss_kb", 0)) for r in rounds) / 1024 / 1024
    rows.append(f"| {model} | {fmt(ours)} | {fmt(torch)} | {ratios[0]:.2f} / {statistics.median(ratios):.2f} / "
                f"{ratios[-1]:.2f} | {rss(ours):.2f} / {rss(torch):.2f} GiB |")
text = "\n".join(rows) + f"\n\n{steps} measured steps after {warmup} warm-up steps, {threads} threads, alternating ours / PyTorch.\n"
open(md, "w").write(text)
print(text)
EOF
