#!/usr/bin/env bash
# Installs what frugal needs on a Debian machine with Rust, then builds the release binary.
#   scripts/setup.sh            dataset package + release build
#   scripts/setup.sh --no-build dataset package only
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
apt_updated=
apt_install() {
  if [ -z "$apt_updated" ]; then as_root apt-get update -qq; apt_updated=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# The data: Debian's package dataset-fashion-mnist puts the IDX files in /usr/share/datasets/fashion-mnist.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "setup: installing the Debian package dataset-fashion-mnist" >&2
  apt_install dataset-fashion-mnist
fi

if ! command -v cargo >/dev/null; then
  echo "setup: cargo not found; install Rust (https://rustup.rs) first" >&2
  exit 1
fi

if [ "${1:-}" != "--no-build" ]; then
  echo "setup: building frugal (release; the first build compiles burn and takes ~10 minutes on 2 cores)" >&2
  cargo build --release
fi
