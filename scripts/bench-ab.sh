#!/usr/bin/env bash
# A/B comparison of two Concord binaries under the same load: for each round and binary, a
# fresh 3-node cluster on loopback (127.0.0.1:27701-27703) and one `concord bench` run per
# workload, alternating the binaries so neither always runs first.
#
#   scripts/bench-ab.sh OLD_BINARY NEW_BINARY
#   RUNS="lock-contended:256 put:256" ROUNDS=3 DURATION=8s scripts/bench-ab.sh /tmp/a /tmp/b
#
# Build the old binary from a worktree with the same CARGO_TARGET_DIR and copy it away before
# building the new one (one RocksDB build serves both). Reports go to OUT (default
# data/bench-ab/<time>); the last lines are one row per run, with the servers' CPU time per op
# (the three nodes together, `--cpu-pids`): on this shared machine a steadier signal than
# throughput. One load generator drives both clusters: GEN (default NEW_BINARY; it needs
# `--cpu-pids`, c464581 or later), so that only the servers differ.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 2 ] || { echo "usage: $0 OLD_BINARY NEW_BINARY" >&2; exit 2; }
BINS=("$1" "$2")
GEN=${GEN:-$2}
RUNS=${RUNS:-"lock-contended:64 lock-contended:256 put:256 lock:256"}
ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-8s}
WARMUP=${WARMUP:-2s}
OUT=${OUT:-data/bench-ab/$(date -u +%Y%m%dT%H%M%SZ)}
EPS="127.0.0.1:27701,127.0.0.1:27702,127.0.0.1:27703"
INITIAL="1=127.0.0.1:27701,2=127.0.0.1:27702,3=127.0.0.1:27703"
mkdir -p "$OUT"

pids=()
stop() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}
trap stop EXIT INT TERM

start() { # binary label
  rm -rf "$OUT/cluster"
  for i in 1 2 3; do
    "$1" serve --id "$i" --listen "127.0.0.1:2770$i" --data-dir "$OUT/cluster/n$i" \
      --initial-cluster "$INITIAL" >"$OUT/$2-n$i.log" 2>&1 &
    pids+=($!)
  done
  for _ in $(seq 1 150); do
    "$1" --endpoints "$EPS" cluster ready >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "bench-ab: the $2 cluster did not become ready; logs in $OUT" >&2
  exit 1
}

exec > >(tee "$OUT/runs.txt")
for r in $(seq 1 "$ROUNDS"); do
  order=(0 1)
  [ $((r % 2)) -eq 0 ] && order=(1 0)
  for b in "${order[@]}"; do
    label=$([ "$b" -eq 0 ] && echo old || echo new)
    start "${BINS[$b]}" "$label"
    for run in $RUNS; do
      w=${run%%:*} c=${run##*:}
      f="$OUT/$label-$w-$c-$r.json"
      "$GEN" --endpoints "$EPS" bench --workload "$w" --clients "$c" \
        --duration "$DURATION" --warmup "$WARMUP" --cpu-pids "$(IFS=,; echo "${pids[*]}")" \
        --json >"$f" 2>"$f.err" || true
      python3 - "$f" "$r" "$label" <<'EOF'
import json, sys
f, r, label = sys.argv[1:4]
try:
    d = json.load(open(f))
except ValueError:
    print(f"round {r} {label:<3} {f}: no report (see {f}.err)")
    sys.exit(0)
cpu = (d.get("cpu") or {}).get("servers_us_per_op")
print(f"round {r} {label:<3} {d['workload']:<15} c={d['clients']:<4} {d['throughput']:>9.1f} {d['unit']:<8}"
      f" p50 {d['p50_ms']} ms  p99 {d['p99_ms']} ms  errors {d['error_count']}"
      f"  server CPU {f'{cpu:.0f}' if cpu is not None else '-'} us/op")
EOF
    done
    stop
  done
done
