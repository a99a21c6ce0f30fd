//! Semaphores over a 3-node cluster: blocked acquires survive a leader kill, hand-off is in
//! queue order without barging, and permits in use never exceed the capacity.

mod common;

use std::time::Duration;

use common::TestCluster;

async fn wait_queue_len(cl: &concord::client::Client, name: &str, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(v) = cl.sem_status(name).await {
            if v["queue"].as_array().map_or(0, |q| q.len()) == n {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "queue of {name} never reached {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn semaphore_waiters_survive_a_leader_kill_and_are_served_in_order() {
    let mut c = TestCluster::start(3).await;
    let leader = c.wait_leader().await;
    let cl = c.client_all();
    let created = cl.sem_create("pool", 2).await.unwrap();
    assert_eq!(created["created"], true);
    assert_eq!(cl.sem_create("pool", 2).await.unwrap()["created"], false);
    assert_eq!(
        cl.sem_create("pool", 3).await.unwrap_err().code(),
        "conflict"
    );

    let mut leases = Vec::new();
    for _ in 0..4 {
        leases.push(cl.lease_grant(60_000, None).await.unwrap());
    }
    let (a, b, cc, d) = (leases[0], leases[1], leases[2], leases[3]);
    let ta = cl.sem_acquire("pool", a, 1, 0, 0).await.unwrap();
    let tb = cl.sem_acquire("pool", b, 1, 0, 0).await.unwrap();
    assert!(tb > ta);
    assert_eq!(
        cl.sem_acquire("pool", cc, 1, 0, 0)
            .await
            .unwrap_err()
            .code(),
        "lock_held"
    );
    assert_eq!(
        cl.sem_acquire("pool", cc, 3, 0, 0)
            .await
            .unwrap_err()
            .code(),
        "invalid_argument"
    );

    // c waits for one permit, then d for two, behind it.
    let c1 = c.client_all();
    let wc = tokio::spawn(async move { c1.sem_acquire("pool", cc, 1, 30_000, 0).await });
    wait_queue_len(&cl, "pool", 1).await;
    let c2 = c.client_all();
    let wd = tokio::spawn(async move { c2.sem_acquire("pool", d, 2, 30_000, 0).await });
    wait_queue_len(&cl, "pool", 2).await;

    // Kill the leader while both wait.
    c.kill(leader).await;
    let new_leader = c.wait_leader().await;
    assert_ne!(new_leader, leader);
    let cl = c.client_all();
    let st = cl.sem_status("pool").await.unwrap();
    assert_eq!(st["used"], 2);
    assert_eq!(st["queue"].as_array().unwrap().len(), 2);

    // One permit frees: c (first, needs 1) is served; d (needs 2) keeps waiting.
    let released = cl.sem_release("pool", a).await.unwrap();
    assert_eq!(released["granted"], serde_json::json!([cc]));
    let tc = wc.await.unwrap().unwrap();
    assert!(tc > tb);
    assert!(!wd.is_finished());
    let st = cl.sem_status("pool").await.unwrap();
    assert_eq!(
        (st["used"].as_u64(), st["free"].as_u64()),
        (Some(2), Some(0))
    );

    // Both remaining holders leave: d gets its two permits.
    cl.sem_release("pool", b).await.unwrap();
    cl.lease_revoke(cc).await.unwrap();
    let td = wd.await.unwrap().unwrap();
    assert!(td > tc);
    let st = cl.sem_status("pool").await.unwrap();
    assert_eq!(st["used"], 2);
    assert_eq!(st["holders"].as_array().unwrap().len(), 1);
    assert_eq!(st["holders"][0]["lease_id"], d);
    c.shutdown().await;
}
