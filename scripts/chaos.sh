#!/usr/bin/env bash
# The standard chaos matrix: every workload under every nemesis, against real processes.
#   scripts/chaos.sh                 # 60 s per run
#   DURATION=10m scripts/chaos.sh    # longer runs
#   NODES=5 scripts/chaos.sh         # 5 nodes (adds bridge and ring partitions)
# Histories, summaries and node logs go to chaos-out/<workload>-<nemesis>/.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
cargo build --all-targets  # same units as the tests: one RocksDB build
BIN="$CARGO_TARGET_DIR/debug/concord"
DURATION="${DURATION:-60s}"
NODES="${NODES:-3}"
SEED="${SEED:-$RANDOM}"
fail=0
for workload in register lock semaphore lease barrier mixed; do
  for nemesis in kill pause partition mixed; do
    out="chaos-out/$workload-$nemesis"
    rm -rf "$out"
    # mixed: 15 clients are three of each kind (the barrier clients are its parties).
    clients=6; [ "$workload" = mixed ] && clients=15
    if ! "$BIN" chaos --nodes "$NODES" --workload "$workload" --nemesis "$nemesis" --clients "$clients" \
        --duration "$DURATION" --seed "$SEED" --out "$out"; then
      echo "VIOLATION: $workload / $nemesis (seed $SEED, see $out)"
      fail=1
    fi
  done
done
exit $fail
