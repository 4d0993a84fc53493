#!/usr/bin/env bash
# The main job: installs what Locus needs, builds it, and starts a whole
# local cluster on loopback (`locus up`), with its data in ~/.locus.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/locus/target}"
cargo build --workspace --all-targets
BIN="$CARGO_TARGET_DIR/debug"
mkdir -p "$HOME/.local/bin"
for b in locus locus-server; do ln -sf "$BIN/$b" "$HOME/.local/bin/$b"; done
"$BIN/locus" up "$@"
echo
echo "(locus and locus-server are linked into ~/.local/bin; add it to PATH if needed)"
