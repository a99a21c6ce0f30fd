//! Read-write locks, condition variables, deadlock refusal, deadlock victim policies and
//! /v1/conflicts over a 3-node cluster, including a leader kill while a writer waits behind
//! readers.

mod common;

use std::time::Duration;

use common::TestCluster;
use concord::client::{Client, ClientError};

async fn wait_for<F: Fn(&serde_json::Value) -> bool>(
    cl: &Client,
    path: &str,
    f: F,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(v) = cl.get(path).await {
            if f(&v) {
                return v;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} never matched"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn code(r: Result<u64, ClientError>) -> String {
    r.unwrap_err().code().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readers_share_a_writer_waits_through_a_leader_kill_and_is_served_first() {
    let mut c = TestCluster::start(3).await;
    let leader = c.wait_leader().await;
    let cl = c.client_all();
    let r1 = cl.lease_grant(60_000, None).await.unwrap();
    let r2 = cl.lease_grant(60_000, None).await.unwrap();
    let w = cl.lease_grant(60_000, None).await.unwrap();
    let r3 = cl.lease_grant(60_000, None).await.unwrap();
    let t1 = cl.lock_acquire_mode("doc", r1, 0, "shared").await.unwrap();
    let t2 = cl.lock_acquire_mode("doc", r2, 0, "shared").await.unwrap();
    assert!(t2 > t1);
    assert_eq!(code(cl.lock_acquire("doc", w, 0).await), "lock_held");
    let cw = c.client_all();
    let writer = tokio::spawn(async move { cw.lock_acquire("doc", w, 30_000).await });
    wait_for(&cl, "/v1/locks/doc", |v| {
        v["queue"].as_array().is_some_and(|q| q.len() == 1)
    })
    .await;
    // A reader arriving after the waiting writer may not pass it.
    assert_eq!(
        code(cl.lock_acquire_mode("doc", r3, 0, "shared").await),
        "lock_held"
    );
    let cr = c.client_all();
    let reader3 =
        tokio::spawn(async move { cr.lock_acquire_mode("doc", r3, 30_000, "shared").await });
    let st = wait_for(&cl, "/v1/locks/doc", |v| {
        v["queue"].as_array().is_some_and(|q| q.len() == 2)
    })
    .await;
    assert_eq!(st["mode"], "shared");
    assert_eq!(st["queue"][0]["mode"], "exclusive");
    assert_eq!(st["queue"][1]["mode"], "shared");
    // A mode change is refused.
    assert_eq!(code(cl.lock_acquire("doc", r1, 0).await), "conflict");

    c.kill(leader).await;
    assert_ne!(c.wait_leader().await, leader);
    let cl = c.client_all();
    cl.lock_release("doc", r1).await.unwrap();
    assert!(!writer.is_finished());
    cl.lock_release("doc", r2).await.unwrap();
    let tw = writer.await.unwrap().unwrap();
    assert!(tw > t2);
    assert!(!reader3.is_finished());
    let fence = cl
        .call(
            reqwest::Method::POST,
            "/v1/fence/check",
            Some(serde_json::json!({"lock": "doc", "token": tw})),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(
        (fence["valid"].clone(), fence["mode"].clone()),
        (true.into(), "exclusive".into())
    );
    cl.lock_release("doc", w).await.unwrap();
    let t3 = reader3.await.unwrap().unwrap();
    assert!(t3 > tw);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wait_that_would_deadlock_is_refused_with_the_cycle_and_conflicts_show_it() {
    let c = TestCluster::start(3).await;
    c.wait_leader().await;
    let cl = c.client_all();
    let a = cl.lease_grant(60_000, Some("agent-a")).await.unwrap();
    let b = cl.lease_grant(60_000, Some("agent-b")).await.unwrap();
    cl.lock_acquire("x", a, 0).await.unwrap();
    cl.lock_acquire("y", b, 0).await.unwrap();
    let ca = c.client_all();
    let a_waits = tokio::spawn(async move { ca.lock_acquire("y", a, 30_000).await });
    wait_for(&cl, "/v1/conflicts", |v| {
        v["wait_for"].as_array().is_some_and(|e| e.len() == 1)
    })
    .await;
    let err = cl.lock_acquire("x", b, 30_000).await.unwrap_err();
    assert_eq!(err.code(), "deadlock");
    let ClientError::Api { status, body, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(*status, 409);
    let cycle: Vec<(u64, u64, String)> = body["error"]["cycle"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["lease_id"].as_u64().unwrap(),
                e["waits_for"].as_u64().unwrap(),
                e["resource"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        cycle,
        vec![(b, a, "lock:x".into()), (a, b, "lock:y".into())]
    );
    let v = cl.get("/v1/conflicts").await.unwrap();
    assert_eq!(v["resources"][0]["resource"], "lock:y");
    assert_eq!(v["resources"][0]["waiters"][0]["owner"], "agent-a");
    assert_eq!(v["deadlocks"][0]["victim"], b);
    // Nothing was queued for b: x has no waiters.
    let x = cl.get("/v1/locks/x").await.unwrap();
    assert_eq!(x["queue"].as_array().unwrap().len(), 0);
    // b gives up y: a gets it.
    cl.lock_release("y", b).await.unwrap();
    assert!(a_waits.await.unwrap().is_ok());
    c.shutdown().await;
}

fn cycle_of(body: &serde_json::Value) -> Vec<(u64, u64, String)> {
    body["cycle"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["lease_id"].as_u64().unwrap(),
                e["waits_for"].as_u64().unwrap(),
                e["resource"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_youngest_the_blocked_victim_gets_409_deadlock_and_the_requester_proceeds() {
    let c = TestCluster::start(3).await;
    c.wait_leader().await;
    let cl = c.client_all();
    // The policy: refuse by default, a bad name is 400 and changes nothing, set through any
    // node (forwarded to the leader), shown by /v1/conflicts.
    assert_eq!(cl.deadlock_policy().await.unwrap()["policy"], "refuse");
    let e = cl.set_deadlock_policy("oldest").await.unwrap_err();
    assert_eq!(e.code(), "invalid_argument");
    let ClientError::Api { status, .. } = &e else {
        panic!("{e:?}")
    };
    assert_eq!(*status, 400);
    assert_eq!(cl.deadlock_policy().await.unwrap()["policy"], "refuse");
    let v = cl.set_deadlock_policy("youngest").await.unwrap();
    assert_eq!(
        (v["policy"].as_str(), v["previous"].as_str()),
        (Some("youngest"), Some("refuse"))
    );
    assert_eq!(
        cl.get("/v1/conflicts").await.unwrap()["deadlock_policy"],
        "youngest"
    );

    let a = cl.lease_grant(60_000, Some("agent-a")).await.unwrap();
    let b = cl.lease_grant(60_000, Some("agent-b")).await.unwrap();
    assert!(b > a);
    cl.lock_acquire("x", a, 0).await.unwrap();
    cl.lock_acquire("y", b, 0).await.unwrap();
    // b (the younger) blocks waiting for x.
    let cb = c.client_all();
    let b_waits = tokio::spawn(async move { cb.lock_acquire("x", b, 30_000).await });
    wait_for(&cl, "/v1/conflicts", |v| {
        v["wait_for"].as_array().is_some_and(|e| e.len() == 1)
    })
    .await;
    // a waiting for y closes the cycle: b loses its wait, a stays queued.
    let ca = c.client_all();
    let a_waits = tokio::spawn(async move { ca.lock_acquire("y", a, 30_000).await });
    let err = b_waits.await.unwrap().unwrap_err();
    assert_eq!(err.code(), "deadlock");
    let ClientError::Api { status, body, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(*status, 409);
    let e = &body["error"];
    assert_eq!(
        cycle_of(e),
        vec![(b, a, "lock:x".into()), (a, b, "lock:y".into())]
    );
    assert_eq!(
        (e["policy"].as_str(), e["requester"].as_u64()),
        (Some("youngest"), Some(a))
    );
    let v = wait_for(&cl, "/v1/locks/y", |v| {
        v["queue"].as_array().is_some_and(|q| q.len() == 1)
    })
    .await;
    assert_eq!(v["queue"][0]["lease_id"], a);
    let x = cl.get("/v1/locks/x").await.unwrap();
    assert_eq!(x["queue"].as_array().unwrap().len(), 0);
    let v = cl.get("/v1/conflicts").await.unwrap();
    let d = &v["deadlocks"][0];
    assert_eq!(
        (d["victim"].as_u64(), d["requester"].as_u64()),
        (Some(b), Some(a))
    );
    assert_eq!(
        (d["resource"].as_str(), d["policy"].as_str()),
        (Some("lock:x"), Some("youngest"))
    );
    // b gives up y: a, the requester, gets it.
    assert!(!a_waits.is_finished());
    cl.lock_release("y", b).await.unwrap();
    assert!(a_waits.await.unwrap().is_ok());
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_condition_wait_releases_the_lock_and_returns_holding_it_again() {
    let c = TestCluster::start(3).await;
    c.wait_leader().await;
    let cl = c.client_all();
    let consumer = cl.lease_grant(60_000, None).await.unwrap();
    let producer = cl.lease_grant(60_000, None).await.unwrap();
    let t0 = cl.lock_acquire("m", consumer, 0).await.unwrap();
    // Waiting without the lock is refused.
    let e = cl
        .cond_wait("ready", producer, "m", 1_000)
        .await
        .unwrap_err();
    assert_eq!(e.code(), "conflict");
    let cc = c.client_all();
    let waiting = tokio::spawn(async move { cc.cond_wait("ready", consumer, "m", 30_000).await });
    // The producer can take the lock once the consumer parks.
    let tp = cl.lock_acquire("m", producer, 10_000).await.unwrap();
    assert!(tp > t0);
    let st = cl.get("/v1/conditions/ready").await.unwrap();
    assert_eq!(st["waiters"][0]["lease_id"], consumer);
    let n = cl.cond_notify("ready", false).await.unwrap();
    assert_eq!(n["woken"], serde_json::json!([consumer]));
    // Woken, the consumer queues for the lock the producer still holds.
    assert!(!waiting.is_finished());
    cl.lock_release("m", producer).await.unwrap();
    let v = waiting.await.unwrap().unwrap();
    assert_eq!(v["released_token"], t0);
    assert!(v["token"].as_u64().unwrap() > tp);
    let lock = cl.get("/v1/locks/m").await.unwrap();
    assert_eq!(lock["holder"]["lease_id"], consumer);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_parked_condition_waiter_survives_a_leader_kill_and_wakes_on_the_new_leader() {
    let mut c = TestCluster::start(3).await;
    let leader = c.wait_leader().await;
    let cl = c.client_all();
    let consumer = cl.lease_grant(60_000, None).await.unwrap();
    let t0 = cl.lock_acquire("m", consumer, 0).await.unwrap();
    let cc = c.client_all();
    let waiting = tokio::spawn(async move { cc.cond_wait("ready", consumer, "m", 30_000).await });
    wait_for(&cl, "/v1/conditions/ready", |v| {
        v["waiters"].as_array().is_some_and(|w| w.len() == 1)
    })
    .await;
    c.kill(leader).await;
    assert_ne!(c.wait_leader().await, leader);
    let cl = c.client_all();
    // Still parked on the new leader, and the lock is free.
    let st = cl.get("/v1/conditions/ready").await.unwrap();
    assert_eq!(st["waiters"][0]["lease_id"], consumer);
    let n = cl.cond_notify("ready", false).await.unwrap();
    assert_eq!(n["woken"], serde_json::json!([consumer]));
    // The blocked call (its connection may have died with the old leader; the client retries
    // with the same request_id and resumes) returns holding the lock again.
    let v = waiting.await.unwrap().unwrap();
    assert!(v["token"].as_u64().unwrap() > t0);
    let lock = cl.get("/v1/locks/m").await.unwrap();
    assert_eq!(lock["holder"]["lease_id"], consumer);
    c.shutdown().await;
}
