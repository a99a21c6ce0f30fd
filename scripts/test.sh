#!/usr/bin/env bash
# Run the whole test suite: formatting, lints, unit, property, storage-suite, in-process
# cluster and real-process tests. One build profile (dev, dependencies optimized).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
rustup component list --installed 2>/dev/null | grep -q rustfmt && cargo fmt --check
if rustup component list --installed 2>/dev/null | grep -q clippy; then
  cargo clippy --all-targets -- -D warnings
fi
cargo build --all-targets
# Cluster tests start several nodes each; two at a time keeps two cores from starving
# elections.
cargo test -- --test-threads=2
# The docker-compose deployment: image from scratch, 3 nodes, scale to 5 and back to 4.
./scripts/compose-test.sh
