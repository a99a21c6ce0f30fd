#!/usr/bin/env bash
# Test the docker-compose deployment: build the image, start 3 nodes, write through one and
# read through another, scale to 5 (n4, n5 join as learners and become voters), remove a node,
# check that its id cannot be reused and the cluster still takes writes, tear down.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
./scripts/build-image.sh >/dev/null
BIN="$CARGO_TARGET_DIR/debug/concord"
export COMPOSE_PROJECT_NAME=concord-ci
dc() { docker-compose --profile scale "$@"; }
cleanup() { dc down -v >/dev/null 2>&1 || true; }
trap cleanup EXIT
cleanup
fail() { echo "compose-test: FAILED: $*" >&2; dc logs --tail 30 >&2 || true; exit 1; }

docker-compose up -d n1 n2 n3 >/dev/null 2>&1
for _ in $(seq 1 150); do
  "$BIN" --endpoints 127.0.0.1:7701 cluster ready >/dev/null 2>&1 && break
  sleep 0.2
done
"$BIN" --endpoints 127.0.0.1:7701 cluster ready >/dev/null || fail "cluster not ready"

"$BIN" --endpoints 127.0.0.1:7702 kv put compose/a 1 >/dev/null || fail "put through n2"
[ "$("$BIN" --endpoints 127.0.0.1:7703 kv get compose/a)" = 1 ] || fail "read through n3"

# Scale out: n4 and n5 start with CONCORD_JOIN and are added one at a time.
dc up -d n4 n5 >/dev/null 2>&1
"$BIN" --endpoints 127.0.0.1:7701 cluster add 4 n4:7700 >/dev/null || fail "add n4"
"$BIN" --endpoints 127.0.0.1:7701 cluster add 5 n5:7700 >/dev/null || fail "add n5"
voters=$("$BIN" --endpoints 127.0.0.1:7701 --json cluster status | python3 -c 'import json,sys; print(sorted(m["id"] for m in json.load(sys.stdin)["members"] if m["role"]=="voter"))')
[ "$voters" = "[1, 2, 3, 4, 5]" ] || fail "voters after scale-out: $voters"
# n5 caught up: a stale read on it sees the write made before it joined.
for _ in $(seq 1 50); do
  [ "$("$BIN" --endpoints 127.0.0.1:7705 kv get compose/a --stale 2>/dev/null)" = 1 ] && break
  sleep 0.2
done
[ "$("$BIN" --endpoints 127.0.0.1:7705 kv get compose/a --stale)" = 1 ] || fail "n5 did not catch up"

# Scale in: remove n2, stop its container; the id is retired.
"$BIN" --endpoints 127.0.0.1:7701 cluster remove 2 >/dev/null || fail "remove n2"
dc stop n2 >/dev/null 2>&1
if "$BIN" --endpoints 127.0.0.1:7701 cluster add 2 n2:7700 >/dev/null 2>&1; then fail "id 2 was reused"; fi
"$BIN" --endpoints 127.0.0.1:7704,127.0.0.1:7705 kv put compose/b 2 >/dev/null || fail "write after scale-in"
voters=$("$BIN" --endpoints 127.0.0.1:7701 --json cluster status | python3 -c 'import json,sys; print(sorted(m["id"] for m in json.load(sys.stdin)["members"] if m["role"]=="voter"))')
[ "$voters" = "[1, 3, 4, 5]" ] || fail "voters after scale-in: $voters"
echo "compose-test: ok (3 nodes -> 5 -> 4, writes and reads through every node)"
