#!/usr/bin/env bash
# The test command: installs what the tests need, then runs formatting,
# lints and every test (unit, storage suite, multi-process cluster tests).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh
# A target directory outside the clone, so repeated runs reuse the RocksDB build.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/locus/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

echo "== cargo fmt"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo build (binaries the cluster tests start)"
cargo build --workspace --all-targets
echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --profile ci "$@"
else
  cargo test --workspace -- --test-threads=1 "$@"
fi
