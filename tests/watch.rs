//! Watches: the stream a follower serves matches the sequence of applied changes exactly (no
//! gap, no duplicate, revision order) across a leader kill, and a reconnect to another node
//! with `from_revision` continues where the first stream stopped.

mod common;

use std::time::Duration;

use common::TestCluster;
use concord::client::{Client, Watch};
use serde_json::json;

/// Read `change` events until one at `until` revision (or later) arrives; returns
/// (revision, key, value) of each, and checks progress events never run ahead of changes.
async fn read_until(w: &mut Watch, until: u64, out: &mut Vec<(u64, String, String)>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ev = tokio::time::timeout_at(deadline, w.next())
            .await
            .expect("watch stalled")
            .expect("watch broke")
            .expect("watch ended");
        match ev.event.as_str() {
            "change" => {
                let d = &ev.data;
                assert_eq!(d["type"], "kv");
                assert_eq!(d["action"], "put");
                let rev = d["revision"].as_u64().unwrap();
                out.push((
                    rev,
                    d["name"].as_str().unwrap().to_string(),
                    d["detail"]["value"].as_str().unwrap().to_string(),
                ));
                if rev >= until {
                    return;
                }
            }
            "progress" => {
                let r = ev.data["revision"].as_u64().unwrap();
                if r >= until {
                    return;
                }
            }
            other => panic!("unexpected event {other}: {:?}", ev.data),
        }
    }
}

async fn put(cl: &Client, k: &str, v: &str) -> u64 {
    let r = cl.kv_put(k, json!({"value": v})).await.unwrap();
    r["revision"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_sees_every_change_in_order_across_a_leader_kill_and_a_resume() {
    let mut c = TestCluster::start(3).await;
    let leader = c.wait_leader().await;
    let ids = [1u64, 2, 3];
    let follower = *ids.iter().find(|i| **i != leader).unwrap();
    let other = *ids
        .iter()
        .find(|i| **i != leader && **i != follower)
        .unwrap();
    let cl = c.client_all();
    // Noise the filter must drop: another prefix and another type.
    put(&cl, "other/x", "0").await;
    let lease = cl.lease_grant(60_000, None).await.unwrap();
    let mut want = Vec::new();
    let first = put(&cl, "w/0", "v0").await;
    want.push((first, "w/0".to_string(), "v0".to_string()));
    // Start from the first put's revision: it is served from the follower's history.
    c.wait_applied(follower, first).await;
    let fc = c.client(follower);
    let mut w = fc
        .watch(0, &format!("prefix=w/&types=kv&from_revision={first}"))
        .await
        .unwrap();
    for i in 1..10 {
        let k = format!("w/{i}");
        let v = format!("v{i}");
        want.push((put(&cl, &k, &v).await, k, v));
        put(&cl, &format!("other/{i}"), "noise").await;
    }
    cl.lock_acquire("w/lock", lease, 0).await.unwrap();

    c.kill(leader).await;
    let new_leader = c.wait_leader().await;
    assert_ne!(new_leader, leader);
    let cl = c.client_all();
    for i in 10..20 {
        let k = format!("w/{i}");
        let v = format!("v{i}");
        want.push((put(&cl, &k, &v).await, k, v));
    }
    // Read half of it from the follower, then drop the stream.
    let mut got = Vec::new();
    read_until(&mut w, want[12].0, &mut got).await;
    drop(w);
    let last_seen = got.last().unwrap().0;
    // Resume on the other live node.
    for i in 20..25 {
        let k = format!("w/{i}");
        let v = format!("v{i}");
        want.push((put(&cl, &k, &v).await, k, v));
    }
    let oc = c.client(other);
    let mut w2 = oc
        .watch(
            0,
            &format!("prefix=w/&types=kv&from_revision={}", last_seen + 1),
        )
        .await
        .unwrap();
    read_until(&mut w2, want.last().unwrap().0, &mut got).await;
    assert_eq!(
        got, want,
        "the watched changes are exactly the applied puts"
    );

    // Bad input is a clear error.
    let err = oc.watch(0, "types=nope").await.err().unwrap();
    assert_eq!(err.code(), "invalid_argument");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_quiet_watch_gets_progress_and_sees_lock_hand_offs() {
    let c = TestCluster::start(1).await;
    c.wait_leader().await;
    let cl = c.client_all();
    let a = cl.lease_grant(60_000, None).await.unwrap();
    let b = cl.lease_grant(60_000, None).await.unwrap();
    let mut w = cl.watch(0, "types=lock&progress_ms=200").await.unwrap();
    let first = w.next().await.unwrap().unwrap();
    assert_eq!(first.event, "progress");
    let start = first.data["revision"].as_u64().unwrap();
    // Quiet: another progress arrives with no change in between.
    let second = w.next().await.unwrap().unwrap();
    assert_eq!(second.event, "progress");
    assert_eq!(second.data["revision"].as_u64().unwrap(), start);

    let ta = cl.lock_acquire("L", a, 0).await.unwrap();
    let cl2 = c.client_all();
    let wb = tokio::spawn(async move { cl2.lock_acquire("L", b, 10_000).await });
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let ev = w.next().await.unwrap().unwrap();
        if ev.event == "change" {
            seen.push((
                ev.data["action"].clone(),
                ev.data["detail"]["lease_id"].clone(),
            ));
        }
    }
    assert_eq!(
        seen,
        vec![(json!("granted"), json!(a)), (json!("queued"), json!(b))]
    );
    cl.lock_release("L", a).await.unwrap();
    let tb = wb.await.unwrap().unwrap();
    assert!(tb > ta);
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let ev = w.next().await.unwrap().unwrap();
        if ev.event == "change" {
            seen.push((
                ev.data["action"].clone(),
                ev.data["detail"]["lease_id"].clone(),
                ev.data["revision"].clone(),
            ));
        }
    }
    assert_eq!(
        seen,
        vec![
            (json!("released"), json!(a), json!(tb)),
            (json!("granted"), json!(b), json!(tb)),
        ]
    );
    c.shutdown().await;
}
