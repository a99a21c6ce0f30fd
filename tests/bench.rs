//! `concord bench` (the real binary) against in-process nodes: every workload runs for 2 s
//! with 4 clients and must report real outcomes: ops done, no errors, a consistent JSON report,
//! and a cluster left clean (client leases revoked, locks and permits free). No timing goals:
//! those belong in benchmarks, not tests.

mod common;

use common::TestCluster;
use serde_json::Value;

/// Run `concord --endpoints ENDPOINTS bench ARGS --json`; its exit status and report.
async fn bench(endpoints: &[String], args: &[&str]) -> (Option<i32>, Value) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_concord"))
        .args(["--endpoints", &endpoints.join(",")])
        .arg("bench")
        .args(args)
        .arg("--json")
        .output()
        .await
        .expect("run concord bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("bad report ({e}): {stdout}\nstderr: {stderr}"));
    (out.status.code(), report)
}

/// The checks every clean run must pass.
fn assert_clean(r: &Value, workload: &str) {
    assert_eq!(r["workload"], workload, "{r}");
    assert_eq!(r["target"], "concord", "{r}");
    assert_eq!(r["clients"], 4, "{r}");
    let ops = r["ops"].as_u64().unwrap_or(0);
    assert!(ops > 0, "{workload}: no ops: {r}");
    assert_eq!(r["error_count"], 0, "{workload}: errors: {r}");
    assert_eq!(
        r["errors"].as_object().map(|e| e.len()),
        Some(0),
        "{workload}: {r}"
    );
    let field = |name: &str| {
        r[name]
            .as_f64()
            .unwrap_or_else(|| panic!("{workload}: {name} missing: {r}"))
    };
    let (p50, p90, p99, max) = (
        field("p50_ms"),
        field("p90_ms"),
        field("p99_ms"),
        field("max_ms"),
    );
    assert!(
        0.0 < p50 && p50 <= p90 && p90 <= p99 && p99 <= max,
        "{workload}: percentiles out of order: {r}"
    );
    let mean = field("mean_ms");
    assert!(mean > 0.0 && mean <= max, "{workload}: {r}");
    let duration = field("duration_s");
    assert!(
        duration >= 2.0,
        "{workload}: window shorter than --duration: {r}"
    );
    let throughput = field("throughput");
    assert!(
        (throughput - ops as f64 / duration).abs() < 1e-6 * throughput.max(1.0),
        "{workload}: throughput is not ops / duration_s: {r}"
    );
    assert!(r["op"].is_string() && r["unit"].is_string(), "{r}");
}

const RUN: [&str; 8] = [
    "--clients",
    "4",
    "--warmup",
    "500ms",
    "--duration",
    "2s",
    "--keys",
    "100",
];

/// A GET on the node; the JSON answer.
async fn get(addr: &str, path: &str) -> Value {
    reqwest::get(format!("http://{addr}{path}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_workload_runs_clean_against_one_node() {
    let c = TestCluster::start(1).await;
    c.wait_leader().await;
    let addr = c.addrs[&1].clone();
    let endpoints = [addr.clone()];
    let workloads = [
        ("put", "ops/s"),
        ("get", "ops/s"),
        ("get-stale", "ops/s"),
        ("lock", "pairs/s"),
        ("lock-contended", "pairs/s"),
        ("semaphore", "pairs/s"),
        ("lease", "cycles/s"),
    ];
    for (workload, unit) in workloads {
        let mut args = vec!["--workload", workload];
        args.extend(RUN);
        let (status, r) = bench(&endpoints, &args).await;
        assert_eq!(status, Some(0), "{workload}: {r}");
        assert_clean(&r, workload);
        assert_eq!(r["unit"], unit, "{r}");
        assert_eq!(r["mode"], "closed", "{r}");
        assert_eq!(r["unsent"], Value::Null, "{r}");
        eprintln!("{workload}: {r}");
        // Every lease the run granted is gone, so every lock and permit is free again.
        let leases = get(&addr, "/v1/leases").await;
        assert_eq!(
            leases["leases"].as_array().map(|l| l.len()),
            Some(0),
            "{workload} left leases behind: {leases}"
        );
    }
    // The key space was written with --value-size bytes per value.
    let kvs = get(&addr, "/v1/kv?prefix=bench/&limit=10000").await;
    let kvs = kvs["kvs"].as_array().cloned().unwrap_or_default();
    assert!(!kvs.is_empty());
    for kv in &kvs {
        assert_eq!(kv["value"].as_str().map(str::len), Some(256), "{kv}");
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_leader_only_and_open_loop_on_three_nodes() {
    let c = TestCluster::start(3).await;
    let leader = c.wait_leader().await;
    let all: Vec<String> = c.addrs.values().cloned().collect();

    // Spread over all nodes: two of the three forward to the leader.
    let mut args = vec!["--workload", "put"];
    args.extend(RUN);
    let (status, r) = bench(&all, &args).await;
    assert_eq!(status, Some(0), "{r}");
    assert_clean(&r, "put");
    assert_eq!(r["endpoints"].as_array().map(|e| e.len()), Some(3), "{r}");
    // The leader's group commit over the window: every measured put is one log entry there
    // (the counters are sampled by a request of their own, so a few puts around the start of
    // the window may fall on either side), and every fsync covered at least one entry.
    let f = &r["fsync"];
    assert_eq!(f["leader"], format!("http://{}", c.addrs[&leader]), "{r}");
    let (fsyncs, entries) = (
        f["fsyncs"].as_u64().unwrap(),
        f["entries"].as_u64().unwrap(),
    );
    let ops = r["ops"].as_u64().unwrap();
    assert!(
        fsyncs > 0 && entries >= fsyncs && entries * 10 >= ops * 9,
        "{r}"
    );
    let per = f["entries_per_fsync"].as_f64().unwrap();
    assert!(
        (per - entries as f64 / fsyncs as f64).abs() < 1e-9 && per >= 1.0,
        "{r}"
    );

    // Leader only: found first, and the only endpoint used.
    let mut args = vec!["--workload", "get", "--leader-only"];
    args.extend(RUN);
    let (status, r) = bench(&all, &args).await;
    assert_eq!(status, Some(0), "{r}");
    assert_clean(&r, "get");
    assert_eq!(r["leader_only"], true);
    let want = format!("http://{}", c.addrs[&leader]);
    assert_eq!(r["endpoints"], serde_json::json!([want]), "{r}");

    // Open loop at 100 ops/s: measured ops never exceed the schedule of the window (2 s at
    // 100/s, plus at most one send per client from rounding).
    let mut args = vec!["--workload", "lock", "--rate", "100"];
    args.extend(RUN);
    let (status, r) = bench(&all, &args).await;
    assert_eq!(status, Some(0), "{r}");
    assert_clean(&r, "lock");
    assert_eq!(r["mode"], "open", "{r}");
    assert_eq!(r["rate"], 100.0, "{r}");
    let ops = r["ops"].as_u64().unwrap_or(0);
    let unsent = r["unsent"].as_u64().expect("open loop reports unsent");
    assert!(ops + unsent <= 200 + 4, "more sends than scheduled: {r}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn human_output_is_a_table_and_a_dead_endpoint_fails() {
    let c = TestCluster::start(1).await;
    c.wait_leader().await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_concord"))
        .args(["--endpoints", &c.addrs[&1], "bench", "--workload", "put"])
        .args(["--clients", "2", "--warmup", "0s", "--duration", "500ms"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for column in [
        "workload", "ops/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors",
    ] {
        assert!(text.contains(column), "no {column} column in:\n{text}");
    }
    c.shutdown().await;

    // Nothing listens on a port just freed: every op is a connect error, and the exit code
    // says the run did nothing.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let (status, r) = bench(
        &[dead],
        &[
            "--workload",
            "put",
            "--clients",
            "2",
            "--warmup",
            "0s",
            "--duration",
            "300ms",
        ],
    )
    .await;
    assert_eq!(status, Some(2), "{r}");
    assert_eq!(r["ops"], 0, "{r}");
    assert!(r["errors"]["connect"].as_u64().unwrap_or(0) > 0, "{r}");
    assert_eq!(r["p50_ms"], Value::Null, "{r}");
}
