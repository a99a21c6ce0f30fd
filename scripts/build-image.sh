#!/usr/bin/env bash
# Build the `concord:local` image FROM scratch: the binary plus the shared libraries ldd
# lists. No registry is needed.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
cargo build --all-targets  # same units as the tests: one RocksDB build
BIN="$CARGO_TARGET_DIR/debug/concord"
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/rootfs/data" "$STAGE/rootfs/tmp"
cp "$BIN" "$STAGE/rootfs/concord"
strip "$STAGE/rootfs/concord" 2>/dev/null || true
for lib in $(ldd "$BIN" | grep -o '/[^ ]*\.so[^ ]*'); do
  mkdir -p "$STAGE/rootfs$(dirname "$lib")"
  cp -L "$lib" "$STAGE/rootfs$lib"
done
cp cluster/Dockerfile "$STAGE/Dockerfile"
docker build -q -t concord:local "$STAGE"
echo "built concord:local"
