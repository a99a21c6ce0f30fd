#!/usr/bin/env bash
# Build the optimized `concord` binary (cargo's release profile: opt-level 3, no debug
# assertions) and print its path. RocksDB's C++ is not compiled a second time: the test
# build's static librocksdb.a (built once by `cargo build --all-targets`) is linked instead,
# through librocksdb-sys's ROCKSDB_LIB_DIR. The benchmarks run this binary; tests use the test
# build (one profile for tests).
#
#   BIN=$(scripts/build-release.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
cargo build --all-targets >&2 # same units as the tests: the one RocksDB build
lib=$(ls -t "$CARGO_TARGET_DIR"/debug/build/librocksdb-sys-*/out/librocksdb.a 2>/dev/null | head -1)
[ -n "$lib" ] || { echo "build-release: librocksdb.a not found under $CARGO_TARGET_DIR/debug" >&2; exit 1; }
ROCKSDB_LIB_DIR=$(dirname "$lib") ROCKSDB_STATIC=1 cargo build --release --bin concord >&2
echo "$CARGO_TARGET_DIR/release/concord"
