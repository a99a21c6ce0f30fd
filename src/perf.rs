//! `concord perf`: the measurements that need a cluster of real processes the tool starts,
//! kills and restarts itself (see docs/benchmarks.md):
//!
//! - `failover`: kill -9 the leader under write load; time from the kill to the first write
//!   that was sent after the kill and succeeded (and to the survivors naming a new leader).
//! - `handoff`: a holder's lease lapses while another lease waits for its lock; time from the
//!   holder's last renewal + TTL to the waiter's grant. Never negative: that would be a grant
//!   inside the holder's guaranteed window.
//! - `resources`: load keys, leases and locks; each node's resident memory; kill -9 one
//!   follower, restart it, and time it until it serves again with everything it had.
//!
//! Every scenario reports each trial and the distribution, as JSON with the global `--json`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::{Args, ValueEnum};
use reqwest::Method;
use serde::Serialize;
use serde_json::{json, Value};

use crate::chaos::runner::{parse_duration, Net, ProcCluster};
use crate::client::{encode_path, encode_segment, new_request_id};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// kill -9 the leader under write load, `--trials` times.
    Failover,
    /// A lapsed holder's lock handed to a waiter, `--trials` times.
    Handoff,
    /// Memory with `--keys`, `--leases` and `--locks`, and a follower's restart time.
    Resources,
}

#[derive(Debug, Clone, Args)]
pub struct PerfArgs {
    #[arg(long, value_enum)]
    pub scenario: Scenario,
    /// Failover and handoff: how many times.
    #[arg(long, default_value_t = 10)]
    pub trials: u64,
    /// Failover: concurrent writers (spread over the nodes).
    #[arg(long, default_value_t = 16)]
    pub clients: u64,
    /// Handoff: the holder's lease TTL.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub ttl: Duration,
    /// Resources: keys written (256-byte values).
    #[arg(long, default_value_t = 100_000)]
    pub keys: u64,
    /// Resources: leases granted.
    #[arg(long, default_value_t = 10_000)]
    pub leases: u64,
    /// Resources: locks acquired (lock i by lease i mod --leases).
    #[arg(long, default_value_t = 10_000)]
    pub locks: u64,
    /// Where the nodes' data and logs go (emptied first).
    #[arg(long, default_value = "perf-out")]
    pub out: PathBuf,
    /// The `concord` binary to start (default: this one).
    #[arg(long)]
    pub bin: Option<PathBuf>,
    /// More `concord serve` arguments for every node, e.g. `--serve-arg=--election-ms=300`.
    #[arg(long = "serve-arg", allow_hyphen_values = true)]
    pub serve_args: Vec<String>,
}

/// Milliseconds, with the distribution over trials.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Distribution {
    pub trials: Vec<f64>,
    pub min: f64,
    pub median: f64,
    pub p90: f64,
    pub max: f64,
}

impl Distribution {
    /// `None` for no samples. The median of an even count is the mean of the middle two; p90
    /// is the sample at rank ceil(0.9 n).
    pub fn of(trials: Vec<f64>) -> Option<Distribution> {
        if trials.is_empty() {
            return None;
        }
        let mut s = trials.clone();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        let median = if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        };
        let p90 = s[((n as f64 * 0.9).ceil() as usize).clamp(1, n) - 1];
        Some(Distribution {
            trials,
            min: s[0],
            median,
            p90,
            max: s[n - 1],
        })
    }

    fn line(&self, what: &str) -> String {
        let all: Vec<String> = self.trials.iter().map(|t| format!("{t:.0}")).collect();
        format!(
            "{what}: median {:.0} ms, p90 {:.0}, min {:.0}, max {:.0} (ms: {})",
            self.median,
            self.p90,
            self.min,
            self.max,
            all.join(" ")
        )
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct FailoverReport {
    pub clients: u64,
    /// Kill -> first successful write sent after the kill.
    pub first_write_ms: Distribution,
    /// Kill -> both survivors name the same new leader.
    pub new_leader_ms: Option<Distribution>,
    /// Trials in which no write succeeded within 30 s.
    pub failed_trials: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct HandoffReport {
    pub ttl_ms: u64,
    /// Waiter's grant - (holder's last renewal sent + TTL).
    pub after_expiry_ms: Distribution,
    /// Waiter's grant - holder's last renewal sent (the TTL included).
    pub after_renewal_ms: Distribution,
    /// Grants that came before the holder's guaranteed window ended (must be 0).
    pub early_grants: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeMemory {
    pub id: u64,
    pub rss_mb: f64,
    pub peak_rss_mb: f64,
    pub data_mb: f64,
}

/// How long after a restarted node is ready its memory is measured a second time.
pub const SETTLE: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Serialize)]
pub struct ResourcesReport {
    pub keys: u64,
    pub leases: u64,
    pub locks: u64,
    /// Seconds to write everything (64 requests in flight, spread over the nodes).
    pub load_s: f64,
    /// The leader's applied index after the load.
    pub applied_index: u64,
    pub nodes: Vec<NodeMemory>,
    /// The restarted follower.
    pub restarted: u64,
    /// Spawn -> `/health` answers.
    pub restart_health_ms: f64,
    /// Spawn -> `/ready`, applied up to the commit index the leader had when it was killed.
    pub restart_ready_ms: f64,
    /// The restarted node, once ready.
    pub restarted_rss_mb: f64,
    /// The restarted node, [`SETTLE`] later: loading frees much of what it allocated, and the
    /// allocator gives freed memory back to the system only after a delay (mimalloc: 1 s).
    pub restarted_settled_rss_mb: f64,
    /// Stale reads on the restarted node: leases and a sample of keys and locks found.
    pub restarted_leases: u64,
    pub restarted_sample_ok: bool,
}

#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum PerfReport {
    Failover(FailoverReport),
    Handoff(HandoffReport),
    Resources(ResourcesReport),
}

impl PerfReport {
    pub fn human(&self) -> String {
        match self {
            PerfReport::Failover(r) => {
                let mut s = format!(
                    "failover under {} writers, {} trials\n{}",
                    r.clients,
                    r.first_write_ms.trials.len(),
                    r.first_write_ms.line("kill -9 leader -> first write")
                );
                if let Some(d) = &r.new_leader_ms {
                    s += &format!("\n{}", d.line("kill -9 leader -> new leader named"));
                }
                if r.failed_trials > 0 {
                    s += &format!("\n{} trials without a write within 30 s", r.failed_trials);
                }
                s
            }
            PerfReport::Handoff(r) => format!(
                "lock hand-off after a lease expiry, TTL {} ms, {} trials\n{}\n{}\nearly grants: {}",
                r.ttl_ms,
                r.after_expiry_ms.trials.len(),
                r.after_expiry_ms.line("grant after renewal + TTL"),
                r.after_renewal_ms.line("grant after the last renewal"),
                r.early_grants
            ),
            PerfReport::Resources(r) => {
                let mut s = format!(
                    "{} keys, {} leases, {} locks loaded in {:.1} s (applied index {})\n",
                    r.keys, r.leases, r.locks, r.load_s, r.applied_index
                );
                for n in &r.nodes {
                    s += &format!(
                        "node {}: RSS {:.1} MB (peak {:.1}), data dir {:.1} MB\n",
                        n.id, n.rss_mb, n.peak_rss_mb, n.data_mb
                    );
                }
                s += &format!(
                    "restart of node {}: /health after {:.0} ms, ready and caught up after {:.0} ms, \
                     RSS {:.1} MB ({:.1} MB {} s later); {} leases and the sampled keys and locks {}",
                    r.restarted,
                    r.restart_health_ms,
                    r.restart_ready_ms,
                    r.restarted_rss_mb,
                    r.restarted_settled_rss_mb,
                    SETTLE.as_secs(),
                    r.restarted_leases,
                    if r.restarted_sample_ok { "found" } else { "NOT found" }
                );
                s
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------

#[derive(Clone)]
struct Http(reqwest::Client);

impl Http {
    fn new() -> anyhow::Result<Http> {
        Ok(Http(
            reqwest::Client::builder()
                .no_proxy()
                .tcp_nodelay(true)
                .build()?,
        ))
    }

    /// One request; the answer, or an error code (`connect`, `timeout`, the API's code...).
    async fn send(
        &self,
        method: Method,
        addr: &str,
        path: &str,
        body: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, String> {
        let mut req = self
            .0
            .request(method, format!("http://{addr}{path}"))
            .timeout(timeout);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| transport_code(&e))?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            Ok(v)
        } else {
            Err(v["error"]["code"]
                .as_str()
                .map_or_else(|| format!("http_{}", status.as_u16()), str::to_string))
        }
    }

    /// Retry over `addrs` (20 ms apart) until it succeeds or `within` is over.
    async fn retry(
        &self,
        addrs: &[String],
        method: Method,
        path: &str,
        body: Value,
        within: Duration,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + within;
        let mut last = String::new();
        for i in 0.. {
            let addr = &addrs[i % addrs.len()];
            match self
                .send(
                    method.clone(),
                    addr,
                    path,
                    Some(body.clone()),
                    Duration::from_secs(10),
                )
                .await
            {
                Ok(v) => return Ok(v),
                Err(code) => last = format!("{addr}{path}: {code}"),
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(anyhow!("{last}"))
    }
}

async fn grant(http: &Http, addrs: &[String], ttl: Duration) -> anyhow::Result<u64> {
    let body = json!({"ttl_ms": ttl.as_millis() as u64, "owner": "concord perf",
        "request_id": new_request_id()});
    let v = http
        .retry(
            addrs,
            Method::POST,
            "/v1/leases",
            body,
            Duration::from_secs(30),
        )
        .await?;
    v["lease_id"]
        .as_u64()
        .ok_or_else(|| anyhow!("lease grant answered without lease_id: {v}"))
}

async fn acquire(
    http: &Http,
    addrs: &[String],
    lock: &str,
    lease: u64,
    wait: Duration,
) -> anyhow::Result<u64> {
    let path = format!("/v1/locks/{}/acquire", encode_segment(lock));
    let body = json!({"lease_id": lease, "wait_ms": wait.as_millis() as u64,
        "request_id": new_request_id()});
    let v = http
        .retry(addrs, Method::POST, &path, body, Duration::from_secs(30))
        .await?;
    v["token"]
        .as_u64()
        .ok_or_else(|| anyhow!("acquire answered without a token: {v}"))
}

/// Wait until the cluster has a leader that takes a write; its id.
async fn wait_writable(cluster: &ProcCluster, http: &Http) -> anyhow::Result<u64> {
    let addrs: Vec<String> = cluster.addrs.values().cloned().collect();
    let body = json!({"value": "x", "request_id": new_request_id()});
    http.retry(
        &addrs,
        Method::PUT,
        "/v1/kv/perf/ping",
        body,
        Duration::from_secs(30),
    )
    .await
    .context("the cluster did not take a write")?;
    for _ in 0..300 {
        if let Some(l) = cluster.leader().await {
            return Ok(l);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("no leader named")
}

/// Wait until node `id` answers `/ready` with an applied index of at least `index`.
async fn wait_caught_up(http: &Http, addr: &str, index: u64, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(v) = http
            .send(Method::GET, addr, "/ready", None, Duration::from_secs(1))
            .await
        {
            if v["applied_index"].as_u64().unwrap_or(0) >= index {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn start_cluster(args: &PerfArgs) -> anyhow::Result<ProcCluster> {
    let bin = match &args.bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?,
    };
    if args.out.exists() {
        std::fs::remove_dir_all(&args.out)
            .with_context(|| format!("emptying {}", args.out.display()))?;
    }
    std::fs::create_dir_all(&args.out)?;
    ProcCluster::start(bin, &args.out, 3, false, Net::Loopback, &args.serve_args)
}

pub async fn run(args: PerfArgs) -> anyhow::Result<PerfReport> {
    anyhow::ensure!(args.trials >= 1, "--trials must be at least 1");
    anyhow::ensure!(args.clients >= 1, "--clients must be at least 1");
    let mut cluster = start_cluster(&args)?;
    let http = Http::new()?;
    wait_writable(&cluster, &http).await?;
    let report = match args.scenario {
        Scenario::Failover => PerfReport::Failover(failover(&mut cluster, &http, &args).await?),
        Scenario::Handoff => PerfReport::Handoff(handoff(&cluster, &http, &args).await?),
        Scenario::Resources => PerfReport::Resources(resources(&mut cluster, &http, &args).await?),
    };
    Ok(report)
}

// ---------------------------------------------------------------------------------------
// Failover
// ---------------------------------------------------------------------------------------

/// What the writers of one trial saw.
#[derive(Default)]
struct Seen {
    kill_at: Option<Instant>,
    /// The first completion of a write sent at or after `kill_at`.
    first_ok_after_kill: Option<Instant>,
}

async fn writer(
    http: Http,
    addrs: Vec<String>,
    i: usize,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
) {
    let mut at = i % addrs.len();
    let key = format!("/v1/kv/{}", encode_path(&format!("perf/failover/w{i}")));
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let sent = Instant::now();
        let body = json!({"value": n.to_string(), "request_id": new_request_id()});
        let res = http
            .send(
                Method::PUT,
                &addrs[at],
                &key,
                Some(body),
                Duration::from_secs(2),
            )
            .await;
        let done = Instant::now();
        match res {
            Ok(_) => {
                let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
                if s.kill_at.is_some_and(|k| sent >= k) {
                    s.first_ok_after_kill =
                        Some(s.first_ok_after_kill.map_or(done, |f| f.min(done)));
                }
            }
            Err(_) => {
                at = (at + 1) % addrs.len();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Poll the survivors every 10 ms until both name the same leader other than `old`.
async fn new_leader_named(
    http: &Http,
    survivors: &[String],
    old: u64,
    within: Duration,
) -> Option<Instant> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let mut named = Vec::new();
        for addr in survivors {
            let v = http
                .send(
                    Method::GET,
                    addr,
                    "/v1/cluster",
                    None,
                    Duration::from_millis(500),
                )
                .await
                .ok();
            named.push(v.and_then(|v| v["leader"].as_u64()));
        }
        if named.iter().all(|l| l.is_some_and(|l| l != old))
            && named.windows(2).all(|w| w[0] == w[1])
        {
            return Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

async fn failover(
    cluster: &mut ProcCluster,
    http: &Http,
    args: &PerfArgs,
) -> anyhow::Result<FailoverReport> {
    let addrs: Vec<String> = cluster.addrs.values().cloned().collect();
    let mut first_write = Vec::new();
    let mut new_leader = Vec::new();
    let mut failed = 0;
    for trial in 0..args.trials {
        let leader = wait_writable(cluster, http).await?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..args.clients as usize)
            .map(|i| {
                tokio::spawn(writer(
                    http.clone(),
                    addrs.clone(),
                    i,
                    seen.clone(),
                    stop.clone(),
                ))
            })
            .collect();
        // Under load for a second, then kill the leader.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let survivors: Vec<String> = cluster
            .addrs
            .iter()
            .filter(|(id, _)| **id != leader)
            .map(|(_, a)| a.clone())
            .collect();
        let kill_at = Instant::now();
        seen.lock().unwrap_or_else(|e| e.into_inner()).kill_at = Some(kill_at);
        cluster.kill(leader);
        let named = new_leader_named(http, &survivors, leader, Duration::from_secs(30)).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        let first = loop {
            if let Some(f) = seen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .first_ok_after_kill
            {
                break Some(f);
            }
            if Instant::now() >= deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            let _ = w.await;
        }
        match first {
            Some(f) => first_write.push(ms(f - kill_at)),
            None => failed += 1,
        }
        if let Some(n) = named {
            new_leader.push(ms(n - kill_at));
        }
        eprintln!(
            "perf failover: trial {}: killed node {leader}; first write after {}, new leader after {}",
            trial + 1,
            first.map_or("-".into(), |f| format!("{:.0} ms", ms(f - kill_at))),
            named.map_or("-".into(), |n| format!("{:.0} ms", ms(n - kill_at))),
        );
        // Bring the node back and let it catch up before the next trial.
        cluster.spawn(leader)?;
        let commit = commit_index(http, &survivors).await;
        if !wait_caught_up(
            http,
            &cluster.addrs[&leader],
            commit,
            Duration::from_secs(30),
        )
        .await
        {
            bail!("node {leader} did not catch up after its restart");
        }
    }
    Ok(FailoverReport {
        clients: args.clients,
        first_write_ms: Distribution::of(first_write)
            .ok_or_else(|| anyhow!("no trial saw a write after the kill"))?,
        new_leader_ms: Distribution::of(new_leader),
        failed_trials: failed,
    })
}

/// The highest commit index any of `addrs` reports.
async fn commit_index(http: &Http, addrs: &[String]) -> u64 {
    let mut best = 0;
    for addr in addrs {
        if let Ok(v) = http
            .send(
                Method::GET,
                addr,
                "/v1/cluster",
                None,
                Duration::from_secs(2),
            )
            .await
        {
            best = best.max(v["commit_index"].as_u64().unwrap_or(0));
        }
    }
    best
}

// ---------------------------------------------------------------------------------------
// Hand-off after a lease expiry
// ---------------------------------------------------------------------------------------

async fn handoff(
    cluster: &ProcCluster,
    http: &Http,
    args: &PerfArgs,
) -> anyhow::Result<HandoffReport> {
    let addrs: Vec<String> = cluster.addrs.values().cloned().collect();
    let mut after_expiry = Vec::new();
    let mut after_renewal = Vec::new();
    let mut early = 0;
    for trial in 0..args.trials {
        let lock = format!("perf/handoff/{}/{trial}", new_request_id());
        let holder = grant(http, &addrs, args.ttl).await?;
        let waiter = grant(http, &addrs, Duration::from_secs(600)).await?;
        let t1 = acquire(http, &addrs, &lock, holder, Duration::ZERO).await?;
        // The waiter queues behind the holder.
        let wait = args.ttl + Duration::from_secs(30);
        let waiting = {
            let (http, addrs, lock) = (http.clone(), addrs.clone(), lock.clone());
            tokio::spawn(async move {
                let r = acquire(&http, &addrs, &lock, waiter, wait).await;
                (r, Instant::now())
            })
        };
        // The holder renews once, halfway, and then goes silent.
        tokio::time::sleep(args.ttl / 2).await;
        let renewed_at = Instant::now();
        let path = format!("/v1/leases/{holder}/keepalive");
        http.retry(
            &addrs,
            Method::POST,
            &path,
            json!({}),
            Duration::from_secs(5),
        )
        .await
        .context("the holder's keepalive")?;
        let (granted, granted_at) = waiting.await?;
        let t2 = granted?;
        anyhow::ensure!(
            t2 > t1,
            "the waiter's token {t2} is not above the holder's {t1}"
        );
        let guaranteed_until = renewed_at + args.ttl;
        let late = if granted_at >= guaranteed_until {
            ms(granted_at - guaranteed_until)
        } else {
            early += 1;
            -ms(guaranteed_until - granted_at)
        };
        after_expiry.push(late);
        after_renewal.push(ms(granted_at - renewed_at));
        eprintln!(
            "perf handoff: trial {}: granted {late:.0} ms after renewal + TTL",
            trial + 1
        );
        let path = format!("/v1/leases/{waiter}");
        let _ = http
            .send(
                Method::DELETE,
                &addrs[0],
                &path,
                None,
                Duration::from_secs(5),
            )
            .await;
    }
    Ok(HandoffReport {
        ttl_ms: args.ttl.as_millis() as u64,
        after_expiry_ms: Distribution::of(after_expiry).ok_or_else(|| anyhow!("no trials"))?,
        after_renewal_ms: Distribution::of(after_renewal).ok_or_else(|| anyhow!("no trials"))?,
        early_grants: early,
    })
}

// ---------------------------------------------------------------------------------------
// Resources
// ---------------------------------------------------------------------------------------

/// `VmRSS` and `VmHWM` of a process, in MB.
fn rss_mb(pid: u32) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

fn dir_mb(dir: &std::path::Path) -> f64 {
    fn walk(p: &std::path::Path) -> u64 {
        let Ok(rd) = std::fs::read_dir(p) else {
            return 0;
        };
        rd.flatten()
            .map(|e| match e.metadata() {
                Ok(m) if m.is_dir() => walk(&e.path()),
                Ok(m) => m.len(),
                Err(_) => 0,
            })
            .sum()
    }
    walk(dir) as f64 / (1024.0 * 1024.0)
}

/// Run `op(i, endpoints)` for `i` in `0..n`, 64 at a time, each with `addrs` rotated by `i`
/// so the load spreads over the nodes; the answers in order, or how many failed and one error.
async fn load<T, F, Fut>(addrs: &[String], n: u64, what: &str, op: F) -> anyhow::Result<Vec<T>>
where
    F: Fn(u64, Vec<String>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    use futures::StreamExt;
    let results: Vec<anyhow::Result<T>> = futures::stream::iter((0..n).map(|i| {
        let mut order = addrs.to_vec();
        order.rotate_left(i as usize % addrs.len());
        op(i, order)
    }))
    .buffered(64)
    .collect()
    .await;
    let failed = results.iter().filter(|r| r.is_err()).count();
    let mut out = Vec::with_capacity(results.len());
    for r in results {
        match r {
            Ok(v) => out.push(v),
            Err(e) => bail!("{failed} of {n} {what} failed; one: {e:#}"),
        }
    }
    Ok(out)
}

async fn resources(
    cluster: &mut ProcCluster,
    http: &Http,
    args: &PerfArgs,
) -> anyhow::Result<ResourcesReport> {
    anyhow::ensure!(
        args.leases >= 1 || args.locks == 0,
        "--locks needs --leases >= 1"
    );
    let addrs: Vec<String> = cluster.addrs.values().cloned().collect();
    let value: String = "v".repeat(256);
    let started = Instant::now();
    load(&addrs, args.keys, "puts", |i, order| {
        let path = format!("/v1/kv/{}", encode_path(&format!("perf/keys/{i:08}")));
        let body = json!({"value": value, "request_id": new_request_id()});
        async move {
            http.retry(&order, Method::PUT, &path, body, Duration::from_secs(30))
                .await
        }
    })
    .await?;
    let ids = load(&addrs, args.leases, "lease grants", |_, order| async move {
        grant(http, &order, Duration::from_secs(3600)).await
    })
    .await?;
    load(&addrs, args.locks, "lock acquires", |i, order| {
        let lock = format!("perf-lock-{i}");
        let lease = ids[(i % args.leases.max(1)) as usize];
        async move { acquire(http, &order, &lock, lease, Duration::ZERO).await }
    })
    .await?;
    let load_s = started.elapsed().as_secs_f64();
    let leader = wait_writable(cluster, http).await?;
    let applied_index = commit_index(http, &addrs).await;
    for addr in &addrs {
        anyhow::ensure!(
            wait_caught_up(http, addr, applied_index, Duration::from_secs(60)).await,
            "{addr} did not apply the load"
        );
    }
    let mut nodes = Vec::new();
    for (id, _) in cluster.addrs.clone() {
        let pid = cluster
            .pid(id)
            .ok_or_else(|| anyhow!("node {id} is not running"))?;
        let (rss, peak) = rss_mb(pid).ok_or_else(|| anyhow!("no /proc/{pid}/status"))?;
        nodes.push(NodeMemory {
            id,
            rss_mb: rss,
            peak_rss_mb: peak,
            data_mb: dir_mb(&args.out.join(format!("n{id}"))),
        });
    }
    // Restart a follower with everything on disk.
    let restarted = *cluster
        .addrs
        .keys()
        .find(|id| **id != leader)
        .ok_or_else(|| anyhow!("no follower"))?;
    let addr = cluster.addrs[&restarted].clone();
    let others: Vec<String> = addrs.iter().filter(|a| **a != addr).cloned().collect();
    cluster.kill(restarted);
    let commit = commit_index(http, &others).await;
    let spawned = Instant::now();
    cluster.spawn(restarted)?;
    let health = loop {
        if http
            .send(
                Method::GET,
                &addr,
                "/health",
                None,
                Duration::from_millis(200),
            )
            .await
            .is_ok()
        {
            break spawned.elapsed();
        }
        anyhow::ensure!(
            spawned.elapsed() < Duration::from_secs(120),
            "node {restarted} did not start"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    anyhow::ensure!(
        wait_caught_up(http, &addr, commit, Duration::from_secs(120)).await,
        "node {restarted} did not catch up after its restart"
    );
    let ready = spawned.elapsed();
    let pid = cluster
        .pid(restarted)
        .ok_or_else(|| anyhow!("node {restarted} is not running"))?;
    let (restarted_rss, _) = rss_mb(pid).ok_or_else(|| anyhow!("no /proc/{pid}/status"))?;
    // What it serves from its own state.
    let stale = |path: String| {
        let addr = addr.clone();
        async move {
            http.send(Method::GET, &addr, &path, None, Duration::from_secs(30))
                .await
                .ok()
        }
    };
    let leases_v = stale("/v1/leases?consistency=stale".into()).await;
    let restarted_leases = leases_v
        .as_ref()
        .and_then(|v| v["leases"].as_array())
        .map_or(0, |a| a.len() as u64);
    let mut sample_ok = true;
    for i in [0, args.keys / 2, args.keys.saturating_sub(1)]
        .into_iter()
        .filter(|_| args.keys > 0)
    {
        let path = format!(
            "/v1/kv/{}?consistency=stale",
            encode_path(&format!("perf/keys/{i:08}"))
        );
        sample_ok &= stale(path)
            .await
            .is_some_and(|v| v["value"] == value.as_str());
    }
    for i in [0, args.locks / 2, args.locks.saturating_sub(1)]
        .into_iter()
        .filter(|_| args.locks > 0)
    {
        let path = format!(
            "/v1/locks/{}?consistency=stale",
            encode_segment(&format!("perf-lock-{i}"))
        );
        let want = ids[(i % args.leases.max(1)) as usize];
        sample_ok &= stale(path)
            .await
            .is_some_and(|v| v["holder"]["lease_id"] == want);
    }
    let settle_from = spawned + ready + SETTLE;
    tokio::time::sleep_until(settle_from.into()).await;
    let (settled_rss, _) = rss_mb(pid).ok_or_else(|| anyhow!("no /proc/{pid}/status"))?;
    Ok(ResourcesReport {
        keys: args.keys,
        leases: args.leases,
        locks: args.locks,
        load_s,
        applied_index,
        nodes,
        restarted,
        restart_health_ms: ms(health),
        restart_ready_ms: ms(ready),
        restarted_rss_mb: restarted_rss,
        restarted_settled_rss_mb: settled_rss,
        restarted_leases,
        restarted_sample_ok: sample_ok,
    })
}

/// The error code of a request that got no answer: `timeout`, `connect` or `transport`.
fn transport_code(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timeout".into()
    } else if e.is_connect() {
        "connect".into()
    } else {
        "transport".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distribution_of_samples() {
        assert_eq!(Distribution::of(vec![]), None);
        let d = Distribution::of(vec![5.0, 1.0, 3.0]).unwrap();
        assert_eq!((d.min, d.median, d.p90, d.max), (1.0, 3.0, 5.0, 5.0));
        assert_eq!(d.trials, vec![5.0, 1.0, 3.0], "trials keep their order");
        let d = Distribution::of((1..=10).map(f64::from).collect()).unwrap();
        assert_eq!((d.median, d.p90), (5.5, 9.0));
    }
}
