//! Barriers and double barriers over a 3-node cluster: agents on different nodes pass the same
//! generation together, blocked waits survive a leader kill (retried or resumed) and the
//! barrier still releases exactly once per generation, and a double barrier's leave does not
//! return until everyone who entered has left.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use concord::client::{Client, ClientError};
use serde_json::{json, Value};
use tokio::task::JoinHandle;

use common::TestCluster;

/// Poll `GET` until `ok` holds for the answer.
async fn wait_status(
    cl: &Client,
    double: bool,
    name: &str,
    what: &str,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let v = match double {
            false => cl.barrier_status(name).await,
            true => cl.double_barrier_status(name).await,
        };
        if let Ok(v) = v {
            if ok(&v) {
                return v;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} never reached: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn arrived(v: &Value) -> usize {
    v["arrived"].as_array().map_or(0, |a| a.len())
}

fn spawn_wait(
    cl: Client,
    name: &'static str,
    lease: u64,
    parties: u64,
) -> JoinHandle<Result<Value, ClientError>> {
    tokio::spawn(async move { cl.barrier_wait(name, lease, parties, 30_000, None).await })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_on_different_nodes_pass_each_generation_together() {
    let c = TestCluster::start(3).await;
    c.wait_leader().await;
    let cl = c.client_all();
    const N: u64 = 5;
    let mut leases = Vec::new();
    for _ in 0..N {
        leases.push(cl.lease_grant(60_000, None).await.unwrap());
    }

    // Bad input is refused with a stable code and nothing is applied.
    let l0 = leases[0];
    for (parties, wait_ms, code) in [
        (0, 1_000, "invalid_argument"),
        (10_001, 1_000, "invalid_argument"),
        (2, 0, "invalid_argument"),
    ] {
        let e = cl
            .barrier_wait("sync", l0, parties, wait_ms, None)
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "parties {parties} wait_ms {wait_ms}");
    }
    assert_eq!(
        cl.barrier_wait("sync", 999_999, 2, 1_000, None)
            .await
            .unwrap_err()
            .code(),
        "lease_not_found"
    );
    assert_eq!(
        cl.barrier_status("sync").await.unwrap_err().code(),
        "not_found"
    );
    let raw = cl
        .call(
            reqwest::Method::POST,
            "/v1/barriers/sync/wait",
            Some(json!({"lease_id": l0, "parties": 2, "bogus": 1})),
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
    assert_eq!(raw.code(), "invalid_argument");

    let mut tokens = Vec::new();
    for round in 1..=2u64 {
        // N-1 agents wait, each through another node; nobody is released.
        let mut tasks = Vec::new();
        for (i, lease) in leases.iter().take(N as usize - 1).enumerate() {
            let node = 1 + (i as u64 % 3);
            tasks.push(spawn_wait(c.client(node), "sync", *lease, N));
        }
        let st = wait_status(&cl, false, "sync", "N-1 arrived", |v| {
            arrived(v) == N as usize - 1
        })
        .await;
        assert_eq!(st["generation"], round);
        assert_eq!(st["parties"], N);
        // A different count is a conflict while they wait, and changes nothing.
        let other = cl.lease_grant(60_000, None).await.unwrap();
        let e = cl
            .barrier_wait("sync", other, N + 1, 1_000, None)
            .await
            .unwrap_err();
        assert_eq!(e.code(), "conflict");
        cl.lease_revoke(other).await.unwrap();
        let st = cl.barrier_status("sync").await.unwrap();
        assert_eq!(arrived(&st), N as usize - 1);
        assert!(
            tasks.iter().all(|t| !t.is_finished()),
            "released before the last party arrived"
        );

        // The last agent arrives through node 3: everyone passes generation `round`.
        let last = c
            .client(3)
            .barrier_wait("sync", leases[N as usize - 1], N, 30_000, None)
            .await
            .unwrap();
        let mut answers = vec![last];
        for t in tasks {
            answers.push(t.await.unwrap().unwrap());
        }
        let token = answers[0]["token"].as_u64().unwrap();
        let mut who = BTreeSet::new();
        for a in &answers {
            assert_eq!(a["generation"], round);
            assert_eq!(a["parties"], N);
            assert_eq!(
                a["token"].as_u64(),
                Some(token),
                "one release, one token: {answers:?}"
            );
            who.insert(a["lease_id"].as_u64().unwrap());
        }
        assert_eq!(who.len(), N as usize);
        tokens.push(token);
        let st = cl.barrier_status("sync").await.unwrap();
        assert_eq!(st["generation"], round + 1);
        assert_eq!((st["parties"].as_u64(), arrived(&st)), (Some(0), 0));
        assert_eq!(st["last_release"]["generation"], round);
        assert_eq!(st["last_release"]["leases"], json!(leases));
    }
    assert!(tokens[1] > tokens[0]);

    // A lease may ask for the last generation it passed again (a resumed wait) and gets the
    // same release; one that did not pass it gets a conflict; nothing changes either way.
    let again = cl
        .barrier_wait("sync", leases[2], N, 1_000, Some(2))
        .await
        .unwrap();
    assert_eq!(
        (again["generation"].as_u64(), again["token"].as_u64()),
        (Some(2), Some(tokens[1]))
    );
    let stranger = cl.lease_grant(60_000, None).await.unwrap();
    let e = cl
        .barrier_wait("sync", stranger, N, 1_000, Some(2))
        .await
        .unwrap_err();
    assert_eq!(e.code(), "conflict");
    // Only the last pass is kept: generation 1 of a lease that passed 2 since is a conflict.
    let e = cl
        .barrier_wait("sync", leases[2], N, 1_000, Some(1))
        .await
        .unwrap_err();
    assert_eq!(e.code(), "conflict");
    let st = cl.barrier_status("sync").await.unwrap();
    assert_eq!((st["generation"].as_u64(), arrived(&st)), (Some(3), 0));

    // A waiter whose deadline passes leaves and gets `timeout`; it no longer counts.
    let e = cl
        .barrier_wait("lonely", stranger, 2, 300, None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), "timeout");
    let st = cl.barrier_status("lonely").await.unwrap();
    assert_eq!((st["generation"].as_u64(), arrived(&st)), (Some(1), 0));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blocked_waits_survive_a_leader_kill_and_the_barrier_releases_once_per_generation() {
    let mut c = TestCluster::start(3).await;
    let leader = c.wait_leader().await;
    let cl = c.client_all();
    let mut leases = Vec::new();
    for _ in 0..4 {
        leases.push(cl.lease_grant(60_000, None).await.unwrap());
    }
    // Three agents wait for four parties. Their calls go to the leader first (so the kill cuts
    // them off) and fall back to the other nodes, retrying with the same request id.
    let mut eps = vec![c.addrs[&leader].clone()];
    eps.extend(
        c.addrs
            .iter()
            .filter(|(id, _)| **id != leader)
            .map(|(_, a)| a.clone()),
    );
    let mut tasks = Vec::new();
    for lease in leases.iter().take(3) {
        tasks.push(spawn_wait(Client::new(&eps), "epoch", *lease, 4));
    }
    wait_status(&cl, false, "epoch", "3 arrived", |v| arrived(v) == 3).await;

    c.kill(leader).await;
    let new_leader = c.wait_leader().await;
    assert_ne!(new_leader, leader);
    let cl = c.client_all();
    let st = cl.barrier_status("epoch").await.unwrap();
    assert_eq!((st["generation"].as_u64(), arrived(&st)), (Some(1), 3));
    // Calling again with a fresh request while still waiting resumes the same wait (it is not
    // a second arrival). Naming the generation joined makes the re-call race-free: applied
    // before the release it resumes the wait, applied after it it answers that release.
    let (recall, first) = (c.client_all(), leases[0]);
    let again = tokio::spawn(async move {
        recall
            .barrier_wait("epoch", first, 4, 30_000, Some(1))
            .await
    });
    tasks.push(again);

    // The fourth arrives after the failover: generation 1 is released, once.
    let last = cl
        .barrier_wait("epoch", leases[3], 4, 30_000, None)
        .await
        .unwrap();
    assert_eq!(last["generation"], 1);
    let token = last["token"].as_u64().unwrap();
    for (i, t) in tasks.into_iter().enumerate() {
        let answer = match t.await.unwrap() {
            Ok(v) => v,
            // A clean failure: resuming by naming the generation joined gives its outcome.
            Err(e) => {
                assert!(
                    matches!(e.code(), "unavailable" | "no_leader"),
                    "blocked wait failed uncleanly: {e}"
                );
                cl.barrier_wait("epoch", leases[i % 3], 4, 30_000, Some(1))
                    .await
                    .unwrap()
            }
        };
        assert_eq!(answer["generation"], 1);
        assert_eq!(answer["token"].as_u64(), Some(token));
    }
    // Re-calling after the release, naming the generation, answers the same release.
    let resumed = cl
        .barrier_wait("epoch", leases[1], 4, 30_000, Some(1))
        .await
        .unwrap();
    assert_eq!(resumed["token"].as_u64(), Some(token));
    let st = cl.barrier_status("epoch").await.unwrap();
    assert_eq!(st["generation"], 2);
    assert_eq!(
        arrived(&st),
        0,
        "a retried arrival leaked into generation 2: {st}"
    );
    assert_eq!(st["last_release"]["leases"], json!(leases));
    assert_eq!(st["last_release"]["token"].as_u64(), Some(token));

    // The barrier keeps working under the new leader: generation 2 releases once, too.
    let mut tasks = Vec::new();
    for lease in leases.iter().take(3) {
        tasks.push(spawn_wait(c.client_all(), "epoch", *lease, 4));
    }
    wait_status(&cl, false, "epoch", "3 arrived in generation 2", |v| {
        arrived(v) == 3
    })
    .await;
    let last = cl
        .barrier_wait("epoch", leases[3], 4, 30_000, None)
        .await
        .unwrap();
    assert_eq!(last["generation"], 2);
    for t in tasks {
        let v = t.await.unwrap().unwrap();
        assert_eq!(
            (v["generation"].as_u64(), v["token"].as_u64()),
            (Some(2), last["token"].as_u64())
        );
    }
    let st = cl.barrier_status("epoch").await.unwrap();
    assert_eq!((st["generation"].as_u64(), arrived(&st)), (Some(3), 0));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn double_barrier_leave_returns_only_after_everyone_has_left() {
    let c = TestCluster::start(3).await;
    c.wait_leader().await;
    let cl = c.client_all();
    let mut leases = Vec::new();
    for _ in 0..3 {
        leases.push(cl.lease_grant(60_000, None).await.unwrap());
    }
    let (a, b, cc) = (leases[0], leases[1], leases[2]);

    // Nobody returns from enter until all three have entered; each uses another node.
    let enter = |node: u64, lease: u64| {
        let cl = c.client(node);
        tokio::spawn(async move {
            cl.double_barrier_enter("stage", lease, 3, 30_000, None)
                .await
        })
    };
    let ea = enter(1, a);
    let eb = enter(2, b);
    let st = wait_status(&cl, true, "stage", "2 entering", |v| {
        v["entering"].as_array().map_or(0, |e| e.len()) == 2
    })
    .await;
    assert_eq!(st["phase"], "entering");
    assert!(!ea.is_finished() && !eb.is_finished());
    let ec = c
        .client(3)
        .double_barrier_enter("stage", cc, 3, 30_000, None)
        .await
        .unwrap();
    let enter_token = ec["token"].as_u64().unwrap();
    for t in [ea, eb] {
        let v = t.await.unwrap().unwrap();
        assert_eq!(
            (v["generation"].as_u64(), v["token"].as_u64()),
            (Some(1), Some(enter_token))
        );
    }
    // Someone else cannot enter while they are inside.
    let late = cl.lease_grant(60_000, None).await.unwrap();
    let e = cl
        .double_barrier_enter("stage", late, 3, 1_000, None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), "conflict");

    // a and b leave; their calls block while c is still inside.
    let leave = |node: u64, lease: u64| {
        let cl = c.client(node);
        tokio::spawn(async move {
            cl.double_barrier_leave("stage", lease, Some(3), 30_000)
                .await
        })
    };
    let la = leave(1, a);
    let lb = leave(2, b);
    let st = wait_status(&cl, true, "stage", "a and b leaving", |v| {
        v["remaining"] == 1
    })
    .await;
    assert_eq!(st["phase"], "inside");
    // More entries are applied (keepalives of everyone) and still nobody is released.
    for _ in 0..5 {
        for l in [a, b, cc] {
            cl.lease_keepalive(l).await.unwrap();
        }
        let st = cl.double_barrier_status("stage").await.unwrap();
        assert_eq!(
            (st["generation"].as_u64(), st["remaining"].as_u64()),
            (Some(1), Some(1))
        );
        assert!(
            !la.is_finished() && !lb.is_finished(),
            "leave returned while c was inside"
        );
    }
    let lc = c
        .client(3)
        .double_barrier_leave("stage", cc, None, 30_000)
        .await
        .unwrap();
    let leave_token = lc["token"].as_u64().unwrap();
    assert!(leave_token > enter_token);
    for t in [la, lb] {
        let v = t.await.unwrap().unwrap();
        assert_eq!(
            (v["generation"].as_u64(), v["token"].as_u64()),
            (Some(1), Some(leave_token))
        );
    }
    let st = cl.double_barrier_status("stage").await.unwrap();
    assert_eq!(
        (st["generation"].as_u64(), st["phase"].as_str()),
        (Some(2), Some("idle"))
    );
    assert_eq!(st["last_release"]["leases"], json!([a, b, cc]));

    // Generation 2: a member that dies inside counts as having left, so the others go.
    let d = cl.lease_grant(60_000, None).await.unwrap();
    let ea = enter(1, a);
    let eb = enter(2, b);
    c.client(3)
        .double_barrier_enter("stage", d, 3, 30_000, None)
        .await
        .unwrap();
    ea.await.unwrap().unwrap();
    eb.await.unwrap().unwrap();
    let la = leave(1, a);
    let lb = leave(2, b);
    wait_status(&cl, true, "stage", "a and b leaving in generation 2", |v| {
        v["remaining"] == 1
    })
    .await;
    assert!(!la.is_finished() && !lb.is_finished());
    cl.lease_revoke(d).await.unwrap();
    let va = la.await.unwrap().unwrap();
    let vb = lb.await.unwrap().unwrap();
    assert_eq!(va["generation"], 2);
    assert_eq!(va["token"], vb["token"]);
    let st = cl.double_barrier_status("stage").await.unwrap();
    assert_eq!(st["generation"], 3);
    assert_eq!(st["last_release"]["leases"], json!([a, b]));
    c.shutdown().await;
}
