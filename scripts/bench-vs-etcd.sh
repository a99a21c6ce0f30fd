#!/usr/bin/env bash
# Concord and etcd side by side on this machine: a 3-member etcd cluster and a 3-node Concord
# cluster on loopback, both with fsync on, the same load generator (`concord bench`, which
# speaks etcd's v3 JSON gateway with --target etcd), the same workloads at the same client
# counts, the two systems alternating run by run. Prints one table with the ratio
# Concord/etcd per row, and each system's CPU time per op (its three server processes,
# `--cpu-pids`, and the load generator), and keeps every run's JSON report.
#
#   scripts/bench-vs-etcd.sh                      # defaults below
#   DURATION=5s ROUNDS=1 CLIENTS="16 64" WORKLOADS="put lock" scripts/bench-vs-etcd.sh
#
# Settings (environment): WORKLOADS, CLIENTS, DURATION (measured time per run), WARMUP,
# ROUNDS (runs per system and row; odd rounds start with Concord, even ones with etcd),
# OUT (where the reports go; default data/bench-vs-etcd/<timestamp>), BIN (the concord binary;
# default: scripts/build-release.sh builds the optimized one).
# Installs Debian's etcd-server and etcd-client, and python3 for the table, when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh

WORKLOADS=${WORKLOADS:-"put get lock lock-contended lease"}
CLIENTS=${CLIENTS:-"1 16 64 256"}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
ROUNDS=${ROUNDS:-2}
STAMP=$(date +%Y%m%d-%H%M%S)
OUT=${OUT:-data/bench-vs-etcd/$STAMP}

need=()
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
command -v python3 >/dev/null 2>&1 || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
  echo "bench-vs-etcd: installing ${need[*]}" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
# Debian's package may start its own etcd (systemd); ours use other ports, so it can stay.

# The optimized build (etcd is a release build too); BIN=... runs another binary instead.
BIN=${BIN:-$(scripts/build-release.sh)}

mkdir -p "$OUT"
WORK="$OUT/clusters"
rm -rf "$WORK"
mkdir -p "$WORK"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

# etcd: clients on 127.0.0.1:2379{1,2,3}, peers on 127.0.0.1:2380{1,2,3}. fsync is etcd's
# default (--unsafe-no-fsync is off).
ETCD_INITIAL="e1=http://127.0.0.1:23801,e2=http://127.0.0.1:23802,e3=http://127.0.0.1:23803"
ETCD_EPS="127.0.0.1:23791,127.0.0.1:23792,127.0.0.1:23793"
# Each system's server processes: the bench reports their CPU time per op (--cpu-pids).
etcd_pids=()
concord_pids=()
for i in 1 2 3; do
  etcd --name "e$i" --data-dir "$WORK/etcd-$i" \
    --listen-client-urls "http://127.0.0.1:2379$i" --advertise-client-urls "http://127.0.0.1:2379$i" \
    --listen-peer-urls "http://127.0.0.1:2380$i" --initial-advertise-peer-urls "http://127.0.0.1:2380$i" \
    --initial-cluster "$ETCD_INITIAL" --initial-cluster-state new --initial-cluster-token bench \
    >"$WORK/etcd-$i.log" 2>&1 &
  pids+=($!)
  etcd_pids+=($!)
done

# Concord: 127.0.0.1:2770{1,2,3}. fsync is always on (group commit).
CONCORD_INITIAL="1=127.0.0.1:27701,2=127.0.0.1:27702,3=127.0.0.1:27703"
CONCORD_EPS="127.0.0.1:27701,127.0.0.1:27702,127.0.0.1:27703"
for i in 1 2 3; do
  "$BIN" serve --id "$i" --listen "127.0.0.1:2770$i" --data-dir "$WORK/concord-$i" \
    --initial-cluster "$CONCORD_INITIAL" >"$WORK/concord-$i.log" 2>&1 &
  pids+=($!)
  concord_pids+=($!)
done

ready=0
for _ in $(seq 1 300); do
  if ETCDCTL_API=3 etcdctl --endpoints "$ETCD_EPS" endpoint health >/dev/null 2>&1 \
    && "$BIN" --endpoints "$CONCORD_EPS" cluster ready >/dev/null 2>&1; then
    ready=1
    break
  fi
  sleep 0.2
done
if [ "$ready" != 1 ]; then
  echo "bench-vs-etcd: the clusters did not become ready; logs in $WORK" >&2
  tail -n 20 "$WORK"/*.log >&2
  trap - EXIT
  cleanup_keep_logs() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
  cleanup_keep_logs
  exit 1
fi

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r)"
  echo "etcd: $(etcd --version | head -n 1)"
  echo "concord: $(git describe --always --dirty 2>/dev/null || echo unknown), $BIN"
  echo "settings: WORKLOADS='$WORKLOADS' CLIENTS='$CLIENTS' DURATION=$DURATION WARMUP=$WARMUP ROUNDS=$ROUNDS"
} | tee "$OUT/setup.txt"

# The endpoints, the current leader last. Clients are dealt to endpoints in order, so a single
# client then talks to a follower in both systems (forwarding is part of what is measured)
# instead of to whichever node the election picked (etcd's one-client put moved by 29 %
# between two runs before this, Concord's by 1 %).
leader_last() { # system
  local eps leader
  if [ "$1" = concord ]; then
    eps=$CONCORD_EPS
    leader=$(curl -s --max-time 2 "http://${CONCORD_EPS%%,*}/v1/cluster" | python3 -c '
import json, sys
l = json.load(sys.stdin).get("leader")
print(f"127.0.0.1:2770{l}" if l else "")' 2>/dev/null || true)
  else
    eps=$ETCD_EPS
    leader=$(ETCDCTL_API=3 etcdctl --endpoints "$ETCD_EPS" endpoint status -w json 2>/dev/null \
      | python3 -c '
import json, sys
for e in json.load(sys.stdin):
    s = e["Status"]
    if s["header"]["member_id"] == s["leader"]:
        print(e["Endpoint"].replace("http://", ""))' 2>/dev/null || true)
  fi
  python3 - "$eps" "$leader" <<'PY'
import sys
eps, leader = sys.argv[1].split(","), sys.argv[2]
print(",".join([e for e in eps if e != leader] + [e for e in eps if e == leader]))
PY
}

run_one() { # system workload clients round
  local sys=$1 w=$2 c=$3 r=$4 eps target cpu_pids
  if [ "$sys" = concord ]; then
    target=concord
    cpu_pids=$(IFS=,; echo "${concord_pids[*]}")
  else
    target=etcd
    cpu_pids=$(IFS=,; echo "${etcd_pids[*]}")
  fi
  eps=$(leader_last "$sys")
  echo "  $sys endpoints (leader last): $eps"
  local file="$OUT/$w-c$c-$sys-r$r.json"
  "$BIN" --endpoints "$eps" bench --target "$target" --workload "$w" --clients "$c" \
    --duration "$DURATION" --warmup "$WARMUP" --value-size 256 --cpu-pids "$cpu_pids" \
    --json >"$file" || true
  python3 - "$file" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as e:
    print(f"  {sys.argv[1]}: no report ({e})"); sys.exit(0)
p99 = r.get("p99_ms")
cpu = (r.get("cpu") or {}).get("servers_us_per_op")
print(f"  {r['target']:<8} {r['workload']:<15} c={r['clients']:<4} {r['throughput']:>10.1f} {r['unit']:<9}"
      f" p99 {p99 if p99 is not None else '-'} ms, errors {r['error_count']},"
      f" server CPU {f'{cpu:.0f}' if cpu is not None else '-'} us/op")
PY
}

for w in $WORKLOADS; do
  for c in $CLIENTS; do
    for r in $(seq 1 "$ROUNDS"); do
      if [ $((r % 2)) = 1 ]; then order="concord etcd"; else order="etcd concord"; fi
      for sys in $order; do run_one "$sys" "$w" "$c" "$r"; done
    done
  done
done

python3 - "$OUT" <<'PY' | tee "$OUT/table.md"
import glob, json, os, re, statistics, sys
out = sys.argv[1]
runs = {}
for f in sorted(glob.glob(os.path.join(out, "*.json"))):
    m = re.match(r"(.+)-c(\d+)-(concord|etcd)-r(\d+)\.json$", os.path.basename(f))
    if not m:
        continue
    try:
        r = json.load(open(f))
    except Exception:
        continue
    runs.setdefault((m.group(1), int(m.group(2))), {}).setdefault(m.group(3), []).append(r)

def mean(rs, key):
    vals = [r[key] for r in rs if r.get(key) is not None]
    return statistics.mean(vals) if vals else None

def cpu_mean(rs, key):
    vals = [r["cpu"][key] for r in rs if r.get("cpu") and r["cpu"].get(key) is not None]
    return statistics.mean(vals) if vals else None

def fmt(v, d=1):
    return "-" if v is None else f"{v:.{d}f}"

def ratio(a, b):
    return "-" if a is None or b in (None, 0) else f"{a / b:.2f}"

order = ["put", "get", "get-stale", "lock", "lock-contended", "lease"]
print("| workload | clients | Concord /s | etcd /s | ratio | Concord p99 ms | etcd p99 ms | p99 ratio | entries/fsync | errors C/e | server CPU us/op C/e | CPU ratio e/C | generator us/op C/e |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for (w, c) in sorted(runs, key=lambda k: (order.index(k[0]) if k[0] in order else 99, k[1])):
    cr, er = runs[(w, c)].get("concord", []), runs[(w, c)].get("etcd", [])
    ct, et = mean(cr, "throughput"), mean(er, "throughput")
    cp, ep = mean(cr, "p99_ms"), mean(er, "p99_ms")
    epf = [r["fsync"]["entries_per_fsync"] for r in cr if r.get("fsync") and r["fsync"].get("entries_per_fsync")]
    cerr = sum(r.get("error_count", 0) for r in cr)
    eerr = sum(r.get("error_count", 0) for r in er)
    cs, es = cpu_mean(cr, "servers_us_per_op"), cpu_mean(er, "servers_us_per_op")
    cg, eg = cpu_mean(cr, "client_us_per_op"), cpu_mean(er, "client_us_per_op")
    print(f"| {w} | {c} | {fmt(ct)} | {fmt(et)} | {ratio(ct, et)} | {fmt(cp, 2)} | {fmt(ep, 2)} | "
          f"{ratio(cp, ep)} | {fmt(statistics.mean(epf) if epf else None, 1)} | {cerr}/{eerr} | "
          f"{fmt(cs, 0)}/{fmt(es, 0)} | {ratio(es, cs)} | {fmt(cg, 0)}/{fmt(eg, 0)} |")
PY
echo "reports: $OUT"
