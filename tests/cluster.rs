//! In-process 3-node cluster: forwarding, failover, restart recovery, snapshot to a new node,
//! pipelined replication streams.

mod common;

use openraft::async_runtime::WatchReceiver;
use std::time::Duration;

use common::TestCluster;
use serde_json::json;

fn follower_of(c: &TestCluster, leader: u64) -> u64 {
    *c.nodes.keys().find(|id| **id != leader).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_through_a_follower_survive_a_leader_kill() {
    let mut c = TestCluster::start(3).await;
    let leader = c.wait_leader().await;
    let follower = follower_of(&c, leader);
    let cl = c.client(follower);

    // Every write goes through a follower, which forwards it.
    let lease = cl.lease_grant(60_000, Some("agent-a")).await.unwrap();
    let put = cl.kv_put("config/a", json!({"value": "1"})).await.unwrap();
    assert_eq!(put["version"], 1);
    let bound = cl
        .kv_put("session/a", json!({"value": "alive", "lease_id": lease}))
        .await
        .unwrap();
    assert_eq!(bound["version"], 1);
    let token1 = cl.lock_acquire("job", lease, 0).await.unwrap();
    assert!(token1 > 0);
    let fenced = cl
        .kv_put(
            "guarded",
            json!({"value": "x", "fence": {"lock": "job", "token": token1}}),
        )
        .await
        .unwrap();
    assert_eq!(fenced["version"], 1);

    // A second agent queues behind the first.
    let lease_b = cl.lease_grant(60_000, Some("agent-b")).await.unwrap();
    let try_b = cl.lock_acquire("job", lease_b, 0).await.unwrap_err();
    assert_eq!(try_b.code(), "lock_held");

    c.kill(leader).await;
    let new_leader = c.wait_leader().await;
    assert_ne!(new_leader, leader);

    let cl = c.client_all();
    let v = cl.kv_get("config/a", false).await.unwrap();
    assert_eq!(v["value"], "1");
    let v = cl.kv_get("session/a", false).await.unwrap();
    assert_eq!(v["lease_id"], lease);
    let lock = cl.lock_status("job").await.unwrap();
    assert_eq!(lock["holder"]["lease_id"], lease);
    assert_eq!(lock["holder"]["token"], token1);
    let info = cl.lease_get(lease).await.unwrap();
    assert_eq!(info["locks"], json!(["job"]));

    // The token sequence continues past the failover.
    cl.lock_release("job", lease).await.unwrap();
    let token2 = cl.lock_acquire("job", lease_b, 0).await.unwrap();
    assert!(token2 > token1, "token {token2} must exceed {token1}");
    let stale = cl
        .kv_put(
            "guarded",
            json!({"value": "y", "fence": {"lock": "job", "token": token1}}),
        )
        .await
        .unwrap_err();
    assert_eq!(stale.code(), "fenced");
    let check = cl.fence_check("job", token1).await.unwrap();
    assert_eq!(check["valid"], false);
    assert_eq!(check["current_token"], token2);

    // Revoking the lease drops its keys.
    cl.lease_revoke(lease).await.unwrap();
    assert_eq!(
        cl.kv_get("session/a", false).await.unwrap_err().code(),
        "not_found"
    );
    c.shutdown().await;
}

/// Writes sent to a follower reach the leader as commands, many per RPC; a lock acquire queued
/// through a follower gets its grant there when the holder releases on the leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_batches_writes_for_the_leader_and_waiters_there_get_their_grant() {
    let c = TestCluster::start(3).await;
    let leader = c.wait_leader().await;
    let follower = follower_of(&c, leader);
    let cl = std::sync::Arc::new(c.client(follower));
    let counters = |v: &serde_json::Value| {
        let n = |k: &str| v[k].as_u64().unwrap();
        (n("forwarded_batches"), n("forwarded_entries"))
    };
    let (b0, e0) = counters(&cl.cluster().await.unwrap());
    let sent = |v: &serde_json::Value| v["replication_requests"].as_u64().unwrap();
    let r0 = sent(&c.client(leader).cluster().await.unwrap());

    let puts = (0..200).map(|i| {
        let cl = cl.clone();
        async move {
            let key = format!("batch/{i}");
            cl.kv_put(&key, json!({"value": i.to_string()})).await
        }
    });
    let mut last = 0;
    for put in futures::future::join_all(puts).await {
        let put = put.unwrap();
        assert_eq!(put["version"], 1);
        last = last.max(put["revision"].as_u64().unwrap());
    }
    c.wait_applied(follower, last).await;
    for i in 0..200 {
        let seen = cl.kv_get(&format!("batch/{i}"), true).await.unwrap();
        assert_eq!(seen["value"], i.to_string());
    }
    let (b1, e1) = counters(&cl.cluster().await.unwrap());
    assert_eq!(
        e1 - e0,
        200,
        "every put went to the leader as a forwarded entry"
    );
    assert!(
        b1 - b0 < 200,
        "200 concurrent puts took {} batches",
        b1 - b0
    );
    // The leader forwarded nothing: it proposes its own.
    let on_leader = c.client(leader).cluster().await.unwrap();
    assert_eq!(counters(&on_leader).1, 0);
    // It replicated the 200 entries to two followers in fewer requests than one per entry and
    // follower: more than one entry per request on average.
    let requests = sent(&on_leader) - r0;
    assert!(
        (1..400).contains(&requests),
        "200 entries went to 2 followers in {requests} requests"
    );

    // Hand-off to an acquire that waits on the follower.
    let a = cl.lease_grant(60_000, Some("a")).await.unwrap();
    let b = cl.lease_grant(60_000, Some("b")).await.unwrap();
    let first = cl.lock_acquire("hand", a, 0).await.unwrap();
    let waiter = {
        let cl = cl.clone();
        tokio::spawn(async move { cl.lock_acquire("hand", b, 20_000).await })
    };
    let on_leader = c.client(leader);
    let queued = async {
        while on_leader.lock_status("hand").await.unwrap()["queue"]
            .as_array()
            .is_none_or(|q| q.is_empty())
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), queued)
        .await
        .expect("the acquire through the follower never queued");
    let released = on_leader.lock_release("hand", a).await.unwrap();
    assert_eq!(released["next_holder"], b);
    let second = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter on the follower was not woken")
        .unwrap()
        .unwrap();
    assert!(second > first, "token {second} after {first}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarted_node_recovers_from_disk_and_catches_up() {
    let mut c = TestCluster::start(3).await;
    let leader = c.wait_leader().await;
    let cl = c.client(leader);
    for i in 0..20 {
        cl.kv_put(&format!("k{i}"), json!({"value": format!("v{i}")}))
            .await
            .unwrap();
    }
    let victim = follower_of(&c, leader);
    c.kill(victim).await;
    let cl = c.client_all();
    for i in 20..40 {
        cl.kv_put(&format!("k{i}"), json!({"value": format!("v{i}")}))
            .await
            .unwrap();
    }
    let target = c.applied(leader);
    c.restart(victim).await;
    c.wait_applied(victim, target).await;
    let local = c.client(victim);
    for i in [0, 19, 20, 39] {
        let v = local.kv_get(&format!("k{i}"), true).await.unwrap();
        assert_eq!(v["value"], format!("v{i}"), "key k{i} on restarted node");
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_added_later_gets_a_snapshot() {
    // Snapshot every 50 entries and keep only 10 behind it, so a new node cannot get the
    // beginning of the log and must install a snapshot.
    let mut c = TestCluster::start_with(3, 50, 10).await;
    let leader = c.wait_leader().await;
    let cl = c.client(leader);
    let lease = cl.lease_grant(60_000, None).await.unwrap();
    let token = cl.lock_acquire("snap-lock", lease, 0).await.unwrap();
    for i in 0..150 {
        cl.kv_put(&format!("s{i}"), json!({"value": i.to_string()}))
            .await
            .unwrap();
    }
    // Wait until the leader has purged the start of its log.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let m = c.nodes[&leader]
            .node
            .raft
            .metrics()
            .borrow_watched()
            .clone();
        if m.purged.as_ref().is_some_and(|p| p.index > 10) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "leader never purged its log"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let addr = c.start_joiner(4).await;
    let added = cl.add_member(4, &addr).await.unwrap();
    assert_eq!(added["voters"], json!([1, 2, 3, 4]));
    c.wait_applied(4, c.applied(leader)).await;
    let m = c.nodes[&4].node.raft.metrics().borrow_watched().clone();
    assert!(
        m.snapshot.is_some(),
        "node 4 should have installed a snapshot"
    );
    let local = c.client(4);
    assert_eq!(local.kv_get("s0", true).await.unwrap()["value"], "0");
    assert_eq!(local.kv_get("s149", true).await.unwrap()["value"], "149");
    let lock = local.lock_status("snap-lock").await.unwrap();
    assert_eq!(lock["holder"]["token"], token);

    // Removing a node retires its id for good.
    cl.remove_member(4).await.unwrap();
    let again = cl.add_member(4, &addr).await.unwrap_err();
    assert_eq!(again.code(), "conflict");
    c.shutdown().await;
}

/// Replication runs over one pipelined stream per follower (`raft_stream`). Cutting a link
/// with the fault switch ends that stream and the follower receives nothing more; healing it
/// opens a new stream, over which the follower catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replication_streams_carry_the_log_and_reopen_after_a_cut_link() {
    use std::sync::atomic::Ordering::Relaxed;
    let c = TestCluster::start_with_faults(3).await;
    let leader = c.wait_leader().await;
    let cl = c.client(leader);
    for i in 0..20 {
        cl.kv_put(&format!("k{i}"), json!({"value": i.to_string()}))
            .await
            .unwrap();
    }
    let lnode = &c.nodes[&leader].node;
    let index = c.applied(leader);
    for id in c.nodes.keys() {
        c.wait_applied(*id, index).await;
    }
    let opened = lnode.streams.opened.load(Relaxed);
    assert!(
        opened >= 2,
        "one stream per follower at least, got {opened}"
    );
    assert_eq!(lnode.streams.fallbacks.load(Relaxed), 0);
    for (id, r) in &c.nodes {
        if *id != leader {
            let accepted = r.node.streams.accepted.load(Relaxed);
            assert!(accepted >= 1, "node {id} accepted no stream");
        }
    }

    let cut = follower_of(&c, leader);
    let fnode = &c.nodes[&cut].node;
    assert!(lnode.faults.set_blocked([cut].into()));
    assert!(fnode.faults.set_blocked([leader].into()));
    let before = c.applied(cut);
    for i in 0..10 {
        cl.kv_put(&format!("cut{i}"), json!({"value": i.to_string()}))
            .await
            .unwrap();
    }
    let index = c.applied(leader);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        c.applied(cut) < index,
        "node {cut} applied {} of {index} through a cut link (before the cut: {before})",
        c.applied(cut)
    );

    lnode.faults.set_blocked(Default::default());
    fnode.faults.set_blocked(Default::default());
    c.wait_applied(cut, index).await;
    let v = c.client(cut).kv_get("cut9", true).await.unwrap();
    assert_eq!(v["value"], "9");
    assert!(
        lnode.streams.opened.load(Relaxed) > opened,
        "healing opens a new stream"
    );
    c.shutdown().await;
}
