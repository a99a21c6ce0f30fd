//! HTTP-level behaviour: bad input gets a clear error and applies nothing; idempotent
//! retries; blocking lock waits; redirects.

mod common;

use std::time::Duration;

use common::TestCluster;
use serde_json::{json, Value};

struct Http {
    base: String,
    http: reqwest::Client,
}

impl Http {
    fn new(addr: &str) -> Http {
        Http {
            base: format!("http://{addr}"),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
        }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<String>,
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
            headers,
        )
    }

    async fn post(&self, path: &str, body: &str) -> (u16, Value) {
        let (s, v, _) = self
            .send(reqwest::Method::POST, path, Some(body.to_string()))
            .await;
        (s, v)
    }

    async fn put(&self, path: &str, body: &str) -> (u16, Value) {
        let (s, v, _) = self
            .send(reqwest::Method::PUT, path, Some(body.to_string()))
            .await;
        (s, v)
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let (s, v, _) = self.send(reqwest::Method::GET, path, None).await;
        (s, v)
    }
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("<none>")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_rejected_with_a_code_and_applies_nothing() {
    let c = TestCluster::start(1).await;
    c.wait_leader().await;
    let h = Http::new(&c.addrs[&1]);
    let (s, v) = h.post("/v1/leases", r#"{"ttl_ms": 5000}"#).await;
    assert_eq!(s, 201, "{v}");
    let lease = v["lease_id"].as_u64().unwrap();
    let (s, _) = h.put("/v1/kv/k", r#"{"value": "v1"}"#).await;
    assert_eq!(s, 200);
    let before = c.nodes[&1].node.sm.read().sm.clone();

    let long_key = format!("/v1/kv/{}", "a".repeat(1025));
    let cases: Vec<(&str, &str, String, u16, &str)> = vec![
        (
            "PUT",
            "/v1/kv/k",
            "{not json".into(),
            400,
            "invalid_argument",
        ),
        (
            "PUT",
            "/v1/kv/k",
            r#"{"value": 5}"#.into(),
            400,
            "invalid_argument",
        ),
        (
            "PUT",
            "/v1/kv/k",
            r#"{"value": "x", "surprise": 1}"#.into(),
            400,
            "invalid_argument",
        ),
        (
            "PUT",
            &long_key,
            r#"{"value": "x"}"#.into(),
            400,
            "invalid_argument",
        ),
        (
            "PUT",
            "/v1/kv/k",
            format!(r#"{{"value": "{}"}}"#, "x".repeat(1 << 20)),
            413,
            "payload_too_large",
        ),
        (
            "PUT",
            "/v1/kv/k",
            format!(r#"{{"value": "{}"}}"#, "x".repeat(600 * 1024)),
            413,
            "payload_too_large",
        ),
        (
            "PUT",
            "/v1/kv/k",
            r#"{"value": "x", "if_version": 7}"#.into(),
            412,
            "precondition_failed",
        ),
        (
            "PUT",
            "/v1/kv/k",
            r#"{"value": "x", "if_absent": true}"#.into(),
            412,
            "precondition_failed",
        ),
        (
            "PUT",
            "/v1/kv/k",
            r#"{"value": "x", "lease_id": 999}"#.into(),
            404,
            "lease_not_found",
        ),
        (
            "PUT",
            "/v1/kv/k",
            r#"{"value": "x", "fence": {"lock": "nope", "token": 1}}"#.into(),
            412,
            "fenced",
        ),
        (
            "POST",
            "/v1/leases",
            r#"{"ttl_ms": 999}"#.into(),
            400,
            "invalid_argument",
        ),
        (
            "POST",
            "/v1/leases",
            r#"{"ttl_ms": 86400001}"#.into(),
            400,
            "invalid_argument",
        ),
        (
            "POST",
            "/v1/leases",
            r#"{"ttl_ms": -1}"#.into(),
            400,
            "invalid_argument",
        ),
        ("POST", "/v1/leases", "{}".into(), 400, "invalid_argument"),
        (
            "POST",
            "/v1/leases/abc/keepalive",
            "{}".into(),
            400,
            "invalid_argument",
        ),
        (
            "POST",
            "/v1/leases/12345/keepalive",
            "{}".into(),
            404,
            "lease_not_found",
        ),
        (
            "POST",
            "/v1/locks/l/acquire",
            r#"{"lease_id": 12345}"#.into(),
            404,
            "lease_not_found",
        ),
        (
            "POST",
            "/v1/locks/l/acquire",
            format!(r#"{{"lease_id": {lease}, "wait_ms": 3600001}}"#),
            400,
            "invalid_argument",
        ),
        (
            "POST",
            "/v1/locks/l/release",
            format!(r#"{{"lease_id": {lease}}}"#),
            409,
            "conflict",
        ),
        (
            "POST",
            "/v1/leases",
            r#"{"ttl_ms": 5000, "request_id": ""}"#.into(),
            400,
            "invalid_argument",
        ),
        (
            "GET",
            "/v1/kv/k?consistency=sometimes",
            String::new(),
            400,
            "invalid_argument",
        ),
        (
            "GET",
            "/v1/kv?limit=abc",
            String::new(),
            400,
            "invalid_argument",
        ),
        (
            "GET",
            "/v1/kv?limit=0",
            String::new(),
            400,
            "invalid_argument",
        ),
        ("GET", "/v1/kv/missing", String::new(), 404, "not_found"),
        (
            "GET",
            "/v1/leases/777",
            String::new(),
            404,
            "lease_not_found",
        ),
        ("GET", "/v1/no-such-route", String::new(), 404, "not_found"),
    ];
    for (method, path, body, status, want) in cases {
        let method: reqwest::Method = method.parse().unwrap();
        let body = if body.is_empty() { None } else { Some(body) };
        let (s, v, _) = h.send(method.clone(), path, body).await;
        assert_eq!((s, code(&v)), (status, want), "{method} {path}: {v}");
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    // Nothing changed: rejected commands that reached the log leave the state as a tick would.
    let after = c.nodes[&1].node.sm.read().sm.clone();
    assert_eq!(after.kv, before.kv);
    assert_eq!(after.locks, before.locks);
    assert_eq!(
        after.leases.keys().collect::<Vec<_>>(),
        before.leases.keys().collect::<Vec<_>>()
    );
    let (s, v) = h.get("/v1/kv/k").await;
    assert_eq!(
        (s, v["value"].as_str(), v["version"].as_u64()),
        (200, Some("v1"), Some(1))
    );
    // The node is still healthy.
    assert_eq!(h.get("/health").await.0, 200);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_request_id_applies_once_and_gets_the_first_answer() {
    let c = TestCluster::start(1).await;
    c.wait_leader().await;
    let h = Http::new(&c.addrs[&1]);
    let body = r#"{"ttl_ms": 5000, "request_id": "grant-1"}"#;
    let (s1, v1) = h.post("/v1/leases", body).await;
    let (s2, v2) = h.post("/v1/leases", body).await;
    assert_eq!((s1, s2), (201, 201));
    assert_eq!(v1, v2);
    assert_eq!(c.nodes[&1].node.sm.read().sm.leases.len(), 1);

    let put = r#"{"value": "a", "request_id": "put-1"}"#;
    let (_, p1) = h.put("/v1/kv/once", put).await;
    let (_, p2) = h.put("/v1/kv/once", put).await;
    assert_eq!(p1, p2);
    assert_eq!(h.get("/v1/kv/once").await.1["version"], 1);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_acquire_waits_in_fifo_order_and_times_out_cleanly() {
    let c = TestCluster::start(1).await;
    c.wait_leader().await;
    let cl = c.client(1);
    let a = cl.lease_grant(30_000, Some("a")).await.unwrap();
    let b = cl.lease_grant(30_000, Some("b")).await.unwrap();
    let d = cl.lease_grant(30_000, Some("d")).await.unwrap();
    let t_a = cl.lock_acquire("q", a, 0).await.unwrap();

    // b waits first, then d; releasing hands the lock to b, then to d.
    let cb = c.client(1);
    let wb = tokio::spawn(async move { cb.lock_acquire("q", b, 10_000).await });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while cl.lock_status("q").await.unwrap()["queue"]
        .as_array()
        .unwrap()
        .is_empty()
    {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cd = c.client(1);
    let wd = tokio::spawn(async move { cd.lock_acquire("q", d, 10_000).await });
    while cl.lock_status("q").await.unwrap()["queue"]
        .as_array()
        .unwrap()
        .len()
        < 2
    {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cl.lock_release("q", a).await.unwrap();
    let t_b = wb.await.unwrap().unwrap();
    assert!(t_b > t_a);
    assert!(!wd.is_finished());
    cl.lock_release("q", b).await.unwrap();
    let t_d = wd.await.unwrap().unwrap();
    assert!(t_d > t_b);

    // A wait that is not served in time answers `timeout` and leaves the queue.
    let started = tokio::time::Instant::now();
    let err = cl.lock_acquire("q", a, 300).await.unwrap_err();
    assert_eq!(err.code(), "timeout");
    assert!(started.elapsed() >= Duration::from_millis(300));
    let st = cl.lock_status("q").await.unwrap();
    assert_eq!(st["holder"]["lease_id"], d);
    assert_eq!(st["queue"], json!([]));

    // A waiter whose lease ends leaves with lease_not_found.
    let short = cl.lease_grant(1_000, None).await.unwrap();
    let err = cl.lock_acquire("q", short, 20_000).await.unwrap_err();
    assert_eq!(err.code(), "lease_not_found");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_redirect_on_request_and_every_response_names_the_leader() {
    let c = TestCluster::start(3).await;
    let leader = c.wait_leader().await;
    let follower = *c.nodes.keys().find(|id| **id != leader).unwrap();
    let h = Http::new(&c.addrs[&follower]);
    let (s, _, headers) = h
        .send(
            reqwest::Method::PUT,
            "/v1/kv/r?redirect=true",
            Some(r#"{"value": "x"}"#.into()),
        )
        .await;
    assert_eq!(s, 307);
    let loc = headers["location"].to_str().unwrap();
    assert_eq!(
        loc,
        format!("http://{}/v1/kv/r?redirect=true", c.addrs[&leader])
    );
    // Forwarded (default): applied through the leader.
    let (s, v, headers) = h
        .send(
            reqwest::Method::PUT,
            "/v1/kv/r",
            Some(r#"{"value": "x"}"#.into()),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        headers["x-concord-leader"].to_str().unwrap(),
        leader.to_string()
    );
    let index: u64 = headers["x-concord-index"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(index >= v["revision"].as_u64().unwrap());
    // A stale read on the follower is served locally once it has applied the write.
    c.wait_applied(follower, v["revision"].as_u64().unwrap())
        .await;
    let (s, v) = h.get("/v1/kv/r?consistency=stale").await;
    assert_eq!((s, v["value"].as_str()), (200, Some("x")));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_list_pages_with_start_after() {
    let c = TestCluster::start(1).await;
    c.wait_leader().await;
    let h = Http::new(&c.addrs[&1]);
    for k in ["a/1", "a/2", "a/3", "b/1"] {
        assert_eq!(
            h.put(&format!("/v1/kv/{k}"), r#"{"value": "v"}"#).await.0,
            200
        );
    }
    let keys = |v: &Value| -> Vec<String> {
        v["kvs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["key"].as_str().unwrap().to_string())
            .collect()
    };
    let (s, page1) = h.get("/v1/kv?prefix=a/&limit=2").await;
    assert_eq!(s, 200);
    assert_eq!(
        (keys(&page1), page1["more"].as_bool()),
        (vec!["a/1".to_string(), "a/2".into()], Some(true))
    );
    let (_, page2) = h.get("/v1/kv?prefix=a/&limit=2&start_after=a/2").await;
    assert_eq!(
        (keys(&page2), page2["more"].as_bool()),
        (vec!["a/3".to_string()], Some(false))
    );
    c.shutdown().await;
}

/// A blocked acquire whose wait deadline passes answers `timeout` itself (409), over raw HTTP
/// with no client retry: the expiry must wake the blocked call. Were it not woken, the call
/// would give up after the slack and answer `unavailable` (503).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_lock_or_semaphore_acquire_answers_timeout_at_its_deadline() {
    let c = TestCluster::start(1).await;
    c.wait_leader().await;
    let h = Http::new(&c.addrs[&1]);
    let cl = c.client(1);
    let a = cl.lease_grant(60_000, None).await.unwrap();
    let b = cl.lease_grant(60_000, None).await.unwrap();

    // `holder` takes `path` at once; `waiter` then waits 300 ms for it and gets `timeout`.
    let times_out_behind = |path: &'static str, holder: Value, waiter: Value| {
        let h = &h;
        async move {
            let (s, v) = h.post(path, &holder.to_string()).await;
            assert_eq!(s, 200, "{v}");
            let (s, v) = h.post(path, &waiter.to_string()).await;
            assert_eq!((s, &v["error"]["code"]), (409, &json!("timeout")), "{v}");
        }
    };

    times_out_behind(
        "/v1/locks/L/acquire",
        json!({"lease_id": a}),
        json!({"lease_id": b, "wait_ms": 300}),
    )
    .await;

    let (s, _) = h
        .post("/v1/semaphores/S", &json!({"capacity": 1}).to_string())
        .await;
    assert_eq!(s, 201);
    times_out_behind(
        "/v1/semaphores/S/acquire",
        json!({"lease_id": a, "permits": 1}),
        json!({"lease_id": b, "permits": 1, "wait_ms": 300}),
    )
    .await;
    let (_, st, _) = h.send(reqwest::Method::GET, "/v1/semaphores/S", None).await;
    assert_eq!(st["queue"], json!([]), "{st}");
    c.shutdown().await;
}
