//! Leader elections over a 3-node cluster: the HTTP surface and its error codes, and blocked
//! candidates that survive a Raft leader kill, with leadership passing exactly once per
//! hand-off and tokens that increase.

mod common;

use std::time::Duration;

use common::TestCluster;
use concord::client::Client;
use serde_json::{json, Value};

async fn wait_candidates(cl: &Client, name: &str, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(v) = cl.election_status(name).await {
            if v["candidates"].as_array().map_or(0, |c| c.len()) == n {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "election {name} never had {n} candidates"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every running node applied at least the leader's index and holds the same election state.
async fn assert_replicas_agree(c: &TestCluster, name: &str) -> Option<(u64, u64)> {
    let leader = c.wait_leader().await;
    let index = c.applied(leader);
    let mut seen = None;
    for id in c.nodes.keys() {
        c.wait_applied(*id, index).await;
        let st = c.nodes[id].node.sm.read();
        let e = st
            .sm
            .elections
            .get(name)
            .map(|e| (e.leader.lease_id, e.leader.token));
        match &seen {
            None => seen = Some(e),
            Some(s) => assert_eq!(*s, e, "node {id} disagrees on election {name}"),
        }
    }
    seen.flatten()
}

async fn raw(c: &TestCluster, path: &str, body: &str) -> (u16, Value) {
    let leader = c.wait_leader().await;
    let resp = reqwest::Client::new()
        .post(format!("http://{}{path}", c.addrs[&leader]))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn election_api_and_error_codes() {
    let c = TestCluster::start(3).await;
    c.wait_leader().await;
    let cl = c.client_all();
    let a = cl.lease_grant(60_000, Some("a")).await.unwrap();
    let b = cl.lease_grant(60_000, Some("b")).await.unwrap();

    // Nobody leads yet.
    let st = cl.election_status("svc").await.unwrap();
    assert_eq!(st["leader"], Value::Null);
    assert_eq!(st["candidates"], json!([]));

    let won = cl.election_campaign("svc", a, "10.0.0.1", 0).await.unwrap();
    assert_eq!(won["leader"], a);
    assert_eq!(won["value"], "10.0.0.1");
    let token = won["token"].as_u64().unwrap();
    assert!(token > b);
    // Again while leading: same token, same value.
    let again = cl.election_campaign("svc", a, "other", 0).await.unwrap();
    assert_eq!(
        (again["token"].as_u64(), again["value"].as_str()),
        (Some(token), Some("10.0.0.1"))
    );

    let e = cl
        .election_campaign("svc", b, "10.0.0.2", 0)
        .await
        .unwrap_err();
    assert_eq!(e.code(), "lock_held");
    let e = cl.election_proclaim("svc", b, "x").await.unwrap_err();
    assert_eq!(e.code(), "conflict");
    let e = cl.election_resign("svc", b).await.unwrap_err();
    assert_eq!(e.code(), "conflict");
    let e = cl
        .election_campaign("svc", 999_999, "x", 0)
        .await
        .unwrap_err();
    assert_eq!(e.code(), "lease_not_found");

    let p = cl.election_proclaim("svc", a, "10.0.0.9").await.unwrap();
    assert_eq!(p["token"], token);
    let st = cl.election_status("svc").await.unwrap();
    assert_eq!(
        (
            st["leader"].as_u64(),
            st["value"].as_str(),
            st["token"].as_u64()
        ),
        (Some(a), Some("10.0.0.9"), Some(token))
    );

    // Handler-level checks: nothing is proposed.
    let big = "v".repeat(concord::sm::MAX_ELECTION_VALUE + 1);
    let body = json!({"lease_id": a, "value": big}).to_string();
    let (s, v) = raw(&c, "/v1/elections/svc/proclaim", &body).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (413, Some("payload_too_large"))
    );
    let (s, v) = raw(
        &c,
        "/v1/elections/svc/campaign",
        r#"{"lease_id": 1, "bogus": 1}"#,
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("invalid_argument"))
    );
    let body = json!({"lease_id": b, "wait_ms": concord::sm::MAX_WAIT_MS + 1}).to_string();
    let (s, _) = raw(&c, "/v1/elections/svc/campaign", &body).await;
    assert_eq!(s, 400);
    let st = cl.election_status("svc").await.unwrap();
    assert_eq!(st["value"], "10.0.0.9");
    assert_eq!(st["candidates"], json!([]));

    // A short wait ends with `timeout` and leaves the line.
    let e = cl.election_campaign("svc", b, "x", 300).await.unwrap_err();
    assert_eq!(e.code(), "timeout");
    assert_eq!(
        cl.election_status("svc").await.unwrap()["candidates"],
        json!([])
    );

    // The leader resigns with nobody waiting: no leader.
    let r = cl.election_resign("svc", a).await.unwrap();
    assert_eq!(
        (r["was_leader"].as_bool(), r["leader"].as_u64()),
        (Some(true), None)
    );
    assert_eq!(
        cl.election_status("svc").await.unwrap()["leader"],
        Value::Null
    );
    let won = cl.election_campaign("svc", b, "10.0.0.2", 0).await.unwrap();
    assert!(won["token"].as_u64().unwrap() > token);

    // The OpenAPI document describes these routes and the new error code.
    let leader = c.wait_leader().await;
    let doc: Value = reqwest::get(format!("http://{}/v1/openapi.json", c.addrs[&leader]))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for p in [
        "/v1/elections/{name}",
        "/v1/elections/{name}/campaign",
        "/v1/elections/{name}/proclaim",
        "/v1/elections/{name}/resign",
        "/v1/queues/{name}",
        "/v1/queues/{name}/claim",
        "/v1/queues/{name}/ack",
        "/v1/queues/{name}/nack",
    ] {
        assert!(doc["paths"][p].is_object(), "{p} missing from openapi.json");
    }
    let codes = doc["components"]["schemas"]["ErrorCode"]["enum"]
        .as_array()
        .unwrap();
    assert!(codes.contains(&json!("resource_exhausted")));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blocked_candidates_survive_a_leader_kill_and_leadership_passes_once() {
    let mut c = TestCluster::start(3).await;
    let raft_leader = c.wait_leader().await;
    let cl = c.client_all();
    let a = cl.lease_grant(60_000, None).await.unwrap();
    let b = cl.lease_grant(60_000, None).await.unwrap();
    let d = cl.lease_grant(60_000, None).await.unwrap();
    let ta = cl.election_campaign("job", a, "A", 0).await.unwrap()["token"]
        .as_u64()
        .unwrap();

    // b, then d, wait in line; their calls go to the Raft leader (forwarded or direct).
    let cb = c.client_all();
    let wb = tokio::spawn(async move { cb.election_campaign("job", b, "B", 60_000).await });
    wait_candidates(&cl, "job", 1).await;
    let cd = c.client_all();
    let wd = tokio::spawn(async move { cd.election_campaign("job", d, "D", 60_000).await });
    wait_candidates(&cl, "job", 2).await;

    c.kill(raft_leader).await;
    let new_leader = c.wait_leader().await;
    assert_ne!(new_leader, raft_leader);
    let cl = c.client_all();
    let st = cl.election_status("job").await.unwrap();
    assert_eq!(st["leader"], a);
    let line: Vec<u64> = st["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["lease_id"].as_u64().unwrap())
        .collect();
    assert_eq!(line, vec![b, d]);
    // Operators see the contention: the leader holds, the candidates wait in line.
    let conflicts = cl.get("/v1/conflicts").await.unwrap();
    let e = conflicts["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["resource"] == "election:job")
        .expect("the election is listed")
        .clone();
    assert_eq!(e["holders"][0]["lease_id"], a);
    let waiting: Vec<u64> = e["waiters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["lease_id"].as_u64().unwrap())
        .collect();
    assert_eq!(waiting, vec![b, d]);

    // a steps down: b (first in line) leads, in that step, with the resign's index.
    let r = cl.election_resign("job", a).await.unwrap();
    assert_eq!(r["leader"], b);
    let tb = r["token"].as_u64().unwrap();
    assert!(tb > ta);
    // The blocked call answers (or, if its node died, the client's retry resumed the wait).
    let got = match wb.await.unwrap() {
        Ok(v) => v,
        Err(e) => {
            assert!(["unavailable", "no_leader"].contains(&e.code()), "{e}");
            cl.election_campaign("job", b, "B", 60_000).await.unwrap()
        }
    };
    assert_eq!(
        (got["leader"].as_u64(), got["token"].as_u64()),
        (Some(b), Some(tb))
    );
    assert_eq!(got["value"], "B");
    assert!(!wd.is_finished());
    assert_eq!(assert_replicas_agree(&c, "job").await, Some((b, tb)));

    // b's lease ends: d leads from the revoke's entry.
    cl.lease_revoke(b).await.unwrap();
    let got = match wd.await.unwrap() {
        Ok(v) => v,
        Err(e) => {
            assert!(["unavailable", "no_leader"].contains(&e.code()), "{e}");
            cl.election_campaign("job", d, "D", 60_000).await.unwrap()
        }
    };
    let td = got["token"].as_u64().unwrap();
    assert_eq!(got["leader"], d);
    assert!(td > tb);
    assert_eq!(assert_replicas_agree(&c, "job").await, Some((d, td)));
    let st = cl.election_status("job").await.unwrap();
    assert_eq!(st["candidates"], json!([]));
    assert_eq!(st["token"], td);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_candidate_cut_off_by_a_leader_kill_retries_and_learns_it_leads() {
    let mut c = TestCluster::start(3).await;
    let raft_leader = c.wait_leader().await;
    let follower = *c.nodes.keys().find(|id| **id != raft_leader).unwrap();
    let cl = c.client_all();
    let a = cl.lease_grant(60_000, None).await.unwrap();
    let b = cl.lease_grant(60_000, None).await.unwrap();
    let d = cl.lease_grant(60_000, None).await.unwrap();
    cl.election_campaign("svc", a, "A", 0).await.unwrap();

    // b waits through a raw call to the Raft leader itself: it dies with that node.
    let body =
        json!({"lease_id": b, "value": "B", "wait_ms": 60_000, "request_id": "campaign-b-1"});
    let url = format!("http://{}/v1/elections/svc/campaign", c.addrs[&raft_leader]);
    let first = body.clone();
    let wb = tokio::spawn(async move {
        match reqwest::Client::new().post(url).json(&first).send().await {
            Ok(r) => Err(r.status().as_u16()),
            Err(_) => Ok(()),
        }
    });
    wait_candidates(&cl, "svc", 1).await;
    // d waits through a follower, which forwards to the leader.
    let cd = c.client(follower);
    let wd = tokio::spawn(async move { cd.election_campaign("svc", d, "D", 60_000).await });
    wait_candidates(&cl, "svc", 2).await;

    c.kill(raft_leader).await;
    // b's call ends cleanly: the connection drops, or 503 (the node was stopping).
    match wb.await.unwrap() {
        Ok(()) => {}
        Err(status) => assert_eq!(status, 503),
    }
    c.wait_leader().await;
    let cl = c.client_all();
    // a steps down while b is cut off: b, first in line, leads.
    let r = cl.election_resign("svc", a).await.unwrap();
    assert_eq!(r["leader"], b);
    // b retries with the same request_id: it learns it leads, with that token.
    let got = cl
        .call(
            reqwest::Method::POST,
            "/v1/elections/svc/campaign",
            Some(body),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(
        (got["leader"].as_u64(), got["token"].as_u64()),
        (Some(b), r["token"].as_u64())
    );
    assert!(!wd.is_finished());
    let r = cl.election_resign("svc", b).await.unwrap();
    assert_eq!(r["leader"], d);
    let got = wd.await.unwrap().unwrap();
    assert_eq!(got["token"], r["token"]);
    c.shutdown().await;
}
