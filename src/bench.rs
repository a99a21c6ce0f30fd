//! `concord bench`: a load generator that measures throughput, latency percentiles and errors
//! of one workload against a Concord cluster, or against etcd through its v3 JSON gateway.
//!
//! Shape of a run: set up (fill the key space, create the semaphore, grant one long-lived lease
//! per client), then `clients` tokio tasks run the workload for `warmup + duration`, then the
//! per-client leases are revoked. Each client sends to one endpoint (client `i` to endpoint
//! `i mod n`, so followers forward to the leader), or every client to the leader with
//! `--leader-only`.
//!
//! Invariants:
//! - Every request is sent once: no retry, no failover. A failed op is counted under its error
//!   code and is not in the latency histogram; the client goes on with its next op.
//! - An op is measured iff its start time is at or after the end of the warm-up. Clients start
//!   no op at or after the end of the run; ops in flight then are waited for and measured, and
//!   the measured window runs from the end of the warm-up to the last measured completion.
//! - Closed loop (default): an op starts when the client's previous op finished; latency is
//!   from send to answer. Open loop (`--rate R`): client `i` of `C` owns the send times
//!   `t0 + i/R + k*C/R`; an op starts at its scheduled time, or at once when the client is
//!   behind, and its latency is measured **from the scheduled time**, so a stall shows up in
//!   the latencies of the ops it delayed (no coordinated omission). Scheduled sends still
//!   unsent at the end of the run are reported as `unsent`.
//! - A multi-request op (lock: acquire+release, lease: grant+keepalive+revoke) counts once, and
//!   its latency is the whole sequence.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use clap::{Args, ValueEnum};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::HeaderValue;
use hyper::Method;
use hyper_util::rt::TokioIo;
use rand::distributions::Alphanumeric;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::chaos::runner::parse_duration;
use crate::client::{encode_path, encode_segment, new_request_id};

/// What the clients do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Write a value to a random key of the key space.
    Put,
    /// Linearizable read of a random key (the key space is written first).
    Get,
    /// Stale read of a random key, served by the node that receives it.
    GetStale,
    /// Acquire and release a lock; each client has its own lock (and its own lease).
    Lock,
    /// Acquire and release one lock that every client wants: measures the hand-off.
    LockContended,
    /// Acquire one permit of a capacity-8 semaphore shared by all clients, then release it.
    Semaphore,
    /// Grant a lease, keep it alive once, revoke it.
    Lease,
}

impl Workload {
    /// What one op is, for the report.
    pub fn op(self) -> &'static str {
        match self {
            Workload::Put => "put",
            Workload::Get => "linearizable get",
            Workload::GetStale => "stale get",
            Workload::Lock | Workload::LockContended => "acquire+release",
            Workload::Semaphore => "acquire+release (1 of 8 permits)",
            Workload::Lease => "grant+keepalive+revoke",
        }
    }

    /// The unit of the throughput.
    pub fn unit(self) -> &'static str {
        match self {
            Workload::Lock | Workload::LockContended | Workload::Semaphore => "pairs/s",
            Workload::Lease => "cycles/s",
            _ => "ops/s",
        }
    }

    fn needs_client_leases(self) -> bool {
        matches!(
            self,
            Workload::Lock | Workload::LockContended | Workload::Semaphore
        )
    }

    fn name(self) -> &'static str {
        match self {
            Workload::Put => "put",
            Workload::Get => "get",
            Workload::GetStale => "get-stale",
            Workload::Lock => "lock",
            Workload::LockContended => "lock-contended",
            Workload::Semaphore => "semaphore",
            Workload::Lease => "lease",
        }
    }
}

/// The system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// Concord's `/v1` HTTP API.
    Concord,
    /// etcd's v3 JSON gateway (`/v3/kv/put`, `/v3/kv/range`, `/v3/lease/*`, `/v3/lock/*`).
    Etcd,
}

/// Capacity of the semaphore of the `semaphore` workload.
pub const SEMAPHORE_CAPACITY: u64 = 8;
/// TTL of the leases the `lease` workload grants.
const CYCLE_LEASE_TTL_MS: u64 = 10_000;
/// How long a blocking acquire may wait in the queue.
const ACQUIRE_WAIT_MS: u64 = 60_000;
/// Pause of a closed-loop client after a failed op, so a dead endpoint is not spun on.
const ERROR_BACKOFF: Duration = Duration::from_millis(10);
/// Longest warm-up plus duration: the per-client leases (at most one day) must outlive it.
const MAX_RUN: Duration = Duration::from_secs(23 * 3600);

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// The workload.
    #[arg(long, value_enum, default_value = "put")]
    pub workload: Workload,
    /// Concurrent clients (one tokio task each).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub clients: u64,
    /// Measured time, after the warm-up (e.g. 30s, 500ms, 2m).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Time run first and left out of the results.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Size of each written value, in bytes.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=524_288))]
    pub value_size: u64,
    /// Number of distinct keys put and get pick from (written once before a get run).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub keys: u64,
    /// Open loop: total ops/s over all clients, latency measured from the scheduled send time.
    /// Without it, closed loop: each client sends its next op when the previous one returns.
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<f64>,
    /// Find the leader first and send everything to it (no forwarding).
    #[arg(long)]
    pub leader_only: bool,
    /// The API spoken: concord or etcd (v3 JSON gateway; no semaphore workload).
    #[arg(long, value_enum, default_value = "concord")]
    pub target: Target,
    /// One connection pool per endpoint, shared by the clients sending there, instead of one
    /// per client.
    #[arg(long)]
    pub shared_pool: bool,
    /// Timeout of one request (blocking acquires get their wait on top).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Processes on this machine (the servers under test, comma-separated pids) whose CPU
    /// time over the measured window the report gives per op (`cpu.servers_us_per_op`).
    #[arg(long, value_delimiter = ',')]
    pub cpu_pids: Vec<u32>,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let r: f64 = s.trim().parse().map_err(|_| format!("bad rate {s:?}"))?;
    if r.is_finite() && r > 0.0 {
        Ok(r)
    } else {
        Err(format!(
            "rate must be a positive number of ops/s, not {s:?}"
        ))
    }
}

impl BenchArgs {
    /// Checks clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if self.duration.is_zero() {
            return Err("--duration must be more than 0".into());
        }
        if self.timeout.is_zero() {
            return Err("--timeout must be more than 0".into());
        }
        if self.duration + self.warmup > MAX_RUN {
            return Err("--warmup plus --duration must be at most 23h".into());
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Latency histogram
// ---------------------------------------------------------------------------------------

/// Sub-buckets per power of two: a recorded value is off by less than 1/128 (0.8%).
const SUB_BITS: u32 = 7;
const SUB_COUNT: u64 = 1 << SUB_BITS;

/// A log-linear histogram of `u64` values (microseconds here): exact below 256, and above it
/// 128 equal buckets per power of two. Quantiles answer the highest value of the bucket that
/// holds the ranked sample, clamped to the recorded range, so `quantile(q)` never decreases
/// with `q`, never exceeds `max()` and overstates the exact sample by less than 1/128 of it.
#[derive(Debug, Clone, Default)]
pub struct Histogram {
    counts: Vec<u64>,
    count: u64,
    min: u64,
    max: u64,
    sum: u128,
}

/// The bucket of `v`: `v` itself below 256, then (power, top 7 bits after the leading one).
fn bucket_of(v: u64) -> usize {
    if v < SUB_COUNT {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros();
    let sub = (v >> (msb - SUB_BITS)) & (SUB_COUNT - 1);
    (((msb - SUB_BITS + 1) as usize) << SUB_BITS) | sub as usize
}

/// The lowest and highest value of bucket `i`.
fn bucket_bounds(i: usize) -> (u64, u64) {
    let group = (i >> SUB_BITS) as u32;
    if group == 0 {
        return (i as u64, i as u64);
    }
    let msb = group + SUB_BITS - 1;
    let sub = (i as u64) & (SUB_COUNT - 1);
    let width_log = msb - SUB_BITS;
    let lo = (1u64 << msb) | (sub << width_log);
    (lo, lo + ((1u64 << width_log) - 1))
}

impl Histogram {
    pub fn new() -> Histogram {
        Histogram::default()
    }

    pub fn record(&mut self, v: u64) {
        let i = bucket_of(v);
        if i >= self.counts.len() {
            self.counts.resize(i + 1, 0);
        }
        self.counts[i] += 1;
        self.min = if self.count == 0 { v } else { self.min.min(v) };
        self.max = self.max.max(v);
        self.count += 1;
        self.sum += u128::from(v);
    }

    pub fn merge(&mut self, other: &Histogram) {
        if other.count == 0 {
            return;
        }
        if other.counts.len() > self.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.min = if self.count == 0 {
            other.min
        } else {
            self.min.min(other.min)
        };
        self.max = self.max.max(other.max);
        self.count += other.count;
        self.sum += other.sum;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn min(&self) -> u64 {
        self.min
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        self.sum as f64 / self.count as f64
    }

    /// The value below or at which a fraction `q` (0..=1) of the samples lie; 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return bucket_bounds(i).1.clamp(self.min, self.max);
            }
        }
        self.max
    }
}

// ---------------------------------------------------------------------------------------
// Base64 (etcd's gateway carries keys and values as base64 in JSON)
// ---------------------------------------------------------------------------------------

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (RFC 4648 section 4).
pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b1 = chunk.get(1).copied().unwrap_or(0);
        let b2 = chunk.get(2).copied().unwrap_or(0);
        let n = (u32::from(chunk[0]) << 16) | (u32::from(b1) << 8) | u32::from(b2);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn b64_value(c: u8) -> Option<u32> {
    B64.iter().position(|&x| x == c).map(|p| p as u32)
}

/// Decode standard padded base64; `None` for anything else.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    if !s.len().is_multiple_of(4) {
        return None;
    }
    let chunks = s.len() / 4;
    let mut out = Vec::with_capacity(chunks * 3);
    for (ci, chunk) in s.chunks(4).enumerate() {
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && ci + 1 != chunks) {
            return None;
        }
        let mut n = 0u32;
        for &c in &chunk[..4 - pad] {
            n = (n << 6) | b64_value(c)?;
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}

// ---------------------------------------------------------------------------------------
// Requests and error codes
// ---------------------------------------------------------------------------------------

/// The canonical name of a gRPC status code (etcd's gateway reports errors with these).
pub fn grpc_code_name(code: u64) -> &'static str {
    match code {
        0 => "ok",
        1 => "cancelled",
        2 => "unknown",
        3 => "invalid_argument",
        4 => "deadline_exceeded",
        5 => "not_found",
        6 => "already_exists",
        7 => "permission_denied",
        8 => "resource_exhausted",
        9 => "failed_precondition",
        10 => "aborted",
        11 => "out_of_range",
        12 => "unimplemented",
        13 => "internal",
        14 => "unavailable",
        15 => "data_loss",
        16 => "unauthenticated",
        _ => "grpc_other",
    }
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Concord => "concord",
            Target::Etcd => "etcd",
        }
    }

    /// The error code of a non-2xx answer: Concord's `error.code`; etcd's gRPC `code`
    /// (`{"code": 5, ...}`, or `{"error": {"grpc_code": 5}}` on streams); else `http_<status>`.
    pub fn error_code(self, status: u16, body: &Value) -> String {
        let code = match self {
            Target::Concord => body["error"]["code"].as_str().map(str::to_string),
            Target::Etcd => body["code"]
                .as_u64()
                .or_else(|| body["error"]["grpc_code"].as_u64())
                .map(|c| grpc_code_name(c).to_string()),
        };
        code.unwrap_or_else(|| format!("http_{status}"))
    }
}

/// Error code of a 2xx answer that lacks what the next request needs.
const BAD_RESPONSE: &str = "bad_response";

/// One endpoint through one connection pool. Sends each request once.
#[derive(Clone)]
struct Conn {
    pool: Pool,
    /// The endpoint's URL (`http://host:port`), as the report names it.
    base: String,
    target: Target,
    timeout: Duration,
}

impl Conn {
    /// A connection to `base` with a pool of its own.
    fn new(base: &str, target: Target, timeout: Duration) -> Result<Conn, String> {
        Ok(Conn::with_pool(Pool::new(base)?, base, target, timeout))
    }

    /// The same endpoint through `pool` (shared with other clients).
    fn with_pool(pool: Pool, base: &str, target: Target, timeout: Duration) -> Conn {
        Conn {
            pool,
            base: base.to_string(),
            target,
            timeout,
        }
    }

    /// Send one request; the JSON answer (`Null` if not JSON) or the error code.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        extra: Duration,
    ) -> Result<Value, String> {
        let body = match body {
            Some(b) => serde_json::to_vec(b).map_err(|_| "transport".to_string())?,
            None => Vec::new(),
        };
        let sent = self.pool.send(method, path, body);
        let (status, bytes) = tokio::time::timeout(self.timeout + extra, sent)
            .await
            .map_err(|_| "timeout".to_string())??;
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status < 300 {
            Ok(v)
        } else {
            Err(self.target.error_code(status, &v))
        }
    }

    async fn post(&self, path: &str, body: Value) -> Result<Value, String> {
        self.call(Method::POST, path, Some(&body), Duration::ZERO)
            .await
    }
}

/// HTTP/1.1 connections to one endpoint, kept open: a request takes an idle one or opens a
/// new one, and gives it back once the answer is read (a request that failed or timed out
/// drops its connection). The load generator shares the machine with the servers it
/// measures, so it is kept lean: one hyper connection per request in flight, the request
/// line and headers built from a path, none of a general client's URL parsing, proxy,
/// redirect or retry handling (through reqwest the generator used 30-38 us of CPU per put,
/// now 21-24; docs/benchmarks.md).
#[derive(Clone)]
struct Pool(Arc<PoolInner>);

struct PoolInner {
    /// `host:port` to connect to.
    addr: String,
    /// The `Host` header.
    host: HeaderValue,
    /// A path the endpoint's URL had (`http://h:p/prefix`), put before every request path.
    prefix: String,
    idle: std::sync::Mutex<Vec<SendRequest<Full<Bytes>>>>,
}

impl Pool {
    fn new(base: &str) -> Result<Pool, String> {
        let Some(rest) = base.strip_prefix("http://") else {
            return Err(format!("{base}: only http:// endpoints can be benchmarked"));
        };
        let (authority, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let host = HeaderValue::from_str(authority).map_err(|_| format!("{base}: bad host"))?;
        // `http://host` means port 80 (an IPv6 literal without a port ends with `]`).
        let has_port = authority
            .rsplit_once(':')
            .is_some_and(|(_, port)| !port.ends_with(']'));
        let addr = if has_port {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        Ok(Pool(Arc::new(PoolInner {
            addr,
            host,
            prefix: prefix.to_string(),
            idle: std::sync::Mutex::new(Vec::new()),
        })))
    }

    fn take_idle(&self) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.0.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(c) = idle.pop() {
            if !c.is_closed() {
                return Some(c);
            }
        }
        None
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        let tcp = tokio::net::TcpStream::connect(&self.0.addr)
            .await
            .map_err(|_| "connect".to_string())?;
        let _ = tcp.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|_| "connect".to_string())?;
        // Ends when the sender is dropped or the server closes the connection.
        tokio::spawn(conn);
        Ok(sender)
    }

    /// One request; the status and the body.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(u16, Bytes), String> {
        let transport = |_| "transport".to_string();
        // An idle connection the server closed meanwhile is replaced by a new one (nothing
        // was sent on it); a new connection that is not ready is a transport error.
        let idle = match self.take_idle() {
            Some(mut c) => c.ready().await.is_ok().then_some(c),
            None => None,
        };
        let mut conn = match idle {
            Some(c) => c,
            None => {
                let mut c = self.connect().await?;
                c.ready().await.map_err(transport)?;
                c
            }
        };
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.0.prefix))
            .header(hyper::header::HOST, self.0.host.clone());
        if !body.is_empty() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|_| "transport".to_string())?;
        let resp = conn.send_request(req).await.map_err(transport)?;
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(transport)?
            .to_bytes();
        self.0
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(conn);
        Ok((status, bytes))
    }
}

/// An etcd int64/uint64 field: a JSON string (proto3 JSON) or a number.
fn id_field(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| v.as_str()?.parse().ok())
}

/// Concord request bodies and paths.
mod concord {
    use super::*;

    pub fn put(key: &str, value: &str) -> (String, Value) {
        (
            format!("/v1/kv/{}", encode_path(key)),
            json!({"value": value, "request_id": new_request_id()}),
        )
    }

    pub fn get_path(key: &str, stale: bool) -> String {
        let q = if stale { "?consistency=stale" } else { "" };
        format!("/v1/kv/{}{q}", encode_path(key))
    }

    pub fn acquire(kind: &str, name: &str, lease: u64) -> (String, Value) {
        let mut body = json!({"lease_id": lease, "wait_ms": ACQUIRE_WAIT_MS,
            "request_id": new_request_id()});
        if kind == "semaphores" {
            body["permits"] = json!(1);
        }
        (format!("/v1/{kind}/{}/acquire", encode_segment(name)), body)
    }

    pub fn release(kind: &str, name: &str, lease: u64) -> (String, Value) {
        (
            format!("/v1/{kind}/{}/release", encode_segment(name)),
            json!({"lease_id": lease, "request_id": new_request_id()}),
        )
    }

    pub fn grant(ttl_ms: u64) -> Value {
        json!({"ttl_ms": ttl_ms, "owner": "concord bench", "request_id": new_request_id()})
    }

    pub fn with_request_id() -> Value {
        json!({"request_id": new_request_id()})
    }
}

/// etcd v3 gateway request bodies (keys, values and lock names in base64).
pub mod etcd {
    use super::*;

    pub fn put(key: &str, value_b64: &str) -> Value {
        json!({"key": base64_encode(key.as_bytes()), "value": value_b64})
    }

    pub fn range(key: &str, serializable: bool) -> Value {
        let mut body = json!({"key": base64_encode(key.as_bytes())});
        if serializable {
            body["serializable"] = json!(true);
        }
        body
    }

    pub fn grant(ttl_ms: u64) -> Value {
        json!({"TTL": ttl_ms.div_ceil(1000)})
    }

    pub fn lease(id: u64) -> Value {
        json!({"ID": id.to_string()})
    }

    pub fn lock(name: &str, lease: u64) -> Value {
        json!({"name": base64_encode(name.as_bytes()), "lease": lease.to_string()})
    }

    pub fn unlock(key: &str) -> Value {
        json!({"key": key})
    }
}

// ---------------------------------------------------------------------------------------
// Sessions: one per client
// ---------------------------------------------------------------------------------------

/// Names of one run, unique per run.
#[derive(Debug, Clone)]
struct Names {
    key_prefix: String,
    lock_prefix: String,
    semaphore: String,
}

impl Names {
    fn new(run: &str) -> Names {
        Names {
            key_prefix: format!("bench/{run}/k"),
            lock_prefix: format!("bench-{run}-lock"),
            semaphore: format!("bench-{run}-sem"),
        }
    }

    fn key(&self, i: u64) -> String {
        format!("{}{i}", self.key_prefix)
    }
}

/// What one client needs to run its ops.
struct Session {
    conn: Conn,
    workload: Workload,
    names: Arc<Names>,
    /// The lock this client takes (its own, or the contended one).
    lock: String,
    /// The client's long-lived lease (lock and semaphore workloads).
    lease: Option<u64>,
    value: String,
    value_b64: String,
    keys: u64,
    rng: StdRng,
    /// etcd before 3.3 serves revoke only at `/v3/kv/lease/revoke`; set once that is found.
    legacy_revoke: Arc<AtomicBool>,
}

impl Session {
    fn random_key(&mut self) -> String {
        let i = self.rng.gen_range(0..self.keys);
        self.names.key(i)
    }

    fn client_lease(&self) -> Result<u64, String> {
        self.lease.ok_or_else(|| BAD_RESPONSE.to_string())
    }

    /// Run one op of the workload.
    async fn op(&mut self) -> Result<(), String> {
        match self.conn.target {
            Target::Concord => self.concord_op().await,
            Target::Etcd => self.etcd_op().await,
        }
    }

    async fn concord_op(&mut self) -> Result<(), String> {
        match self.workload {
            Workload::Put => {
                let key = self.random_key();
                let (path, body) = concord::put(&key, &self.value);
                self.conn
                    .call(Method::PUT, &path, Some(&body), Duration::ZERO)
                    .await
                    .map(drop)
            }
            Workload::Get | Workload::GetStale => {
                let key = self.random_key();
                let path = concord::get_path(&key, self.workload == Workload::GetStale);
                self.conn
                    .call(Method::GET, &path, None, Duration::ZERO)
                    .await
                    .map(drop)
            }
            Workload::Lock | Workload::LockContended => {
                let lease = self.client_lease()?;
                self.concord_pair("locks", &self.lock, lease).await
            }
            Workload::Semaphore => {
                let lease = self.client_lease()?;
                self.concord_pair("semaphores", &self.names.semaphore, lease)
                    .await
            }
            Workload::Lease => self.concord_lease_cycle().await,
        }
    }

    async fn concord_pair(&self, kind: &str, name: &str, lease: u64) -> Result<(), String> {
        let wait = Duration::from_millis(ACQUIRE_WAIT_MS);
        let (path, body) = concord::acquire(kind, name, lease);
        self.conn
            .call(Method::POST, &path, Some(&body), wait)
            .await?;
        let (path, body) = concord::release(kind, name, lease);
        self.conn.post(&path, body).await.map(drop)
    }

    async fn concord_lease_cycle(&self) -> Result<(), String> {
        let id = concord_grant(&self.conn, CYCLE_LEASE_TTL_MS).await?;
        let kept = self
            .conn
            .post(
                &format!("/v1/leases/{id}/keepalive"),
                concord::with_request_id(),
            )
            .await;
        let revoked = concord_revoke(&self.conn, id).await;
        kept.and(revoked)
    }

    async fn etcd_op(&mut self) -> Result<(), String> {
        match self.workload {
            Workload::Put => {
                let key = self.random_key();
                let body = etcd::put(&key, &self.value_b64);
                self.conn.post("/v3/kv/put", body).await.map(drop)
            }
            Workload::Get | Workload::GetStale => {
                let key = self.random_key();
                let body = etcd::range(&key, self.workload == Workload::GetStale);
                self.conn.post("/v3/kv/range", body).await.map(drop)
            }
            Workload::Lock | Workload::LockContended => {
                let lease = self.client_lease()?;
                self.etcd_lock_pair(lease).await
            }
            Workload::Semaphore => Err("unsupported".into()),
            Workload::Lease => self.etcd_lease_cycle().await,
        }
    }

    async fn etcd_lock_pair(&self, lease: u64) -> Result<(), String> {
        let wait = Duration::from_millis(ACQUIRE_WAIT_MS);
        let body = etcd::lock(&self.lock, lease);
        let v = self
            .conn
            .call(Method::POST, "/v3/lock/lock", Some(&body), wait)
            .await?;
        let key = v["key"].as_str().ok_or_else(|| BAD_RESPONSE.to_string())?;
        self.conn
            .post("/v3/lock/unlock", etcd::unlock(key))
            .await
            .map(drop)
    }

    async fn etcd_lease_cycle(&self) -> Result<(), String> {
        let id = etcd_grant(&self.conn, CYCLE_LEASE_TTL_MS).await?;
        let kept = etcd_keepalive(&self.conn, id).await;
        let revoked = etcd_revoke(&self.conn, id, &self.legacy_revoke).await;
        kept.and(revoked)
    }
}

async fn concord_grant(conn: &Conn, ttl_ms: u64) -> Result<u64, String> {
    let v = conn.post("/v1/leases", concord::grant(ttl_ms)).await?;
    v["lease_id"]
        .as_u64()
        .ok_or_else(|| BAD_RESPONSE.to_string())
}

async fn concord_revoke(conn: &Conn, id: u64) -> Result<(), String> {
    let body = concord::with_request_id();
    conn.call(
        Method::DELETE,
        &format!("/v1/leases/{id}"),
        Some(&body),
        Duration::ZERO,
    )
    .await
    .map(drop)
}

async fn etcd_grant(conn: &Conn, ttl_ms: u64) -> Result<u64, String> {
    let v = conn.post("/v3/lease/grant", etcd::grant(ttl_ms)).await?;
    id_field(&v["ID"]).ok_or_else(|| BAD_RESPONSE.to_string())
}

/// A keepalive through the gateway answers `{"result": {"ID", "TTL"}}`; a TTL of 0 (or none:
/// proto3 JSON leaves zeros out) means the lease was not found.
async fn etcd_keepalive(conn: &Conn, id: u64) -> Result<(), String> {
    let v = conn.post("/v3/lease/keepalive", etcd::lease(id)).await?;
    let result = if v["result"].is_object() {
        &v["result"]
    } else {
        &v
    };
    match id_field(&result["TTL"]) {
        Some(ttl) if ttl > 0 => Ok(()),
        _ => Err("not_found".into()),
    }
}

/// Revoke at `/v3/lease/revoke`; if that route does not exist (a 404 without a gRPC code),
/// use the older `/v3/kv/lease/revoke` from then on.
async fn etcd_revoke(conn: &Conn, id: u64, legacy: &AtomicBool) -> Result<(), String> {
    if !legacy.load(Ordering::Relaxed) {
        match conn.post("/v3/lease/revoke", etcd::lease(id)).await {
            Err(code) if code == "http_404" => legacy.store(true, Ordering::Relaxed),
            other => return other.map(drop),
        }
    }
    conn.post("/v3/kv/lease/revoke", etcd::lease(id))
        .await
        .map(drop)
}

async fn grant(conn: &Conn, ttl_ms: u64) -> Result<u64, String> {
    match conn.target {
        Target::Concord => concord_grant(conn, ttl_ms).await,
        Target::Etcd => etcd_grant(conn, ttl_ms).await,
    }
}

async fn revoke(conn: &Conn, id: u64, legacy: &AtomicBool) -> Result<(), String> {
    match conn.target {
        Target::Concord => concord_revoke(conn, id).await,
        Target::Etcd => etcd_revoke(conn, id, legacy).await,
    }
}

// ---------------------------------------------------------------------------------------
// The clients' loop
// ---------------------------------------------------------------------------------------

/// When a client runs and how it paces its ops.
#[derive(Debug, Clone, Copy)]
struct Plan {
    warmup_end: Instant,
    end: Instant,
    /// Open loop: this client's first scheduled send and the time between its sends.
    open: Option<(Instant, Duration)>,
}

/// What one client measured.
#[derive(Debug, Default)]
struct ClientResult {
    hist: Histogram,
    errors: BTreeMap<String, u64>,
    last_done: Option<Instant>,
    unsent: u64,
}

impl ClientResult {
    fn merge(&mut self, other: ClientResult) {
        self.hist.merge(&other.hist);
        for (code, n) in other.errors {
            *self.errors.entry(code).or_default() += n;
        }
        self.last_done = self.last_done.max(other.last_done);
        self.unsent += other.unsent;
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Scheduled sends in `[max(first, warmup_end), end)`, `interval` apart from `first`.
fn unsent_sends(first: Instant, interval: Duration, warmup_end: Instant, end: Instant) -> u64 {
    let step = interval.as_nanos().max(1);
    let skip = warmup_end.saturating_duration_since(first).as_nanos();
    let start =
        first + Duration::from_nanos(u64::try_from(skip.div_ceil(step) * step).unwrap_or(u64::MAX));
    let left = end.saturating_duration_since(start).as_nanos();
    u64::try_from(left.div_ceil(step)).unwrap_or(u64::MAX)
}

async fn client_loop(mut session: Session, plan: Plan) -> ClientResult {
    let mut res = ClientResult::default();
    let mut next = plan.open.map(|(first, _)| first);
    loop {
        let now = Instant::now();
        let start = match (next, plan.open) {
            (Some(t), Some((_, interval))) => {
                if t >= plan.end || now >= plan.end {
                    res.unsent = unsent_sends(t, interval, plan.warmup_end, plan.end);
                    break;
                }
                next = Some(t + interval);
                tokio::time::sleep_until(t).await;
                t
            }
            _ if now >= plan.end => break,
            _ => now,
        };
        let outcome = session.op().await;
        let done = Instant::now();
        let measured = start >= plan.warmup_end;
        if measured {
            res.last_done = res.last_done.max(Some(done));
        }
        match outcome {
            Ok(()) if measured => res.hist.record(micros(done - start)),
            Ok(()) => {}
            Err(code) => {
                if measured {
                    *res.errors.entry(code).or_default() += 1;
                }
                if plan.open.is_none() {
                    tokio::time::sleep(ERROR_BACKOFF).await;
                }
            }
        }
    }
    res
}

// ---------------------------------------------------------------------------------------
// Setup, run, report
// ---------------------------------------------------------------------------------------

/// The result of a run, as printed (`--json`: this object).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub workload: Workload,
    pub target: Target,
    /// `closed` or `open`.
    pub mode: &'static str,
    /// Open loop: the target rate, ops/s over all clients.
    pub rate: Option<f64>,
    pub clients: u64,
    /// The endpoints the clients sent to.
    pub endpoints: Vec<String>,
    pub leader_only: bool,
    /// `per-client` or `shared`.
    pub pool: &'static str,
    pub value_size: u64,
    /// What one op is.
    pub op: &'static str,
    pub warmup_s: f64,
    /// The measured window: from the end of the warm-up to the last measured completion.
    pub duration_s: f64,
    /// Successful measured ops.
    pub ops: u64,
    /// `ops / duration_s`.
    pub throughput: f64,
    pub unit: &'static str,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub mean_ms: Option<f64>,
    /// Failed measured ops by error code.
    pub errors: BTreeMap<String, u64>,
    pub error_count: u64,
    /// Open loop: scheduled sends the clients had not made when the run ended.
    pub unsent: Option<u64>,
    /// Set when the target cannot run the workload; nothing was sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unsupported: Option<String>,
    /// Concord only: the leader's group commit over the measured window.
    pub fsync: Option<FsyncReport>,
    /// CPU time spent over the measured window, by this load generator and by the processes
    /// of `--cpu-pids`. `None` where `/proc` could not be read.
    pub cpu: Option<CpuReport>,
}

/// CPU time (user + system) over the measured window, in total and per successful op.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CpuReport {
    pub client_ms: f64,
    pub client_us_per_op: Option<f64>,
    /// The processes of `--cpu-pids`, summed; `None` without them.
    pub servers_ms: Option<f64>,
    pub servers_us_per_op: Option<f64>,
}

/// CPU time used so far by this process and by `pids`, in milliseconds (Linux `/proc`).
#[derive(Debug, Clone, Copy, PartialEq)]
struct CpuSample {
    client_ms: f64,
    servers_ms: Option<f64>,
}

impl CpuSample {
    fn take(pids: &[u32]) -> Option<CpuSample> {
        let ticks = clock_ticks_per_sec();
        let read = |pid: &str| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            proc_cpu_ms(&stat, ticks)
        };
        let servers = if pids.is_empty() {
            None
        } else {
            Some(
                pids.iter()
                    .map(|p| read(&p.to_string()))
                    .sum::<Option<f64>>()?,
            )
        };
        Some(CpuSample {
            client_ms: read("self")?,
            servers_ms: servers,
        })
    }
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions; it returns -1 for an unknown name.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// User + system CPU time, in milliseconds, from the text of `/proc/<pid>/stat`. The command
/// name (field 2, in parentheses) may hold spaces, so fields are counted after its `)`:
/// utime and stime are fields 14 and 15.
fn proc_cpu_ms(stat: &str, ticks_per_sec: f64) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 * 1000.0 / ticks_per_sec)
}

impl CpuReport {
    /// From samples at the start and end of the window; `None` if this process's counter
    /// went back.
    fn between(before: CpuSample, after: CpuSample, ops: u64) -> Option<CpuReport> {
        let per_op = |ms: f64| (ops > 0).then(|| ms * 1000.0 / ops as f64);
        let client_ms = after.client_ms - before.client_ms;
        // A server counter that went back (a pid reused by another process) or that could
        // not be read at one end: no servers' figure.
        let servers_ms = match (before.servers_ms, after.servers_ms) {
            (Some(b), Some(a)) if a >= b => Some(a - b),
            _ => None,
        };
        (client_ms >= 0.0).then(|| CpuReport {
            client_ms,
            client_us_per_op: per_op(client_ms),
            servers_ms,
            servers_us_per_op: servers_ms.and_then(per_op),
        })
    }
}

/// How many log entries the leader's fsyncs covered during the measured window (the
/// difference of its `/v1/cluster` counters at the end of the warm-up and at the end).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FsyncReport {
    pub leader: String,
    pub fsyncs: u64,
    pub entries: u64,
    /// `entries / fsyncs`; `None` when there was no fsync.
    pub entries_per_fsync: Option<f64>,
}

impl FsyncReport {
    /// From two samples of `(fsyncs, appended_entries)`; `None` if the counters went back
    /// (the node restarted in between).
    pub fn between(leader: String, before: (u64, u64), after: (u64, u64)) -> Option<FsyncReport> {
        let fsyncs = after.0.checked_sub(before.0)?;
        let entries = after.1.checked_sub(before.1)?;
        Some(FsyncReport {
            leader,
            fsyncs,
            entries,
            entries_per_fsync: (fsyncs > 0).then(|| entries as f64 / fsyncs as f64),
        })
    }
}

/// The group-commit counters of the Concord node at `base`.
async fn fsync_counters(base: &str) -> Option<(u64, u64)> {
    let conn = Conn::new(base, Target::Concord, Duration::from_secs(5)).ok()?;
    let v = conn
        .call(Method::GET, "/v1/cluster", None, Duration::ZERO)
        .await
        .ok()?;
    Some((v["fsyncs"].as_u64()?, v["appended_entries"].as_u64()?))
}

impl Report {
    fn empty(args: &BenchArgs, endpoints: Vec<String>) -> Report {
        Report {
            workload: args.workload,
            target: args.target,
            mode: if args.rate.is_some() {
                "open"
            } else {
                "closed"
            },
            rate: args.rate,
            clients: args.clients,
            endpoints,
            leader_only: args.leader_only,
            pool: if args.shared_pool {
                "shared"
            } else {
                "per-client"
            },
            value_size: args.value_size,
            op: args.workload.op(),
            warmup_s: args.warmup.as_secs_f64(),
            duration_s: 0.0,
            ops: 0,
            throughput: 0.0,
            unit: args.workload.unit(),
            p50_ms: None,
            p90_ms: None,
            p99_ms: None,
            max_ms: None,
            mean_ms: None,
            errors: BTreeMap::new(),
            error_count: 0,
            unsent: None,
            unsupported: None,
            fsync: None,
            cpu: None,
        }
    }

    fn fill(&mut self, res: &ClientResult, warmup_end: Instant, end: Instant) {
        let window_end = res.last_done.map_or(end, |d| d.max(end));
        self.duration_s = (window_end - warmup_end).as_secs_f64();
        let h = &res.hist;
        self.ops = h.count();
        self.throughput = if self.duration_s > 0.0 {
            self.ops as f64 / self.duration_s
        } else {
            0.0
        };
        if h.count() > 0 {
            let ms = |us: u64| us as f64 / 1000.0;
            self.p50_ms = Some(ms(h.quantile(0.50)));
            self.p90_ms = Some(ms(h.quantile(0.90)));
            self.p99_ms = Some(ms(h.quantile(0.99)));
            self.max_ms = Some(ms(h.max()));
            self.mean_ms = Some(h.mean() / 1000.0);
        }
        self.errors = res.errors.clone();
        self.error_count = res.errors.values().sum();
        if self.rate.is_some() {
            self.unsent = Some(res.unsent);
        }
    }

    /// True when the run sent ops and none succeeded (the CLI exits 2).
    pub fn failed(&self) -> bool {
        self.unsupported.is_none() && self.ops == 0
    }

    /// The human table.
    pub fn human(&self) -> String {
        let name = self.workload.name();
        if let Some(why) = &self.unsupported {
            return format!("{name}: unsupported with --target etcd ({why})");
        }
        let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
        let mode = match self.rate {
            Some(r) => format!("open loop at {r} ops/s"),
            None => "closed loop".into(),
        };
        let mut s = format!(
            "{name} against {} ({}), {} clients, {mode}, {} pool{}\none op = {}; {:.2} s measured after {:.2} s warm-up\n\n",
            self.target.name(),
            self.endpoints.join(","),
            self.clients,
            self.pool,
            if self.leader_only { ", leader only" } else { "" },
            self.op,
            self.duration_s,
            self.warmup_s,
        );
        s += &format!(
            "{:<16} {:>10} {:>12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}\n",
            "workload",
            "ops",
            self.unit,
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "mean ms",
            "errors"
        );
        s += &format!(
            "{:<16} {:>10} {:>12.1} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}\n",
            name,
            self.ops,
            self.throughput,
            ms(self.p50_ms),
            ms(self.p90_ms),
            ms(self.p99_ms),
            ms(self.max_ms),
            ms(self.mean_ms),
            self.error_count
        );
        for (code, n) in &self.errors {
            s += &format!("  error {code}: {n}\n");
        }
        if let Some(u) = self.unsent.filter(|u| *u > 0) {
            s += &format!("  {u} scheduled sends not made: the target rate was not reached\n");
        }
        if let Some(f) = &self.fsync {
            let per = f
                .entries_per_fsync
                .map_or("-".to_string(), |p| format!("{p:.1}"));
            s += &format!(
                "  leader {}: {} log entries in {} fsyncs ({per} per fsync)\n",
                f.leader, f.entries, f.fsyncs
            );
        }
        if let Some(c) = &self.cpu {
            let per = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
            s += &format!(
                "  cpu: load generator {:.0} ms ({} us per op)",
                c.client_ms,
                per(c.client_us_per_op)
            );
            if let Some(ms) = c.servers_ms {
                s += &format!(
                    ", --cpu-pids {ms:.0} ms ({} us per op)",
                    per(c.servers_us_per_op)
                );
            }
            s += "\n";
        }
        s.trim_end().to_string()
    }
}

/// `host:port` or a URL, without a trailing slash, with a scheme.
fn normalize(endpoint: &str) -> String {
    let e = endpoint.trim().trim_end_matches('/');
    if e.starts_with("http://") || e.starts_with("https://") {
        e.to_string()
    } else {
        format!("http://{e}")
    }
}

/// The leader's URL: the endpoint that says it is the leader, or the leader's address as
/// Concord's membership lists it.
async fn find_leader(target: Target, endpoints: &[String]) -> anyhow::Result<String> {
    let mut last = anyhow!("no endpoint answered");
    for base in endpoints {
        let conn = Conn::new(base, target, Duration::from_secs(5)).map_err(anyhow::Error::msg)?;
        let found = match target {
            Target::Concord => concord_leader(&conn).await,
            Target::Etcd => etcd_leader(&conn).await,
        };
        match found {
            Ok(Some(url)) => return Ok(url),
            Ok(None) => last = anyhow!("{base} is not the leader and names none"),
            Err(code) => last = anyhow!("{base}: {code}"),
        }
    }
    Err(last.context("finding the leader"))
}

async fn concord_leader(conn: &Conn) -> Result<Option<String>, String> {
    let v = conn
        .call(Method::GET, "/v1/cluster", None, Duration::ZERO)
        .await?;
    let Some(leader) = v["leader"].as_u64() else {
        return Ok(None);
    };
    if v["id"].as_u64() == Some(leader) {
        return Ok(Some(conn.base.clone()));
    }
    let members = v["members"].as_array().into_iter().flatten();
    Ok(members
        .filter(|m| m["id"].as_u64() == Some(leader))
        .find_map(|m| m["addr"].as_str().map(normalize)))
}

/// etcd: `/v3/maintenance/status` names the leader and, in its header, the answering member.
async fn etcd_leader(conn: &Conn) -> Result<Option<String>, String> {
    let v = conn.post("/v3/maintenance/status", json!({})).await?;
    let text = |v: &Value| {
        v.as_str()
            .map(str::to_string)
            .or_else(|| v.as_u64().map(|n| n.to_string()))
    };
    let leader = text(&v["leader"]);
    let me = text(&v["header"]["member_id"]);
    Ok((leader.is_some() && leader == me).then(|| conn.base.clone()))
}

/// Run `f` over `items` with at most `width` at a time; the answers, or the first error.
/// For set-up steps: `no_leader` and `unavailable` are retried (see [`SETUP_RETRIES`]).
async fn in_parallel<T: Clone, R, F, Fut>(
    items: Vec<T>,
    width: usize,
    f: F,
) -> Result<Vec<R>, String>
where
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = Result<R, String>>,
{
    use futures::StreamExt;
    let f = &f;
    let results: Vec<Result<R, String>> =
        futures::stream::iter(items.into_iter().map(|item| async move {
            let mut left = SETUP_RETRIES;
            loop {
                match f(item.clone()).await {
                    Err(code) if left > 0 && (code == "no_leader" || code == "unavailable") => {
                        left -= 1;
                        tokio::time::sleep(SETUP_RETRY_PAUSE).await;
                    }
                    r => return r,
                }
            }
        }))
        .buffer_unordered(width.max(1))
        .collect()
        .await;
    results.into_iter().collect()
}

/// A set-up step (not measured) that fails because the cluster has no leader at that moment,
/// as during an election just after the cluster started, is tried again this many times,
/// this far apart.
const SETUP_RETRIES: u32 = 20;
const SETUP_RETRY_PAUSE: Duration = Duration::from_millis(250);

/// Write every key once, so that gets find them.
async fn fill_keys(
    conn: &Conn,
    names: &Names,
    keys: u64,
    value: &str,
    width: usize,
) -> anyhow::Result<()> {
    let value_b64 = base64_encode(value.as_bytes());
    in_parallel((0..keys).collect(), width, |i| {
        let key = names.key(i);
        let value_b64 = &value_b64;
        async move {
            match conn.target {
                Target::Concord => {
                    let (path, body) = concord::put(&key, value);
                    conn.call(Method::PUT, &path, Some(&body), Duration::ZERO)
                        .await
                        .map(drop)
                }
                Target::Etcd => conn
                    .post("/v3/kv/put", etcd::put(&key, value_b64))
                    .await
                    .map(drop),
            }
        }
    })
    .await
    .map(drop)
    .map_err(|code| anyhow!("writing the key space: {code}"))
}

/// Grant one lease per client, each to outlive the run.
async fn client_leases(conn: &Conn, clients: u64, ttl_ms: u64) -> anyhow::Result<Vec<u64>> {
    in_parallel((0..clients).collect(), 32, |_| grant(conn, ttl_ms))
        .await
        .map_err(|code| anyhow!("granting the clients' leases: {code}"))
}

fn random_string(rng: &mut StdRng, len: u64) -> String {
    rng.sample_iter(&Alphanumeric)
        .take(len as usize)
        .map(char::from)
        .collect()
}

/// Run the benchmark against `endpoints`.
pub async fn run(endpoints: &[String], args: BenchArgs) -> anyhow::Result<Report> {
    args.validate().map_err(anyhow::Error::msg)?;
    let mut endpoints: Vec<String> = endpoints.iter().map(|e| normalize(e)).collect();
    if endpoints.is_empty() {
        bail!("no endpoints given");
    }
    if args.target == Target::Etcd && args.workload == Workload::Semaphore {
        let mut report = Report::empty(&args, endpoints);
        report.unsupported = Some("etcd v3 has no semaphore".into());
        return Ok(report);
    }
    let clients = usize::try_from(args.clients).context("--clients")?;
    if args.leader_only {
        endpoints = vec![find_leader(args.target, &endpoints).await?];
    }
    let mut rng = StdRng::from_entropy();
    let run_id = random_string(&mut rng, 8).to_lowercase();
    let names = Arc::new(Names::new(&run_id));
    let setup = Conn::new(&endpoints[0], args.target, args.timeout).map_err(anyhow::Error::msg)?;
    let value = random_string(&mut rng, args.value_size);
    if matches!(args.workload, Workload::Get | Workload::GetStale) {
        fill_keys(&setup, &names, args.keys, &value, clients.min(64)).await?;
    }
    if args.workload == Workload::Semaphore {
        let body = json!({"capacity": SEMAPHORE_CAPACITY, "request_id": new_request_id()});
        let path = format!("/v1/semaphores/{}", encode_segment(&names.semaphore));
        setup
            .post(&path, body)
            .await
            .map_err(|c| anyhow!("creating the semaphore: {c}"))?;
    }
    let lease_ttl_ms = (args.warmup + args.duration + Duration::from_secs(120)).as_millis();
    let lease_ttl_ms = u64::try_from(lease_ttl_ms)
        .unwrap_or(u64::MAX)
        .min(86_400_000);
    let leases = if args.workload.needs_client_leases() {
        client_leases(&setup, args.clients, lease_ttl_ms).await?
    } else {
        Vec::new()
    };
    let legacy_revoke = Arc::new(AtomicBool::new(false));
    // --shared-pool: one pool per endpoint, shared by the clients sending there.
    let shared: Vec<Pool> = if args.shared_pool {
        let pools = endpoints.iter().map(|e| Pool::new(e));
        pools
            .collect::<Result<_, _>>()
            .map_err(anyhow::Error::msg)?
    } else {
        Vec::new()
    };
    let mut sessions = Vec::with_capacity(clients);
    for i in 0..clients {
        let base = &endpoints[i % endpoints.len()];
        let pool = match shared.get(i % endpoints.len()) {
            Some(p) => p.clone(),
            None => Pool::new(base).map_err(anyhow::Error::msg)?,
        };
        let lock = match args.workload {
            Workload::LockContended => names.lock_prefix.clone(),
            _ => format!("{}-{i}", names.lock_prefix),
        };
        sessions.push(Session {
            conn: Conn::with_pool(pool, base, args.target, args.timeout),
            workload: args.workload,
            names: names.clone(),
            lock,
            lease: leases.get(i).copied(),
            value_b64: base64_encode(value.as_bytes()),
            value: value.clone(),
            keys: args.keys,
            rng: StdRng::from_rng(&mut rng).context("seeding a client")?,
            legacy_revoke: legacy_revoke.clone(),
        });
    }

    let leader = match args.target {
        Target::Concord => find_leader(args.target, &endpoints).await.ok(),
        Target::Etcd => None,
    };

    let start = Instant::now();
    let warmup_end = start + args.warmup;
    let end = warmup_end + args.duration;
    let fsync_before = leader.clone().map(|leader| {
        tokio::spawn(async move {
            tokio::time::sleep_until(warmup_end).await;
            fsync_counters(&leader).await
        })
    });
    let cpu_pids = args.cpu_pids.clone();
    let cpu_before = tokio::spawn(async move {
        tokio::time::sleep_until(warmup_end).await;
        CpuSample::take(&cpu_pids)
    });
    let mut tasks = Vec::with_capacity(clients);
    for (i, session) in sessions.into_iter().enumerate() {
        let open = args.rate.map(|rate| {
            let phase = Duration::from_secs_f64(i as f64 / rate);
            let interval =
                Duration::from_secs_f64(args.clients as f64 / rate).max(Duration::from_nanos(1));
            (start + phase, interval)
        });
        let plan = Plan {
            warmup_end,
            end,
            open,
        };
        tasks.push(tokio::spawn(client_loop(session, plan)));
    }
    let mut total = ClientResult::default();
    for t in tasks {
        total.merge(t.await.context("a client task failed")?);
    }
    let cpu_after = CpuSample::take(&args.cpu_pids);
    let cpu_before = cpu_before.await.ok().flatten();

    let fsync_after = match &leader {
        Some(leader) => fsync_counters(leader).await,
        None => None,
    };
    let fsync_before = match fsync_before {
        Some(task) => task.await.ok().flatten(),
        None => None,
    };

    let cleanup = leases.iter().map(|id| revoke(&setup, *id, &legacy_revoke));
    futures::future::join_all(cleanup).await;

    let mut report = Report::empty(&args, endpoints);
    report.fill(&total, warmup_end, end);
    if let (Some(leader), Some(before), Some(after)) = (leader, fsync_before, fsync_after) {
        report.fsync = FsyncReport::between(leader, before, after);
    }
    if let (Some(before), Some(after)) = (cpu_before, cpu_after) {
        report.cpu = CpuReport::between(before, after, report.ops);
    }
    Ok(report)
}

#[cfg(test)]
mod tests;
