#!/usr/bin/env bash
# A/B comparison of two Concord binaries under the same load: for each round and binary, a
# fresh 3-node cluster on loopback (127.0.0.1:27701-27703) and one `concord bench` run per
# workload, alternating the binaries so neither always runs first.
#
#   scripts/bench-ab.sh OLD_BINARY NEW_BINARY
#   RUNS="lock-contended:256 put:256" ROUNDS=3 DURATION=8s scripts/bench-ab.sh /tmp/a /tmp/b
#   PAIRED=1 RUNS="put:64" ROUNDS=6 scripts/bench-ab.sh /tmp/a /tmp/b
#
# Build the old binary from a worktree with the same CARGO_TARGET_DIR and copy it away before
# building the new one (one RocksDB build serves both). Reports go to OUT (default
# data/bench-ab/<time>); the last lines are one row per run, with the servers' CPU time per op
# (the three nodes together, `--cpu-pids`): on this shared machine a steadier signal than
# throughput. One load generator drives both clusters: GEN (default NEW_BINARY; it needs
# `--cpu-pids`, c464581 or later), so that only the servers differ.
#
# PAIRED=1 runs both clusters at once instead (old on 27701-27703, new on 27801-27803), each
# loaded by its own generator with the same workload at the same time, so that both see the same
# minute of a machine whose speed drifts: the ratio of CPU per op within one pair (`new/old`,
# below 1 when the new binary spends less per op) is then the steadiest signal. The two clusters
# are started once and serve every run and round (their state grows from run to run, alike for
# both). Throughput in a pair is not comparable with an unpaired run (the two clusters share the
# cores, and the one that answers faster gets more of the closed-loop load).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 2 ] || { echo "usage: $0 OLD_BINARY NEW_BINARY" >&2; exit 2; }
BINS=("$1" "$2")
GEN=${GEN:-$2}
RUNS=${RUNS:-"lock-contended:64 lock-contended:256 put:256 lock:256"}
ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-8s}
WARMUP=${WARMUP:-2s}
PAIRED=${PAIRED:-0}
OUT=${OUT:-data/bench-ab/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"

eps() { echo "127.0.0.1:${1}01,127.0.0.1:${1}02,127.0.0.1:${1}03"; } # port prefix
csv() { local IFS=,; echo "$*"; }

pids=()
stop() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}
trap stop EXIT
trap 'exit 130' INT TERM

start() { # binary label port-prefix; the nodes' pids go to `cpids` as well as `pids`
  local i
  rm -rf "$OUT/cluster-$2"
  cpids=()
  for i in 1 2 3; do
    "$1" serve --id "$i" --listen "127.0.0.1:${3}0$i" --data-dir "$OUT/cluster-$2/n$i" \
      --initial-cluster "1=127.0.0.1:${3}01,2=127.0.0.1:${3}02,3=127.0.0.1:${3}03" \
      >"$OUT/$2-n$i.log" 2>&1 &
    pids+=($!)
    cpids+=($!)
  done
  for _ in $(seq 1 150); do
    "$1" --endpoints "$(eps "$3")" cluster ready >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "bench-ab: the $2 cluster did not become ready; logs in $OUT" >&2
  exit 1
}

bench() { # label node-pids workload clients round port-prefix
  local f="$OUT/$1-$3-$4-$5.json"
  "$GEN" --endpoints "$(eps "$6")" bench --workload "$3" --clients "$4" \
    --duration "$DURATION" --warmup "$WARMUP" --cpu-pids "$2" --json >"$f" 2>"$f.err" || true
}

report() { # round label=report.json...: one row per report, then the CPU ratio of a pair
  python3 - "$@" <<'EOF'
import json, sys
r, runs = sys.argv[1], [a.split("=", 1) for a in sys.argv[2:]]
cpus = []
for label, f in runs:
    try:
        d = json.load(open(f))
    except (OSError, ValueError):
        print(f"round {r} {label:<3} {f}: no report (see {f}.err)")
        cpus.append(None)
        continue
    cpu = (d.get("cpu") or {}).get("servers_us_per_op")
    cpus.append(cpu)
    print(f"round {r} {label:<3} {d['workload']:<15} c={d['clients']:<4} {d['throughput']:>9.1f} {d['unit']:<8}"
          f" p50 {d['p50_ms']} ms  p99 {d['p99_ms']} ms  errors {d['error_count']}"
          f"  server CPU {f'{cpu:.0f}' if cpu is not None else '-'} us/op")
if len(cpus) == 2 and all(cpus):
    print(f"round {r} pair CPU per op new/old {cpus[1] / cpus[0]:.3f}")
EOF
}

exec > >(tee "$OUT/runs.txt")
if [ "$PAIRED" = 1 ]; then
  start "${BINS[0]}" old 277
  old_pids=$(csv "${cpids[@]}")
  start "${BINS[1]}" new 278
  new_pids=$(csv "${cpids[@]}")
  for r in $(seq 1 "$ROUNDS"); do
    for run in $RUNS; do
      w=${run%%:*} c=${run##*:}
      bench old "$old_pids" "$w" "$c" "$r" 277 &
      a=$!
      bench new "$new_pids" "$w" "$c" "$r" 278 &
      b=$!
      pids+=("$a" "$b")
      wait "$a" "$b"
      report "$r" "old=$OUT/old-$w-$c-$r.json" "new=$OUT/new-$w-$c-$r.json"
    done
  done
  exit 0
fi
for r in $(seq 1 "$ROUNDS"); do
  order=(0 1)
  [ $((r % 2)) -eq 0 ] && order=(1 0)
  for b in "${order[@]}"; do
    label=$([ "$b" -eq 0 ] && echo old || echo new)
    start "${BINS[$b]}" "$label" 277
    for run in $RUNS; do
      w=${run%%:*} c=${run##*:}
      bench "$label" "$(csv "${cpids[@]}")" "$w" "$c" "$r" 277
      report "$r" "$label=$OUT/$label-$w-$c-$r.json"
    done
    stop
  done
done
