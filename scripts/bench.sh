#!/usr/bin/env bash
# Builds release binaries and runs a benchmark: ./scripts/bench.sh meta [flags]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/locus/target}"
cargo build --release --workspace --bins
exec "$CARGO_TARGET_DIR/release/locus-bench" "$@"
