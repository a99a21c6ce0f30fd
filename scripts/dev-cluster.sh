#!/usr/bin/env bash
# Start a 3-node local cluster on 127.0.0.1:7701-7703 (data under ./data/dev-N, logs in
# ./data/dev-N.log) and print how to reach it. Ctrl-C stops all three.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
cargo build --all-targets  # same units as the tests: one RocksDB build
BIN="$CARGO_TARGET_DIR/debug/concord"
INITIAL="1=127.0.0.1:7701,2=127.0.0.1:7702,3=127.0.0.1:7703"
mkdir -p data
pids=()
for id in 1 2 3; do
  "$BIN" serve --id "$id" --listen "127.0.0.1:770$id" --data-dir "data/dev-$id" \
    --initial-cluster "$INITIAL" >"data/dev-$id.log" 2>&1 &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null; wait' EXIT INT TERM
for _ in $(seq 1 100); do
  curl -sf http://127.0.0.1:7701/ready >/dev/null 2>&1 && break
  sleep 0.1
done
cat <<MSG
Concord dev cluster running (pids ${pids[*]}):
  nodes:   127.0.0.1:7701  127.0.0.1:7702  127.0.0.1:7703
  logs:    data/dev-{1,2,3}.log
  status:  $BIN --endpoints 127.0.0.1:7701,127.0.0.1:7702,127.0.0.1:7703 cluster status
  curl:    curl -s localhost:7702/v1/cluster
Ctrl-C stops the cluster.
MSG
wait
