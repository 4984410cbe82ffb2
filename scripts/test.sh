#!/usr/bin/env bash
# The test command: installs what the tests need (the dataset package, a venv with TensorBoard from
# PyPI for the real-client tests), then format check, clippy, and every test.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh --no-build

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
if ! .venv/bin/python -c "import tensorboard" 2>/dev/null; then
  echo "test: installing TensorBoard into .venv" >&2
  if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c "import ensurepip" 2>/dev/null; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null
  fi
  rm -rf .venv
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check tensorboard
fi
export FRUGAL_TB_PYTHON="$PWD/.venv/bin/python"

for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    rustup component add "$component"
  fi
done

echo "test: cargo fmt --check" >&2
cargo fmt --all -- --check
# Build first: clippy then reuses the release build's metadata instead of compiling burn twice.
echo "test: building (release)" >&2
cargo test --release --no-run
echo "test: cargo clippy -D warnings" >&2
cargo clippy --release --all-targets -- -D warnings
echo "test: cargo test" >&2
cargo test --release
