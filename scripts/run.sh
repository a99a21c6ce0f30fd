#!/usr/bin/env bash
# Start a single-node Concord cluster on 127.0.0.1:7700 with data in ./data.
# Extra arguments go to `concord serve` (see `concord serve --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
cargo build --all-targets  # same units as the tests: one RocksDB build
exec "$CARGO_TARGET_DIR/debug/concord" serve "$@"
