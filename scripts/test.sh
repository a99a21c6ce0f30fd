#!/usr/bin/env bash
# Run the whole test suite: formatting, lints, unit, property, storage-suite, in-process
# cluster and real-process tests. One build profile (dev, dependencies optimized).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
rustup component list --installed 2>/dev/null | grep -q rustfmt && cargo fmt --check
cargo build --all-targets
if rustup component list --installed 2>/dev/null | grep -q clippy; then
  # Clippy checks (never links), and cargo gives check its own librocksdb-sys build-script
  # run, which would compile RocksDB's C++ a second time (~25 min on two cores). Pointing
  # ROCKSDB_LIB_DIR at a directory makes that run skip the C++ and only generate the bindings;
  # the `cargo build` units above are separate and keep their own compiled RocksDB.
  mkdir -p "$CARGO_TARGET_DIR/clippy-no-link"
  ROCKSDB_LIB_DIR="$CARGO_TARGET_DIR/clippy-no-link" ROCKSDB_STATIC=1 \
    cargo clippy --all-targets -- -D warnings
fi
# Cluster tests start several nodes each; two at a time keeps two cores from starving
# elections.
cargo test -- --test-threads=2
# The docker-compose deployment: image from scratch, 3 nodes, scale to 5 and back to 4.
./scripts/compose-test.sh
