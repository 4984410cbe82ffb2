#!/usr/bin/env bash
# Packs what scripts/gpu-check.sh needs on a GPU machine that has no Rust toolchain and no network:
#
#   dist/frugal-cuda.gz   the release binary built with --features cuda, stripped and gzipped
#                         (about 46 MiB stripped, 12 MiB gzipped; gpu-check.sh unpacks it)
#   dist/fashion-mnist/   the four Fashion-MNIST IDX files (gzipped, as Debian ships them; 30 MiB)
#
# The device machine takes at most 64 MiB of working tree in all (tracked files, dist/, ...): the
# stripped binary and the data together would not fit uncompressed.
#
# Run it here (it builds); then carry dist/ to the GPU machine next to the repository and run
# scripts/gpu-check.sh there. dist/ is git-ignored.
#
#   scripts/gpu-pack.sh [--data-src DIR] [--no-build]
#
# The build uses its own target directory, target/cuda (override with CUDA_TARGET_DIR): the cuda
# feature changes burn's features, so sharing target/ would rebuild burn for the CPU build too.
# A clean build compiles burn's CUDA backend: about 10 minutes on 2 cores; no CUDA toolkit, GPU or
# network is needed to build. Without nvcc, cudarc (the driver bindings under burn) binds the newest
# CUDA API it knows, 13.4 (target/cuda/release/build/cudarc-*/output says which); the driver calls
# burn makes exist in older drivers too. To bind another version: CUDARC_CUDA_VERSION=12080.
set -euo pipefail
cd "$(dirname "$0")/.."

data_src=/usr/share/datasets/fashion-mnist
build=1
while [ $# -gt 0 ]; do
  case "$1" in
    --data-src) data_src=$2; shift 2 ;;
    --no-build) build=; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu-pack: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

target=${CUDA_TARGET_DIR:-target/cuda}
if [ -n "$build" ]; then
  echo "gpu-pack: CARGO_TARGET_DIR=$target cargo build --release --features cuda" >&2
  CARGO_TARGET_DIR=$target cargo build --release --features cuda
fi
bin=$target/release/frugal
[ -x "$bin" ] || { echo "gpu-pack: $bin is missing (run without --no-build)" >&2; exit 1; }
command -v strip >/dev/null || { echo "gpu-pack: strip not found (Debian package binutils)" >&2; exit 1; }

mkdir -p dist/fashion-mnist
rm -f dist/frugal-cuda dist/frugal-cuda.gz
cp "$bin" dist/frugal-cuda.tmp
strip dist/frugal-cuda.tmp
stripped_bytes=$(stat -c %s dist/frugal-cuda.tmp)
gzip -9 -c dist/frugal-cuda.tmp >dist/frugal-cuda.gz.tmp
rm dist/frugal-cuda.tmp
mv dist/frugal-cuda.gz.tmp dist/frugal-cuda.gz

for name in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
  rm -f "dist/fashion-mnist/$name" "dist/fashion-mnist/$name.gz"
  if [ -f "$data_src/$name.gz" ]; then
    cp "$data_src/$name.gz" dist/fashion-mnist/
  elif [ -f "$data_src/$name" ]; then
    cp "$data_src/$name" dist/fashion-mnist/
  else
    echo "gpu-pack: $data_src has no $name(.gz) (install Debian's dataset-fashion-mnist, or --data-src DIR)" >&2
    exit 1
  fi
done

# What travels: the tracked files and all of dist/.
bin_bytes=$(stat -c %s dist/frugal-cuda.gz)
data_bytes=$(du -cb dist/fashion-mnist/* | tail -1 | cut -f1)
dist_bytes=$(du -cb dist | tail -1 | cut -f1)
tree_bytes=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
total=$((dist_bytes + tree_bytes))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "gpu-pack: binary $(mib "$stripped_bytes") stripped, dist/frugal-cuda.gz $(mib "$bin_bytes"); dist/fashion-mnist $(mib "$data_bytes"); all of dist/ $(mib "$dist_bytes") + tracked files $(mib "$tree_bytes") = $(mib "$total") of 64 MiB" >&2
if [ "$total" -gt $((64 * 1048576)) ]; then
  echo "gpu-pack: too large to carry (64 MiB at most)" >&2
  exit 1
fi
