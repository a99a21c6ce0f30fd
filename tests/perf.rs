//! `concord perf` (the real binary, which starts, kills and restarts its own 3-node cluster):
//! every scenario runs small and must report real outcomes. No timing goals here (those are
//! in docs/benchmarks.md); what is asserted is what must hold however slow the machine is.

use serde_json::Value;

fn perf(args: &[&str]) -> Value {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_concord"))
        .arg("--json")
        .arg("perf")
        .args(args)
        .arg("--out")
        .arg(dir.path().join("perf"))
        .output()
        .expect("run concord perf");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "concord perf {args:?} failed:\n{stdout}\n{stderr}"
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("bad report ({e}): {stdout}\nstderr: {stderr}"))
}

fn trials(d: &Value) -> Vec<f64> {
    d["trials"]
        .as_array()
        .expect("trials")
        .iter()
        .map(|t| t.as_f64().expect("a number"))
        .collect()
}

#[test]
fn failover_finds_a_write_after_every_kill() {
    let r = perf(&["--scenario", "failover", "--trials", "2", "--clients", "4"]);
    assert_eq!(r["failed_trials"], 0, "{r}");
    let first = trials(&r["first_write_ms"]);
    assert_eq!(first.len(), 2, "{r}");
    // A write sent after the kill cannot succeed before the survivors elect a new leader: the
    // old one is dead, and no follower takes writes.
    let elected = trials(&r["new_leader_ms"]);
    assert_eq!(elected.len(), 2, "{r}");
    for t in first.iter().chain(&elected) {
        assert!(*t > 0.0, "{r}");
    }
    let (min, max) = (
        r["first_write_ms"]["min"].as_f64(),
        r["first_write_ms"]["max"].as_f64(),
    );
    assert!(min <= max, "{r}");
}

#[test]
fn handoff_never_grants_inside_the_holders_window() {
    let r = perf(&["--scenario", "handoff", "--trials", "3", "--ttl", "1s"]);
    assert_eq!(r["ttl_ms"], 1000, "{r}");
    assert_eq!(r["early_grants"], 0, "{r}");
    let late = trials(&r["after_expiry_ms"]);
    let since_renewal = trials(&r["after_renewal_ms"]);
    assert_eq!(late.len(), 3, "{r}");
    for (l, s) in late.iter().zip(&since_renewal) {
        assert!(*l >= 0.0, "granted before renewal + TTL: {r}");
        assert!(
            (s - l - 1000.0).abs() < 1.0,
            "the two measures differ by the TTL: {r}"
        );
    }
}

#[test]
fn resources_reports_memory_and_a_restart_that_keeps_everything() {
    let r = perf(&[
        "--scenario",
        "resources",
        "--keys",
        "600",
        "--leases",
        "40",
        "--locks",
        "70",
    ]);
    assert_eq!(
        (
            r["keys"].as_u64(),
            r["leases"].as_u64(),
            r["locks"].as_u64()
        ),
        (Some(600), Some(40), Some(70))
    );
    // 600 puts + 40 grants + 70 acquires, each one log entry, plus the cluster's own entries.
    assert!(r["applied_index"].as_u64().unwrap() >= 710, "{r}");
    let nodes = r["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 3, "{r}");
    for n in nodes {
        assert!(n["rss_mb"].as_f64().unwrap() > 1.0, "{r}");
        assert!(
            n["peak_rss_mb"].as_f64().unwrap() >= n["rss_mb"].as_f64().unwrap(),
            "{r}"
        );
        assert!(n["data_mb"].as_f64().unwrap() > 0.0, "{r}");
    }
    // The restarted follower serves everything it had from its own disk.
    assert_eq!(r["restarted_leases"], 40, "{r}");
    assert_eq!(r["restarted_sample_ok"], true, "{r}");
    let health = r["restart_health_ms"].as_f64().unwrap();
    let ready = r["restart_ready_ms"].as_f64().unwrap();
    assert!(health > 0.0 && ready >= health, "{r}");
    assert!(r["restarted_rss_mb"].as_f64().unwrap() > 1.0, "{r}");
    assert!(r["restarted_settled_rss_mb"].as_f64().unwrap() > 1.0, "{r}");
}
