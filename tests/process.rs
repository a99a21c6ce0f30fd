//! Real `concord serve` processes: kill -9 the leader and check that nothing acknowledged is
//! lost and the token sequence continues; the killed node restarts and catches up.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use concord::client::Client;
use serde_json::json;
use tempfile::TempDir;

struct Proc {
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn(id: u64, addrs: &BTreeMap<u64, String>, dir: &TempDir) -> Proc {
    let initial: Vec<String> = addrs.iter().map(|(i, a)| format!("{i}={a}")).collect();
    let log = std::fs::File::create(dir.path().join(format!("node{id}.log"))).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_concord"))
        .arg("serve")
        .args(["--id", &id.to_string()])
        .args(["--listen", &addrs[&id]])
        .args([
            "--data-dir",
            dir.path().join(format!("node{id}")).to_str().unwrap(),
        ])
        .args(["--initial-cluster", &initial.join(",")])
        .args(["--heartbeat-ms", "100", "--election-ms", "600"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn concord");
    Proc { child }
}

/// Wait for a leader other than `not` (the survivors keep naming a killed leader until
/// their election timeout fires).
async fn leader_of(client: &Client, not: Option<u64>) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(v) = client.cluster().await {
            if let Some(l) = v["leader"].as_u64().filter(|l| Some(*l) != not) {
                return l;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_the_leader_of_a_process_cluster() {
    let dir = TempDir::new().unwrap();
    let addrs: BTreeMap<u64, String> = (1..=3)
        .map(|id| (id, format!("127.0.0.1:{}", free_port())))
        .collect();
    let mut procs: BTreeMap<u64, Proc> = addrs
        .keys()
        .map(|id| (*id, spawn(*id, &addrs, &dir)))
        .collect();
    let all: Vec<String> = addrs.values().cloned().collect();
    let client = Client::new(&all);
    let leader = leader_of(&client, None).await;

    let lease = client.lease_grant(60_000, Some("proc-test")).await.unwrap();
    let token1 = client.lock_acquire("p-lock", lease, 0).await.unwrap();
    for i in 0..10 {
        client
            .kv_put(&format!("p{i}"), json!({"value": i.to_string()}))
            .await
            .unwrap();
    }

    // kill -9 the leader.
    drop(procs.remove(&leader));
    let survivors: Vec<String> = addrs
        .iter()
        .filter(|(id, _)| **id != leader)
        .map(|(_, a)| a.clone())
        .collect();
    let client = Client::new(&survivors);
    let new_leader = leader_of(&client, Some(leader)).await;
    assert_ne!(new_leader, leader);
    for i in 0..10 {
        let v = client.kv_get(&format!("p{i}"), false).await.unwrap();
        assert_eq!(v["value"], i.to_string());
    }
    let lock = client.lock_status("p-lock").await.unwrap();
    assert_eq!(lock["holder"]["token"], token1);
    client.lock_release("p-lock", lease).await.unwrap();
    let token2 = client.lock_acquire("p-lock", lease, 0).await.unwrap();
    assert!(token2 > token1);
    client
        .kv_put("after", json!({"value": "failover"}))
        .await
        .unwrap();

    // The killed node restarts from its data and catches up.
    procs.insert(leader, spawn(leader, &addrs, &dir));
    let restarted = Client::new(&[addrs[&leader].clone()]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(v) = restarted.kv_get("after", true).await {
            assert_eq!(v["value"], "failover");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "restarted node never caught up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_run_holds_the_lock_passes_the_token_and_stops_on_lease_loss() {
    let dir = TempDir::new().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let addrs = BTreeMap::from([(1, addr.clone())]);
    let _node = spawn(1, &addrs, &dir);
    let client = Client::new(std::slice::from_ref(&addr));
    leader_of(&client, None).await;
    let bin = env!("CARGO_BIN_EXE_concord");

    // The command sees its token in CONCORD_FENCE while the lock is held by its lease.
    let out = dir.path().join("fence.txt");
    let script = format!(
        "echo $CONCORD_FENCE > {0}; {bin} --endpoints {addr} lock status jobs --json >> {0}",
        out.display()
    );
    let status = tokio::process::Command::new(bin)
        .args([
            "--endpoints",
            &addr,
            "lock",
            "run",
            "jobs",
            "--ttl-ms",
            "3000",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .status()
        .await
        .unwrap();
    assert!(status.success(), "lock run failed: {status:?}");
    let text = std::fs::read_to_string(&out).unwrap();
    let mut lines = text.lines();
    let token: u64 = lines.next().unwrap().trim().parse().unwrap();
    let during: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(
        during["holder"]["token"], token,
        "the lock was held with that token"
    );
    // Released afterwards.
    let after = client.lock_status("jobs").await.unwrap();
    assert_eq!(after["holder"], serde_json::Value::Null);

    // If the lease is lost, the command is stopped and lock run exits 75.
    let script = format!("{bin} --endpoints {addr} lease revoke $CONCORD_LEASE; sleep 30");
    let started = std::time::Instant::now();
    let status = tokio::process::Command::new(bin)
        .args([
            "--endpoints",
            &addr,
            "lock",
            "run",
            "jobs",
            "--ttl-ms",
            "3000",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .status()
        .await
        .unwrap();
    assert_eq!(status.code(), Some(75));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the command was not stopped"
    );
}
