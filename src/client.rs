//! Typed HTTP client for Concord, used by the CLI, tests, bench and chaos.
//!
//! It talks to any of its endpoints; on a connection failure or a 503 it moves on to the next
//! endpoint (preferring the leader named in `X-Concord-Leader` when it knows its address) and
//! retries with backoff. Mutations carry a `request_id` generated once per call, so a retry
//! whose first attempt did apply gets the first answer instead of applying twice.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

/// An error answered by the cluster (with its stable code) or a transport failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    #[error("{code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
        body: Value,
    },
    #[error("no endpoint answered: {0}")]
    Unavailable(String),
}

impl ClientError {
    pub fn code(&self) -> &str {
        match self {
            ClientError::Api { code, .. } => code,
            ClientError::Unavailable(_) => "unavailable",
        }
    }
}

pub struct Client {
    endpoints: Vec<String>,
    http: reqwest::Client,
    current: AtomicUsize,
    /// The leader's URL, learned from `X-Concord-Leader` on a 503; tried first while it works.
    leader_hint: std::sync::Mutex<Option<String>>,
    /// Total time a call keeps retrying through elections and dead endpoints.
    pub retry_for: Duration,
}

pub fn new_request_id() -> String {
    format!(
        "{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    )
}

impl Client {
    pub fn new(endpoints: &[String]) -> Client {
        let endpoints = endpoints
            .iter()
            .map(|e| {
                let e = e.trim().trim_end_matches('/');
                if e.starts_with("http://") || e.starts_with("https://") {
                    e.to_string()
                } else {
                    format!("http://{e}")
                }
            })
            .collect();
        Client {
            endpoints,
            http: reqwest::Client::builder()
                .tcp_nodelay(true)
                .no_proxy()
                .build()
                .expect("http client"),
            current: AtomicUsize::new(0),
            leader_hint: std::sync::Mutex::new(None),
            retry_for: Duration::from_secs(15),
        }
    }

    /// One HTTP call with retries. `timeout` bounds each attempt.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, ClientError> {
        let start = tokio::time::Instant::now();
        let mut backoff = Duration::from_millis(50);
        let mut last_err;
        loop {
            let i = self.current.load(Ordering::Relaxed) % self.endpoints.len();
            let hint = self.hint();
            let base = hint.clone().unwrap_or_else(|| self.endpoints[i].clone());
            let url = format!("{base}{path}");
            let mut req = self.http.request(method.clone(), &url).timeout(timeout);
            if let Some(b) = &body {
                req = req.json(b);
            }
            match req.send().await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let leader = resp
                        .headers()
                        .get("x-concord-leader")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok());
                    let v: Value = resp.json().await.unwrap_or(Value::Null);
                    if status < 300 {
                        return Ok(v);
                    }
                    let code = v["error"]["code"].as_str().unwrap_or("unknown").to_string();
                    let message = v["error"]["message"].as_str().unwrap_or("").to_string();
                    if status != 503 {
                        return Err(ClientError::Api {
                            status,
                            code,
                            message,
                            body: v,
                        });
                    }
                    last_err = format!("{url}: {code}: {message}");
                    // Follow the leader hint if this node names one we can reach.
                    let learned = match leader {
                        Some(l) => self.leader_url(&base, l).await,
                        None => None,
                    };
                    self.set_hint(learned.filter(|u| Some(u) != hint.as_ref()));
                }
                Err(e) => {
                    last_err = format!("{url}: {e}");
                    self.set_hint(None);
                }
            }
            // Unavailable or unreachable: next endpoint, back off, try again.
            if hint.is_none() {
                self.current.store(i + 1, Ordering::Relaxed);
            }
            // A blocking call may have waited its whole timeout before failing: give the retry
            // budget at least that long.
            if start.elapsed() + backoff > self.retry_for.max(timeout) {
                return Err(ClientError::Unavailable(last_err));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(1000));
        }
    }

    fn hint(&self) -> Option<String> {
        self.leader_hint
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_hint(&self, url: Option<String>) {
        *self.leader_hint.lock().unwrap_or_else(|e| e.into_inner()) = url;
    }

    /// The URL of node `leader`, from the membership `base` reports.
    async fn leader_url(&self, base: &str, leader: u64) -> Option<String> {
        let v: Value = self
            .http
            .get(format!("{base}/v1/cluster"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let members = v["members"].as_array()?;
        let m = members.iter().find(|m| m["id"].as_u64() == Some(leader))?;
        Some(format!("http://{}", m["addr"].as_str()?))
    }

    /// A GET with retries (linearizable unless the path asks otherwise).
    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.call(Method::GET, path, None, Duration::from_secs(10))
            .await
    }

    /// A mutation: adds a fresh `request_id` that all retries share.
    async fn mutate(
        &self,
        method: Method,
        path: &str,
        mut body: Value,
        timeout: Duration,
    ) -> Result<Value, ClientError> {
        body["request_id"] = json!(new_request_id());
        self.call(method, path, Some(body), timeout).await
    }

    pub async fn cluster(&self) -> Result<Value, ClientError> {
        self.get("/v1/cluster").await
    }

    pub async fn add_member(&self, id: u64, addr: &str) -> Result<Value, ClientError> {
        let body = json!({"id": id, "addr": addr});
        self.call(
            Method::POST,
            "/v1/cluster/members",
            Some(body),
            Duration::from_secs(120),
        )
        .await
    }

    pub async fn remove_member(&self, id: u64) -> Result<Value, ClientError> {
        self.call(
            Method::DELETE,
            &format!("/v1/cluster/members/{id}"),
            None,
            Duration::from_secs(60),
        )
        .await
    }

    pub async fn lease_grant(&self, ttl_ms: u64, owner: Option<&str>) -> Result<u64, ClientError> {
        let v = self
            .mutate(
                Method::POST,
                "/v1/leases",
                json!({"ttl_ms": ttl_ms, "owner": owner}),
                Duration::from_secs(10),
            )
            .await?;
        Ok(v["lease_id"].as_u64().unwrap_or(0))
    }

    pub async fn lease_keepalive(&self, lease_id: u64) -> Result<Value, ClientError> {
        self.mutate(
            Method::POST,
            &format!("/v1/leases/{lease_id}/keepalive"),
            json!({}),
            Duration::from_secs(10),
        )
        .await
    }

    pub async fn lease_revoke(&self, lease_id: u64) -> Result<Value, ClientError> {
        self.mutate(
            Method::DELETE,
            &format!("/v1/leases/{lease_id}"),
            json!({}),
            Duration::from_secs(10),
        )
        .await
    }

    pub async fn lease_get(&self, lease_id: u64) -> Result<Value, ClientError> {
        self.get(&format!("/v1/leases/{lease_id}")).await
    }

    pub async fn kv_put(&self, key: &str, body: Value) -> Result<Value, ClientError> {
        self.mutate(
            Method::PUT,
            &format!("/v1/kv/{}", encode_path(key)),
            body,
            Duration::from_secs(10),
        )
        .await
    }

    pub async fn kv_get(&self, key: &str, stale: bool) -> Result<Value, ClientError> {
        let q = if stale { "?consistency=stale" } else { "" };
        self.get(&format!("/v1/kv/{}{q}", encode_path(key))).await
    }

    pub async fn kv_delete(&self, key: &str) -> Result<Value, ClientError> {
        self.mutate(
            Method::DELETE,
            &format!("/v1/kv/{}", encode_path(key)),
            json!({}),
            Duration::from_secs(10),
        )
        .await
    }

    pub async fn kv_list(&self, prefix: &str, limit: usize) -> Result<Value, ClientError> {
        self.get(&format!(
            "/v1/kv?prefix={}&limit={limit}",
            encode_segment(prefix)
        ))
        .await
    }

    /// Acquire `name` for `lease_id`, waiting up to `wait_ms` in the replicated queue.
    pub async fn lock_acquire(
        &self,
        name: &str,
        lease_id: u64,
        wait_ms: u64,
    ) -> Result<u64, ClientError> {
        self.lock_acquire_mode(name, lease_id, wait_ms, "exclusive")
            .await
    }

    /// Acquire `name` in `mode` ("exclusive" or "shared"); returns the token.
    pub async fn lock_acquire_mode(
        &self,
        name: &str,
        lease_id: u64,
        wait_ms: u64,
        mode: &str,
    ) -> Result<u64, ClientError> {
        let path = format!("/v1/locks/{}/acquire", encode_segment(name));
        let timeout = Duration::from_millis(wait_ms) + Duration::from_secs(15);
        let v = self
            .mutate(
                Method::POST,
                &path,
                json!({"lease_id": lease_id, "wait_ms": wait_ms, "mode": mode}),
                timeout,
            )
            .await?;
        Ok(v["token"].as_u64().unwrap_or(0))
    }

    /// Release `lock` (held exclusively) and wait on condition `name`; returns the response
    /// once the lock is held again (`token` is the new token).
    pub async fn cond_wait(
        &self,
        name: &str,
        lease_id: u64,
        lock: &str,
        wait_ms: u64,
    ) -> Result<Value, ClientError> {
        let path = format!("/v1/conditions/{}/wait", encode_segment(name));
        let timeout = Duration::from_millis(wait_ms) + Duration::from_secs(15);
        let body = json!({"lease_id": lease_id, "lock": lock, "wait_ms": wait_ms});
        self.mutate(Method::POST, &path, body, timeout).await
    }

    pub async fn cond_notify(&self, name: &str, all: bool) -> Result<Value, ClientError> {
        let path = format!("/v1/conditions/{}/notify", encode_segment(name));
        self.mutate(
            Method::POST,
            &path,
            json!({"all": all}),
            Duration::from_secs(10),
        )
        .await
    }

    /// Open a watch stream (`/v1/watch?QUERY`) on endpoint `i` (no failover: a caller that
    /// loses the stream resumes from the next revision, on any endpoint).
    pub async fn watch(&self, i: usize, query: &str) -> Result<Watch, ClientError> {
        let base = &self.endpoints[i % self.endpoints.len()];
        let url = format!("{base}/v1/watch?{query}");
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| ClientError::Unavailable(format!("{url}: {e}")))?;
        let status = resp.status().as_u16();
        if status >= 300 {
            let v: Value = resp.json().await.unwrap_or(Value::Null);
            return Err(ClientError::Api {
                status,
                code: v["error"]["code"].as_str().unwrap_or("unknown").to_string(),
                message: v["error"]["message"].as_str().unwrap_or("").to_string(),
                body: v,
            });
        }
        Ok(Watch {
            resp,
            buf: String::new(),
        })
    }

    pub fn endpoint_count(&self) -> usize {
        self.endpoints.len()
    }

    pub async fn lock_release(&self, name: &str, lease_id: u64) -> Result<Value, ClientError> {
        let path = format!("/v1/locks/{}/release", encode_segment(name));
        self.mutate(
            Method::POST,
            &path,
            json!({"lease_id": lease_id}),
            Duration::from_secs(10),
        )
        .await
    }

    pub async fn lock_status(&self, name: &str) -> Result<Value, ClientError> {
        self.get(&format!("/v1/locks/{}", encode_segment(name)))
            .await
    }

    pub async fn sem_create(&self, name: &str, capacity: u64) -> Result<Value, ClientError> {
        let path = format!("/v1/semaphores/{}", encode_segment(name));
        self.mutate(
            Method::POST,
            &path,
            json!({"capacity": capacity}),
            Duration::from_secs(10),
        )
        .await
    }

    /// Take `permits` of semaphore `name` for `lease_id`, waiting up to `wait_ms`.
    pub async fn sem_acquire(
        &self,
        name: &str,
        lease_id: u64,
        permits: u64,
        wait_ms: u64,
        priority: u64,
    ) -> Result<u64, ClientError> {
        let path = format!("/v1/semaphores/{}/acquire", encode_segment(name));
        let timeout = Duration::from_millis(wait_ms) + Duration::from_secs(15);
        let body = json!({"lease_id": lease_id, "permits": permits, "wait_ms": wait_ms, "priority": priority});
        let v = self.mutate(Method::POST, &path, body, timeout).await?;
        Ok(v["token"].as_u64().unwrap_or(0))
    }

    pub async fn sem_release(&self, name: &str, lease_id: u64) -> Result<Value, ClientError> {
        let path = format!("/v1/semaphores/{}/release", encode_segment(name));
        self.mutate(
            Method::POST,
            &path,
            json!({"lease_id": lease_id}),
            Duration::from_secs(10),
        )
        .await
    }

    pub async fn sem_status(&self, name: &str) -> Result<Value, ClientError> {
        self.get(&format!("/v1/semaphores/{}", encode_segment(name)))
            .await
    }

    /// Wait at barrier `name` until `parties` leases have arrived in its open generation (or
    /// in `generation`, if given). Answers `{barrier, generation, parties, lease_id, token}`.
    pub async fn barrier_wait(
        &self,
        name: &str,
        lease_id: u64,
        parties: u64,
        wait_ms: u64,
        generation: Option<u64>,
    ) -> Result<Value, ClientError> {
        let path = format!("/v1/barriers/{}/wait", encode_segment(name));
        let timeout = Duration::from_millis(wait_ms) + Duration::from_secs(15);
        let body = json!({"lease_id": lease_id, "parties": parties, "wait_ms": wait_ms,
            "generation": generation});
        self.mutate(Method::POST, &path, body, timeout).await
    }

    pub async fn barrier_status(&self, name: &str) -> Result<Value, ClientError> {
        self.get(&format!("/v1/barriers/{}", encode_segment(name)))
            .await
    }

    /// Enter double barrier `name`; returns once `parties` leases have entered together.
    pub async fn double_barrier_enter(
        &self,
        name: &str,
        lease_id: u64,
        parties: u64,
        wait_ms: u64,
        generation: Option<u64>,
    ) -> Result<Value, ClientError> {
        let path = format!("/v1/double-barriers/{}/enter", encode_segment(name));
        let timeout = Duration::from_millis(wait_ms) + Duration::from_secs(15);
        let body = json!({"lease_id": lease_id, "parties": parties, "wait_ms": wait_ms,
            "generation": generation});
        self.mutate(Method::POST, &path, body, timeout).await
    }

    /// Leave double barrier `name`; returns once everyone who entered with this lease has left.
    pub async fn double_barrier_leave(
        &self,
        name: &str,
        lease_id: u64,
        parties: Option<u64>,
        wait_ms: u64,
    ) -> Result<Value, ClientError> {
        let path = format!("/v1/double-barriers/{}/leave", encode_segment(name));
        let timeout = Duration::from_millis(wait_ms) + Duration::from_secs(15);
        let body = json!({"lease_id": lease_id, "parties": parties, "wait_ms": wait_ms});
        self.mutate(Method::POST, &path, body, timeout).await
    }

    pub async fn double_barrier_status(&self, name: &str) -> Result<Value, ClientError> {
        self.get(&format!("/v1/double-barriers/{}", encode_segment(name)))
            .await
    }

    /// Campaign in election `name` with `value`, waiting up to `wait_ms` in the candidate line.
    /// Answers `{election, leader, value, token, since_ms}` once `lease_id` leads.
    pub async fn election_campaign(
        &self,
        name: &str,
        lease_id: u64,
        value: &str,
        wait_ms: u64,
    ) -> Result<Value, ClientError> {
        let path = format!("/v1/elections/{}/campaign", encode_segment(name));
        let timeout = Duration::from_millis(wait_ms) + Duration::from_secs(15);
        let body = json!({"lease_id": lease_id, "value": value, "wait_ms": wait_ms});
        self.mutate(Method::POST, &path, body, timeout).await
    }

    pub async fn election_proclaim(
        &self,
        name: &str,
        lease_id: u64,
        value: &str,
    ) -> Result<Value, ClientError> {
        let path = format!("/v1/elections/{}/proclaim", encode_segment(name));
        let body = json!({"lease_id": lease_id, "value": value});
        self.mutate(Method::POST, &path, body, Duration::from_secs(10))
            .await
    }

    /// Step down as leader (the next candidate takes over), or leave the candidate line.
    pub async fn election_resign(&self, name: &str, lease_id: u64) -> Result<Value, ClientError> {
        let path = format!("/v1/elections/{}/resign", encode_segment(name));
        self.mutate(
            Method::POST,
            &path,
            json!({"lease_id": lease_id}),
            Duration::from_secs(10),
        )
        .await
    }

    pub async fn election_status(&self, name: &str) -> Result<Value, ClientError> {
        self.get(&format!("/v1/elections/{}", encode_segment(name)))
            .await
    }

    /// Push `item` to queue `name`; answers `{queue, id, priority, claimed_by}`.
    pub async fn queue_push(
        &self,
        name: &str,
        item: &str,
        priority: u64,
    ) -> Result<Value, ClientError> {
        let path = format!("/v1/queues/{}", encode_segment(name));
        let body = json!({"item": item, "priority": priority});
        self.mutate(Method::POST, &path, body, Duration::from_secs(10))
            .await
    }

    /// Claim the next item of queue `name` for `lease_id`, waiting up to `wait_ms` in line.
    /// Answers `{queue, id, item, priority, pushed_ms, claims, lease_id, token}`.
    pub async fn queue_claim(
        &self,
        name: &str,
        lease_id: u64,
        wait_ms: u64,
    ) -> Result<Value, ClientError> {
        let path = format!("/v1/queues/{}/claim", encode_segment(name));
        let timeout = Duration::from_millis(wait_ms) + Duration::from_secs(15);
        let body = json!({"lease_id": lease_id, "wait_ms": wait_ms});
        self.mutate(Method::POST, &path, body, timeout).await
    }

    pub async fn queue_ack(
        &self,
        name: &str,
        lease_id: u64,
        id: u64,
    ) -> Result<Value, ClientError> {
        let path = format!("/v1/queues/{}/ack", encode_segment(name));
        let body = json!({"lease_id": lease_id, "id": id});
        self.mutate(Method::POST, &path, body, Duration::from_secs(10))
            .await
    }

    /// Give a claimed item back to the queue (its original place).
    pub async fn queue_nack(
        &self,
        name: &str,
        lease_id: u64,
        id: u64,
    ) -> Result<Value, ClientError> {
        let path = format!("/v1/queues/{}/nack", encode_segment(name));
        let body = json!({"lease_id": lease_id, "id": id});
        self.mutate(Method::POST, &path, body, Duration::from_secs(10))
            .await
    }

    /// Pending (in claim order), claimed and waiting, each list capped at `limit`.
    pub async fn queue_status(&self, name: &str, limit: usize) -> Result<Value, ClientError> {
        self.get(&format!(
            "/v1/queues/{}?limit={limit}",
            encode_segment(name)
        ))
        .await
    }

    /// The cluster's deadlock victim policy (`{"policy", "policies"}`).
    pub async fn deadlock_policy(&self) -> Result<Value, ClientError> {
        self.get("/v1/deadlock-policy").await
    }

    /// Set the deadlock victim policy: `refuse`, `youngest` or `lowest_priority`.
    pub async fn set_deadlock_policy(&self, policy: &str) -> Result<Value, ClientError> {
        self.mutate(
            Method::PUT,
            "/v1/deadlock-policy",
            json!({"policy": policy}),
            Duration::from_secs(10),
        )
        .await
    }

    pub async fn fence_check(&self, lock: &str, token: u64) -> Result<Value, ClientError> {
        let body = json!({"lock": lock, "token": token});
        self.call(
            Method::POST,
            "/v1/fence/check",
            Some(body),
            Duration::from_secs(10),
        )
        .await
    }
}

/// Percent-encode a key for a URL path, keeping `/` (keys may contain slashes).
pub fn encode_path(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Percent-encode one path segment or query value (`/` included).
pub fn encode_segment(s: &str) -> String {
    encode_path(s).replace('/', "%2F")
}

/// A Server-Sent Events stream from `/v1/watch`.
pub struct Watch {
    resp: reqwest::Response,
    buf: String,
}

/// One SSE event: its name (`change`, `progress`, `compacted`) and JSON data.
#[derive(Debug, Clone)]
pub struct WatchEvent {
    pub event: String,
    pub data: Value,
}

impl Watch {
    /// The next event; `Ok(None)` when the server ended the stream; an error when the
    /// connection broke.
    pub async fn next(&mut self) -> Result<Option<WatchEvent>, ClientError> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut event = String::from("message");
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                let data = serde_json::from_str(&data).unwrap_or(Value::String(data));
                return Ok(Some(WatchEvent { event, data }));
            }
            match self.resp.chunk().await {
                Ok(Some(bytes)) => self.buf.push_str(&String::from_utf8_lossy(&bytes)),
                Ok(None) => return Ok(None),
                Err(e) => return Err(ClientError::Unavailable(format!("watch stream: {e}"))),
            }
        }
    }
}
