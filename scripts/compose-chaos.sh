#!/usr/bin/env bash
# Chaos against the docker-compose cluster: the register and lock workloads while containers
# are killed (docker kill / start), paused (docker pause / unpause) and disconnected from the
# compose network (docker network disconnect / connect), checked by the same checkers as
# `concord chaos`.   DURATION=60s (default) per run; results in chaos-out/compose-*.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
./scripts/build-image.sh >/dev/null
BIN="$CARGO_TARGET_DIR/debug/concord"
DURATION="${DURATION:-60s}"
export COMPOSE_PROJECT_NAME=concord-chaos
cleanup() { docker-compose down -v >/dev/null 2>&1 || true; }
trap cleanup EXIT
cleanup
fail=0
for workload in register lock; do
  for nemesis in kill pause partition; do
    cleanup
    docker-compose up -d n1 n2 n3 >/dev/null 2>&1
    for _ in $(seq 1 150); do
      "$BIN" --endpoints 127.0.0.1:7701 cluster ready >/dev/null 2>&1 && break
      sleep 0.2
    done
    out="chaos-out/compose-$workload-$nemesis"
    rm -rf "$out"
    if ! "$BIN" chaos --compose "$COMPOSE_PROJECT_NAME" --nodes 3 --workload "$workload" \
        --nemesis "$nemesis" --duration "$DURATION" --out "$out"; then
      echo "VIOLATION: compose $workload / $nemesis (see $out)"
      fail=1
    fi
  done
done
exit $fail
