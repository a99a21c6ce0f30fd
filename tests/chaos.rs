//! The short chaos matrix run by CI: register and lock workloads under kill, pause and
//! partition nemeses against real `concord` processes; every history must check clean. And the
//! checker must catch a real bug: nodes started with the deliberately unsafe
//! `--unsafe-stale-reads` serve stale reads under a partition, and the run must fail.
//!
//! Also register and lock under real partitions
//! (`--net netns`: network namespaces, veth, iptables; needs root, which this machine's CI has).
//! Then the lease workload under kills and the mixed workload (every client kind) under pauses.
//!
//! Runs one after another (one test) so that two clusters never compete for the two cores.
//! `CONCORD_CHAOS_SECS` sets the length of each run (default 35).

use std::process::Command;

use tempfile::TempDir;

fn chaos(
    workload: &str,
    nemesis: &str,
    seed: u64,
    secs: u64,
    extra: &[&str],
    dir: &TempDir,
) -> (bool, String) {
    let out = dir.path().join(format!("{workload}-{nemesis}-{seed}"));
    let output = Command::new(env!("CARGO_BIN_EXE_concord"))
        .arg("chaos")
        .args(["--nodes", "3", "--workload", workload, "--nemesis", nemesis])
        .args([
            "--duration",
            &format!("{secs}s"),
            "--seed",
            &seed.to_string(),
        ])
        .arg("--out")
        .arg(&out)
        .args(extra)
        .output()
        .expect("run concord chaos");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    eprintln!("{stdout}");
    (output.status.success(), stdout)
}

#[test]
fn chaos_matrix_is_clean_and_the_checker_catches_unsafe_reads() {
    let secs: u64 = std::env::var("CONCORD_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(35);
    let dir = TempDir::new().unwrap();
    let mut runs: Vec<(&str, &str, &[&str])> = Vec::new();
    for workload in ["register", "lock"] {
        for nemesis in ["kill", "pause", "partition"] {
            runs.push((workload, nemesis, &[]));
        }
    }
    // Real network partitions: network namespaces, veth, iptables (CI here runs as root).
    runs.push(("register", "partition", &["--net", "netns"]));
    runs.push(("lock", "partition", &["--net", "netns"]));
    // Lease expiry while holding, across leader kills (each new leader's grace must never
    // shorten a lease); and every client kind at once (register, lock, semaphore, lease,
    // barrier: three clients each) under pauses.
    runs.push(("lease", "kill", &[]));
    runs.push(("mixed", "pause", &["--clients", "15"]));

    let mut failures = Vec::new();
    for (i, (workload, nemesis, extra)) in runs.into_iter().enumerate() {
        let seed = 101 + i as u64;
        let (ok, stdout) = chaos(workload, nemesis, seed, secs, extra, &dir);
        let what = format!("{workload}/{nemesis} {extra:?} seed {seed}");
        assert!(
            stdout.contains("faults injected:"),
            "no summary for {what}:\n{stdout}"
        );
        assert!(
            !stdout.contains("faults injected: 0"),
            "no fault injected in {what}"
        );
        if !ok {
            failures.push(what);
        }
    }
    assert!(
        failures.is_empty(),
        "chaos runs with violations: {failures:?}"
    );

    // The self-test: stale local reads must be flagged as not linearizable.
    let (ok, stdout) = chaos(
        "register",
        "partition",
        7,
        20,
        &["--unsafe-stale-reads"],
        &dir,
    );
    assert!(
        !ok,
        "the checker missed stale reads from --unsafe-stale-reads"
    );
    assert!(
        stdout.contains("[register]"),
        "expected a linearizability violation:\n{stdout}"
    );
}
