//! Work queues over a 3-node cluster: the HTTP surface and its error codes, claim order, blocked
//! claimers that survive a Raft leader kill, items returned when a claimant's lease ends, and
//! concurrent workers through a leader kill: no item lost, none handed out twice.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::TestCluster;
use concord::client::Client;
use serde_json::{json, Value};

async fn wait_waiting(cl: &Client, name: &str, n: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(v) = cl.queue_status(name, 100).await {
            if v["waiting_count"].as_u64() == Some(n) {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "queue {name} never had {n} waiting claimers"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn id(v: &Value) -> u64 {
    v["id"].as_u64().unwrap()
}

/// A blocked claim's outcome: it answered, or (its node died) the client's retry resumed it.
async fn claimed_or_retry(
    r: Result<Value, concord::client::ClientError>,
    cl: &Client,
    name: &str,
    lease: u64,
) -> Value {
    match r {
        Ok(v) => v,
        Err(e) => {
            assert!(["unavailable", "no_leader"].contains(&e.code()), "{e}");
            cl.queue_claim(name, lease, 30_000).await.unwrap()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queue_api_order_and_error_codes() {
    let c = TestCluster::start(3).await;
    let leader = c.wait_leader().await;
    let cl = c.client_all();
    let a = cl.lease_grant(60_000, None).await.unwrap();
    let b = cl.lease_grant(60_000, None).await.unwrap();

    assert_eq!(
        cl.queue_claim("jobs", a, 0).await.unwrap_err().code(),
        "timeout"
    );
    let st = cl.queue_status("jobs", 10).await.unwrap();
    assert_eq!(
        (st["pending_count"].as_u64(), st["claimed_count"].as_u64()),
        (Some(0), Some(0))
    );

    let low = id(&cl.queue_push("jobs", "low", 0).await.unwrap());
    let high = id(&cl.queue_push("jobs", "high", 7).await.unwrap());
    let low2 = id(&cl.queue_push("jobs", "low2", 0).await.unwrap());
    assert!(low < high && high < low2);
    let st = cl.queue_status("jobs", 2).await.unwrap();
    let order: Vec<u64> = st["pending"].as_array().unwrap().iter().map(id).collect();
    assert_eq!(order, vec![high, low]);
    assert_eq!(
        (st["pending_count"].as_u64(), st["truncated"].as_bool()),
        (Some(3), Some(true))
    );

    let got = cl.queue_claim("jobs", a, 0).await.unwrap();
    assert_eq!(
        (id(&got), got["item"].as_str(), got["claims"].as_u64()),
        (high, Some("high"), Some(1))
    );
    assert_eq!(got["lease_id"], a);
    let got = cl.queue_claim("jobs", b, 0).await.unwrap();
    assert_eq!(id(&got), low);

    // Only the claimant settles an item.
    assert_eq!(
        cl.queue_ack("jobs", b, high).await.unwrap_err().code(),
        "conflict"
    );
    assert_eq!(
        cl.queue_nack("jobs", b, high).await.unwrap_err().code(),
        "conflict"
    );
    assert_eq!(
        cl.queue_ack("jobs", a, low2).await.unwrap_err().code(),
        "conflict"
    );
    assert_eq!(
        cl.queue_ack("jobs", a, 999_999).await.unwrap_err().code(),
        "not_found"
    );
    assert_eq!(
        cl.queue_ack("jobs", 999_999, high)
            .await
            .unwrap_err()
            .code(),
        "lease_not_found"
    );
    let st = cl.queue_status("jobs", 10).await.unwrap();
    assert_eq!(
        (st["pending_count"].as_u64(), st["claimed_count"].as_u64()),
        (Some(1), Some(2))
    );

    assert_eq!(cl.queue_ack("jobs", a, high).await.unwrap()["acked"], true);
    assert_eq!(
        cl.queue_ack("jobs", a, high).await.unwrap_err().code(),
        "not_found"
    );
    // b gives its item back: it returns ahead of low2 (its original place).
    let r = cl.queue_nack("jobs", b, low).await.unwrap();
    assert_eq!(
        (r["returned"].as_bool(), r["claimed_by"].as_u64()),
        (Some(true), None)
    );
    let st = cl.queue_status("jobs", 10).await.unwrap();
    let order: Vec<u64> = st["pending"].as_array().unwrap().iter().map(id).collect();
    assert_eq!(order, vec![low, low2]);
    assert_eq!(st["pending"][0]["claims"], 1);

    // Handler-level checks: nothing is proposed.
    let http = reqwest::Client::new();
    let url = |p: &str| format!("http://{}{p}", c.addrs[&leader]);
    let big = "x".repeat(concord::sm::MAX_ITEM_LEN + 1);
    let resp = http
        .post(url("/v1/queues/jobs"))
        .json(&json!({"item": big}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 413);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "payload_too_large");
    let resp = http
        .post(url("/v1/queues/jobs"))
        .json(&json!({"item": "x", "priority": 10}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let resp = http
        .post(url("/v1/queues/jobs/claim"))
        .json(&json!({"lease_id": a, "wait": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let resp = http
        .get(url("/v1/queues/jobs?limit=0"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    // `release` is the same as `nack`.
    let got = cl.queue_claim("jobs", a, 0).await.unwrap();
    assert_eq!(id(&got), low);
    let resp = http
        .post(url("/v1/queues/jobs/release"))
        .json(&json!({"lease_id": a, "id": low}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let st = cl.queue_status("jobs", 10).await.unwrap();
    assert_eq!(st["pending_count"], 2);
    assert_eq!(st["claimed_count"], 0);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blocked_claimers_survive_a_leader_kill_and_a_dead_claimants_item_moves_on() {
    let mut c = TestCluster::start(3).await;
    let raft_leader = c.wait_leader().await;
    let cl = c.client_all();
    let a = cl.lease_grant(60_000, None).await.unwrap();
    let b = cl.lease_grant(60_000, None).await.unwrap();
    let d = cl.lease_grant(60_000, None).await.unwrap();

    // a and b wait, in that order.
    let ca = c.client_all();
    let wa = tokio::spawn(async move { ca.queue_claim("work", a, 30_000).await });
    wait_waiting(&cl, "work", 1).await;
    let cb = c.client_all();
    let wb = tokio::spawn(async move { cb.queue_claim("work", b, 30_000).await });
    wait_waiting(&cl, "work", 2).await;

    c.kill(raft_leader).await;
    let new_leader = c.wait_leader().await;
    assert_ne!(new_leader, raft_leader);
    let cl = c.client_all();
    assert_eq!(
        cl.queue_status("work", 10).await.unwrap()["waiting_count"],
        2
    );

    // Each push goes to the first claimer in line, in the push's own step.
    let p1 = cl.queue_push("work", "one", 0).await.unwrap();
    assert_eq!(p1["claimed_by"], a);
    let p2 = cl.queue_push("work", "two", 0).await.unwrap();
    assert_eq!(p2["claimed_by"], b);
    let got_a = claimed_or_retry(wa.await.unwrap(), &cl, "work", a).await;
    let got_b = claimed_or_retry(wb.await.unwrap(), &cl, "work", b).await;
    assert_eq!((id(&got_a), got_a["item"].as_str()), (id(&p1), Some("one")));
    assert_eq!((id(&got_b), got_b["item"].as_str()), (id(&p2), Some("two")));

    // d waits; a dies before acking: its item goes back and on to d in that step.
    let cd = c.client_all();
    let wd = tokio::spawn(async move { cd.queue_claim("work", d, 30_000).await });
    wait_waiting(&cl, "work", 1).await;
    cl.lease_revoke(a).await.unwrap();
    let got_d = claimed_or_retry(wd.await.unwrap(), &cl, "work", d).await;
    assert_eq!((id(&got_d), got_d["claims"].as_u64()), (id(&p1), Some(2)));
    assert_eq!(got_d["lease_id"], d);
    assert!(got_d["token"].as_u64().unwrap() > got_a["token"].as_u64().unwrap());

    cl.queue_ack("work", b, id(&p2)).await.unwrap();
    cl.queue_ack("work", d, id(&p1)).await.unwrap();
    let st = cl.queue_status("work", 10).await.unwrap();
    assert_eq!(
        (
            st["pending_count"].as_u64(),
            st["claimed_count"].as_u64(),
            st["waiting_count"].as_u64()
        ),
        (Some(0), Some(0), Some(0))
    );
    // Every replica agrees the queue is empty.
    let leader = c.wait_leader().await;
    let index = c.applied(leader);
    for n in c.nodes.keys() {
        c.wait_applied(*n, index).await;
        assert!(!c.nodes[n].node.sm.read().sm.queues.contains_key("work"));
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_workers_through_a_leader_kill_ack_every_item_exactly_once() {
    let mut c = TestCluster::start(3).await;
    let raft_leader = c.wait_leader().await;
    let cl = c.client_all();
    const ITEMS: usize = 40;
    const WORKERS: usize = 4;
    let mut pushed = BTreeSet::new();
    for i in 0..ITEMS / 2 {
        pushed.insert(id(&cl
            .queue_push("batch", &format!("item-{i}"), (i % 3) as u64)
            .await
            .unwrap()));
    }
    // Workers claim and ack until every item is acked; an empty wait just goes round again.
    let total = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let w = c.client_all();
        let lease = w.lease_grant(60_000, None).await.unwrap();
        let total = total.clone();
        workers.push(tokio::spawn(async move {
            let mut done = Vec::new();
            while total.load(Ordering::SeqCst) < ITEMS {
                match w.queue_claim("batch", lease, 1_000).await {
                    Ok(v) => {
                        w.queue_ack("batch", lease, id(&v)).await.unwrap();
                        done.push(id(&v));
                        total.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) if e.code() == "timeout" => {}
                    Err(e) => panic!("claim failed: {e}"),
                }
            }
            done
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.kill(raft_leader).await;
    c.wait_leader().await;
    let cl = c.client_all();
    for i in ITEMS / 2..ITEMS {
        pushed.insert(id(&cl
            .queue_push("batch", &format!("item-{i}"), 0)
            .await
            .unwrap()));
    }
    let mut acked = Vec::new();
    for w in workers {
        acked.extend(w.await.unwrap());
    }
    let unique: BTreeSet<u64> = acked.iter().copied().collect();
    assert_eq!(
        unique.len(),
        acked.len(),
        "an item was handed out twice: {acked:?}"
    );
    assert_eq!(unique, pushed, "items lost");
    let st = cl.queue_status("batch", 10).await.unwrap();
    assert_eq!(
        (st["pending_count"].as_u64(), st["claimed_count"].as_u64()),
        (Some(0), Some(0))
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claimer_cut_off_by_a_leader_kill_retries_and_gets_the_item_handed_meanwhile() {
    let mut c = TestCluster::start(3).await;
    let raft_leader = c.wait_leader().await;
    let cl = c.client_all();
    let a = cl.lease_grant(60_000, None).await.unwrap();
    let b = cl.lease_grant(60_000, None).await.unwrap();

    // a waits through a raw call to the Raft leader itself: it dies with that node.
    let body = json!({"lease_id": a, "wait_ms": 60_000, "request_id": "claim-a-1"});
    let url = format!("http://{}/v1/queues/q/claim", c.addrs[&raft_leader]);
    let first = body.clone();
    let wa = tokio::spawn(async move {
        match reqwest::Client::new().post(url).json(&first).send().await {
            Ok(r) => Err(r.status().as_u16()),
            Err(_) => Ok(()),
        }
    });
    wait_waiting(&cl, "q", 1).await;
    let cb = c.client_all();
    let wb = tokio::spawn(async move { cb.queue_claim("q", b, 60_000).await });
    wait_waiting(&cl, "q", 2).await;

    c.kill(raft_leader).await;
    // a's call ends cleanly: the connection drops, or 503 (the node was stopping).
    match wa.await.unwrap() {
        Ok(()) => {}
        Err(status) => assert_eq!(status, 503),
    }
    c.wait_leader().await;
    let cl = c.client_all();
    // Items arrive while a is cut off: the first goes to a (first in line), the second to b.
    let p1 = cl.queue_push("q", "one", 0).await.unwrap();
    let p2 = cl.queue_push("q", "two", 0).await.unwrap();
    assert_eq!(
        (p1["claimed_by"].as_u64(), p2["claimed_by"].as_u64()),
        (Some(a), Some(b))
    );
    // a retries with the same request_id: it resumes its wait and gets the item handed to it.
    let got_a = cl
        .call(
            reqwest::Method::POST,
            "/v1/queues/q/claim",
            Some(body),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!((id(&got_a), got_a["item"].as_str()), (id(&p1), Some("one")));
    let got_b = claimed_or_retry(wb.await.unwrap(), &cl, "q", b).await;
    assert_eq!(id(&got_b), id(&p2));
    let st = cl.queue_status("q", 10).await.unwrap();
    assert_eq!(
        (
            st["pending_count"].as_u64(),
            st["claimed_count"].as_u64(),
            st["waiting_count"].as_u64()
        ),
        (Some(0), Some(2), Some(0))
    );
    c.shutdown().await;
}
