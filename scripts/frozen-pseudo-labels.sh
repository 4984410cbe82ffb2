#!/usr/bin/env bash
# An exploration, not a test: do pseudo-labels on the frozen encoder's features (self-training,
# label propagation) beat a head on the bought labels alone? Embeds the pool and the test set
# with `frugal embed` (once), then runs scripts/frozen_pseudo_labels.py on the bought labels of
# finished finetune runs (their ledgers). Installs PyTorch into .venv-torch on first use, as
# scripts/speed-compare.sh does.
#
# usage: scripts/frozen-pseudo-labels.sh [--encoder DIR] [--out DIR] RUN_DIR...
#   --encoder  the pretrained encoder [default: checkpoints/fashion-simclr-40]
#   --out      where the embeddings go [default: checkpoints/embed-<encoder name>]
set -euo pipefail
cd "$(dirname "$0")/.."

encoder=checkpoints/fashion-simclr-40
out=
while [ $# -gt 0 ]; do
  case "$1" in
    --encoder) encoder="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    -*) echo "frozen-pseudo-labels: unknown argument $1 (see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || { echo "frozen-pseudo-labels: give finished finetune run directories" >&2; exit 2; }
out=${out:-checkpoints/embed-$(basename "$encoder")}
for run in "$@"; do
  [ -f "$run/labels.db" ] || { echo "frozen-pseudo-labels: $run has no labels.db: give finished finetune run directories" >&2; exit 2; }
done

if ! .venv-torch/bin/python -c "import torch, numpy" 2>/dev/null; then
  echo "frozen-pseudo-labels: installing PyTorch into .venv-torch (once; several GB)" >&2
  python3 -m venv .venv-torch
  .venv-torch/bin/pip install -q --disable-pip-version-check torch numpy
fi
cargo build --release --quiet
# Embed again unless $out holds this encoder's arrays (embed.json is written last, so its presence
# means they are complete).
if ! grep -qF "\"encoder_run\": \"$encoder\"" "$out/embed.json" 2>/dev/null; then
  target/release/frugal embed --encoder "$encoder" --out "$out"
fi
.venv-torch/bin/python scripts/frozen_pseudo_labels.py --embeddings "$out" --runs "$@"
