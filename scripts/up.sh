#!/usr/bin/env bash
# The main job: installs what Locus needs, builds it, starts a whole local
# cluster on loopback (`locus up`: 3 metadata nodes, 3 chunk servers, 3 VM
# hosts, data in ~/.locus) and walks through the main job (`locus demo`):
# upload an image and a data set, define a service, show where each VM went
# and why, kill a machine, show its VM running elsewhere with its data.
# `./scripts/up.sh --no-demo` only starts the cluster.
set -euo pipefail
cd "$(dirname "$0")/.."

demo=1
args=()
demo_args=()
prev=""
for a in "$@"; do
  if [ "$a" = "--no-demo" ]; then demo=0; else args+=("$a"); fi
  if [ "$prev" = "--data-dir" ]; then demo_args=(--data-dir "$a"); fi
  prev="$a"
done

./scripts/install-deps.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/locus/target}"
cargo build --workspace --all-targets
BIN="$CARGO_TARGET_DIR/debug"
mkdir -p "$HOME/.local/bin"
for b in locus locus-server locus-vmhost; do ln -sf "$BIN/$b" "$HOME/.local/bin/$b"; done
"$BIN/locus" up "${args[@]}"
if [ "$demo" = 1 ]; then
  "$BIN/locus" demo "${demo_args[@]}"
fi
echo
echo "(locus, locus-server and locus-vmhost are linked into ~/.local/bin; add it to PATH if needed)"
