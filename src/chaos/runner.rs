//! `concord chaos`: start a cluster of real processes, drive it with concurrent clients, inject
//! faults on a seeded schedule, heal, wait for recovery, check the history.
//!
//! Clients send one HTTP request per operation to one node, with a timeout, and record the
//! outcome: `ok`, `fail` (a definite error: the command did not take effect), or `info`
//! (timeout, cut connection, 5xx: unknown). After an `info` the client's process id is retired
//! and a fresh one continues, as in Jepsen, so every process has at most one open operation.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::check::{self, Violation};
use super::history::{Event, History, Kind, OpKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// Read, write and compare-and-set on a few keys; checked for linearizability.
    Register,
    /// Acquire a lock, write a register fenced by the token, release; checked for lock safety.
    Lock,
    /// Acquire one permit of a capacity-2 semaphore, hold it briefly, release; checked for
    /// permits in use never exceeding the capacity.
    Semaphore,
    /// Wait at a barrier of 3 parties, over and over; checked that every generation releases
    /// all-or-nothing. Needs `--clients` >= 3.
    Barrier,
    /// Take a short lease and the lock, write fenced by the token, then release or abandon the
    /// hold and let the lease expire; checked for lock safety and that no hold ends early.
    Lease,
    /// Clients take turns at `register`, `lock`, `semaphore`, `lease` and `barrier` (the barrier
    /// clients wait for each other: parties = their number).
    Mixed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Nemesis {
    None,
    /// kill -9 the leader or a random node, restart it after the fault period.
    Kill,
    /// SIGSTOP the leader or a random node for longer than the election timeout, then SIGCONT.
    Pause,
    /// Cut links with the nodes' fault switches: isolate the leader or a node, halves, bridge
    /// (5+ nodes), ring (5+ nodes).
    Partition,
    /// All of the above, chosen at random.
    Mixed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Net {
    /// Nodes on 127.0.0.1; partitions through each node's link fault switch.
    Loopback,
    /// Each node in its own network namespace behind a veth on a private bridge; partitions
    /// are iptables DROP rules inside the namespaces (a real network cut). Needs root.
    Netns,
}

#[derive(Debug, Clone, Args)]
pub struct ChaosArgs {
    #[arg(long, default_value_t = 3)]
    pub nodes: u64,
    #[arg(long, value_enum, default_value = "register")]
    pub workload: Workload,
    #[arg(long, value_enum, default_value = "partition")]
    pub nemesis: Nemesis,
    /// Length of the faulty phase, e.g. `60s`, `10m`.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Seed of the fault schedule and the clients' choices (random if absent; printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Where the history, the summary and the node logs go.
    #[arg(long, default_value = "chaos-out")]
    pub out: PathBuf,
    /// Concurrent client processes.
    #[arg(long, default_value_t = 6)]
    pub clients: usize,
    /// Register keys.
    #[arg(long, default_value_t = 3)]
    pub keys: usize,
    /// The cluster must serve writes again within this long after the final heal.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub recovery_bound: Duration,
    /// Start the nodes with the deliberately unsafe `--unsafe-stale-reads` (checker self-test).
    #[arg(long)]
    pub unsafe_stale_reads: bool,
    /// The `concord` binary to start (default: this one).
    #[arg(long)]
    pub bin: Option<PathBuf>,
    /// How nodes are networked (and so how partitions are made).
    #[arg(long, value_enum, default_value = "loopback")]
    pub net: Net,
    /// Instead of starting processes, drive the docker-compose project of this name (nodes
    /// n1..nN on 127.0.0.1:7701..): kill/restart, pause/unpause and disconnect containers.
    #[arg(long)]
    pub compose: Option<String>,
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mul) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3_600_000)
    } else {
        (s, 1000)
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("bad duration {s:?}"))?;
    Ok(Duration::from_millis(n * mul))
}

// ---------------------------------------------------------------------------------------
// The cluster of processes
// ---------------------------------------------------------------------------------------

/// The private network of a `--net netns` run.
struct Netns {
    /// Third octet of 10.233.X.0/24, also in every interface and namespace name.
    x: u32,
}

impl Netns {
    fn ns(&self, id: u64) -> String {
        format!("cc{}n{id}", self.x)
    }

    fn ip(&self, id: u64) -> String {
        format!("10.233.{}.{id}", self.x)
    }

    fn bridge(&self) -> String {
        format!("ccbr{}", self.x)
    }

    fn sh(args: &[&str]) -> anyhow::Result<()> {
        let st = Command::new(args[0])
            .args(&args[1..])
            .stderr(Stdio::null())
            .status()?;
        anyhow::ensure!(st.success(), "command failed: {}", args.join(" "));
        Ok(())
    }

    fn create(n: u64) -> anyhow::Result<Netns> {
        let net = Netns {
            x: std::process::id() % 250,
        };
        net.destroy(n);
        let br = net.bridge();
        Self::sh(&["ip", "link", "add", &br, "type", "bridge"])?;
        Self::sh(&[
            "ip",
            "addr",
            "add",
            &format!("10.233.{}.254/24", net.x),
            "dev",
            &br,
        ])?;
        Self::sh(&["ip", "link", "set", &br, "up"])?;
        // Docker sets the FORWARD policy to DROP, and with br_netfilter bridged frames pass
        // through it: let traffic between our own namespaces through.
        Self::sh(&[
            "iptables", "-I", "FORWARD", "-i", &br, "-o", &br, "-j", "ACCEPT",
        ])?;
        for id in 1..=n {
            let ns = net.ns(id);
            let (host, peer) = (format!("cc{}v{id}", net.x), format!("cc{}p{id}", net.x));
            Self::sh(&["ip", "netns", "add", &ns])?;
            Self::sh(&[
                "ip", "link", "add", &host, "type", "veth", "peer", "name", &peer,
            ])?;
            Self::sh(&["ip", "link", "set", &peer, "netns", &ns])?;
            Self::sh(&["ip", "link", "set", &host, "master", &br])?;
            Self::sh(&["ip", "link", "set", &host, "up"])?;
            Self::sh(&[
                "ip",
                "netns",
                "exec",
                &ns,
                "ip",
                "addr",
                "add",
                &format!("{}/24", net.ip(id)),
                "dev",
                &peer,
            ])?;
            Self::sh(&["ip", "netns", "exec", &ns, "ip", "link", "set", &peer, "up"])?;
            Self::sh(&["ip", "netns", "exec", &ns, "ip", "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    /// Drop all traffic between node `id` and the nodes in `blocked`, both directions.
    fn set_blocked(&self, id: u64, blocked: &BTreeSet<u64>) {
        let ns = self.ns(id);
        let _ = Self::sh(&["ip", "netns", "exec", &ns, "iptables", "-F"]);
        for b in blocked {
            let ip = self.ip(*b);
            let _ = Self::sh(&[
                "ip", "netns", "exec", &ns, "iptables", "-A", "INPUT", "-s", &ip, "-j", "DROP",
            ]);
            let _ = Self::sh(&[
                "ip", "netns", "exec", &ns, "iptables", "-A", "OUTPUT", "-d", &ip, "-j", "DROP",
            ]);
        }
    }

    fn destroy(&self, n: u64) {
        for id in 1..=n {
            let _ = Self::sh(&["ip", "netns", "del", &self.ns(id)]);
            let _ = Self::sh(&["ip", "link", "del", &format!("cc{}v{id}", self.x)]);
        }
        let br = self.bridge();
        while Self::sh(&[
            "iptables", "-D", "FORWARD", "-i", &br, "-o", &br, "-j", "ACCEPT",
        ])
        .is_ok()
        {}
        let _ = Self::sh(&["ip", "link", "del", &br]);
    }
}

pub(crate) struct ProcCluster {
    /// `Some`: every node runs in its own network namespace.
    netns: Option<Netns>,
    /// `Some(project)`: the nodes are docker-compose containers, not child processes.
    compose: Option<String>,
    /// Compose nodes currently killed.
    down: BTreeSet<u64>,
    bin: PathBuf,
    dir: PathBuf,
    pub(crate) addrs: BTreeMap<u64, String>,
    children: BTreeMap<u64, Child>,
    unsafe_reads: bool,
    http: reqwest::Client,
    /// More `concord serve` arguments for every node.
    extra_args: Vec<String>,
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl ProcCluster {
    pub(crate) fn start(
        bin: PathBuf,
        dir: &Path,
        n: u64,
        unsafe_reads: bool,
        net: Net,
        extra_args: &[String],
    ) -> anyhow::Result<ProcCluster> {
        let netns = match net {
            Net::Netns => Some(Netns::create(n)?),
            Net::Loopback => None,
        };
        let mut addrs = BTreeMap::new();
        for id in 1..=n {
            let addr = match &netns {
                Some(ns) => format!("{}:7700", ns.ip(id)),
                None => format!("127.0.0.1:{}", free_port()?),
            };
            addrs.insert(id, addr);
        }
        let mut c = ProcCluster {
            netns,
            compose: None,
            down: BTreeSet::new(),
            bin,
            dir: dir.to_path_buf(),
            addrs,
            children: BTreeMap::new(),
            unsafe_reads,
            http: reqwest::Client::builder().no_proxy().build()?,
            extra_args: extra_args.to_vec(),
        };
        for id in 1..=n {
            c.spawn(id)?;
        }
        Ok(c)
    }

    /// Attach to a running docker-compose cluster.
    fn attach_compose(project: &str, n: u64) -> anyhow::Result<ProcCluster> {
        Ok(ProcCluster {
            netns: None,
            compose: Some(project.to_string()),
            down: BTreeSet::new(),
            bin: PathBuf::new(),
            dir: PathBuf::new(),
            addrs: (1..=n)
                .map(|id| (id, format!("127.0.0.1:{}", 7700 + id)))
                .collect(),
            children: BTreeMap::new(),
            unsafe_reads: false,
            http: reqwest::Client::builder().no_proxy().build()?,
            extra_args: Vec::new(),
        })
    }

    fn container(&self, id: u64) -> Option<String> {
        self.compose.as_ref().map(|p| format!("{p}_n{id}_1"))
    }

    fn docker(args: &[&str]) {
        let _ = Command::new("docker")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    fn is_up(&self, id: u64) -> bool {
        match self.compose {
            Some(_) => !self.down.contains(&id),
            None => self.children.contains_key(&id),
        }
    }

    /// Cut a compose node off the network (a real network partition), or reconnect it.
    fn disconnect(&self, id: u64, cut: bool) {
        if let (Some(p), Some(c)) = (&self.compose, self.container(id)) {
            let net = format!("{p}_default");
            if cut {
                Self::docker(&["network", "disconnect", &net, &c]);
            } else {
                Self::docker(&["network", "connect", "--alias", &format!("n{id}"), &net, &c]);
            }
        }
    }

    pub(crate) fn spawn(&mut self, id: u64) -> anyhow::Result<()> {
        if let Some(c) = self.container(id) {
            Self::docker(&["start", &c]);
            self.down.remove(&id);
            return Ok(());
        }
        let initial: Vec<String> = self.addrs.iter().map(|(i, a)| format!("{i}={a}")).collect();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("n{id}.log")))?;
        let mut cmd = match &self.netns {
            Some(net) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &net.ns(id)]).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        cmd.arg("serve")
            .args(["--id", &id.to_string()])
            .args(["--listen", &self.addrs[&id]])
            .arg("--data-dir")
            .arg(self.dir.join(format!("n{id}")))
            .args(["--initial-cluster", &initial.join(",")])
            .arg("--enable-fault-injection")
            .stdout(Stdio::null())
            .stderr(log);
        if self.unsafe_reads {
            cmd.arg("--unsafe-stale-reads");
        }
        cmd.args(&self.extra_args);
        self.children.insert(id, cmd.spawn()?);
        Ok(())
    }

    fn signal(&self, id: u64, sig: &str) {
        if let Some(c) = self.container(id) {
            Self::docker(&[if sig == "-STOP" { "pause" } else { "unpause" }, &c]);
            return;
        }
        if let Some(c) = self.children.get(&id) {
            let _ = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status();
        }
    }

    /// The process id of a node started as a child process.
    pub(crate) fn pid(&self, id: u64) -> Option<u32> {
        self.children.get(&id).map(Child::id)
    }

    pub(crate) fn kill(&mut self, id: u64) {
        if let Some(c) = self.container(id) {
            Self::docker(&["kill", &c]);
            self.down.insert(id);
            return;
        }
        if let Some(mut c) = self.children.remove(&id) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    async fn set_blocked(&self, id: u64, blocked: &BTreeSet<u64>) {
        if let Some(net) = &self.netns {
            net.set_blocked(id, blocked);
            return;
        }
        let url = format!("http://{}/admin/faults", self.addrs[&id]);
        let _ = self
            .http
            .post(url)
            .json(&json!({ "blocked": blocked }))
            .timeout(Duration::from_secs(2))
            .send()
            .await;
    }

    /// The leader most running nodes name.
    pub(crate) async fn leader(&self) -> Option<u64> {
        let mut votes: BTreeMap<u64, usize> = BTreeMap::new();
        for (id, addr) in &self.addrs {
            if !self.is_up(*id) {
                continue;
            }
            let r = self
                .http
                .get(format!("http://{addr}/v1/cluster"))
                .timeout(Duration::from_millis(500))
                .send()
                .await;
            if let Ok(r) = r {
                if let Ok(v) = r.json::<Value>().await {
                    if let Some(l) = v["leader"].as_u64() {
                        *votes.entry(l).or_default() += 1;
                    }
                }
            }
        }
        votes.into_iter().max_by_key(|(_, n)| *n).map(|(l, _)| l)
    }

    fn stop_all(&mut self) {
        if self.compose.is_some() {
            // The compose project outlives the run; leave every node running and connected.
            let ids: Vec<u64> = self.addrs.keys().copied().collect();
            for id in ids {
                self.signal(id, "-CONT");
                self.disconnect(id, false);
                if self.down.contains(&id) {
                    let _ = self.spawn(id);
                }
            }
            return;
        }
        let ids: Vec<u64> = self.children.keys().copied().collect();
        for id in ids {
            self.signal(id, "-CONT");
            self.kill(id);
        }
    }
}

impl Drop for ProcCluster {
    fn drop(&mut self) {
        self.stop_all();
        if let Some(net) = &self.netns {
            net.destroy(self.addrs.len() as u64);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Recording clients
// ---------------------------------------------------------------------------------------

struct Recorder {
    start: Instant,
    history: Mutex<History>,
    next_process: AtomicU64,
}

impl Recorder {
    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn new_process(&self) -> u64 {
        self.next_process.fetch_add(1, Ordering::Relaxed)
    }

    fn record(&self, e: Event) {
        self.history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(e);
    }
}

enum Outcome {
    Ok(Value),
    Fail(String),
    Info(String),
}

async fn call(
    http: &reqwest::Client,
    addr: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
    timeout: Duration,
) -> Outcome {
    let outcome = call_once(http, addr, method, path, body, timeout).await;
    // Back off a little after an unavailable node, as a real client would, instead of
    // spinning on fast 503s and refused connections.
    let unavailable = match &outcome {
        Outcome::Info(_) => true,
        Outcome::Fail(code) => code == "connect",
        Outcome::Ok(_) => false,
    };
    if unavailable {
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    outcome
}

async fn call_once(
    http: &reqwest::Client,
    addr: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
    timeout: Duration,
) -> Outcome {
    let mut req = http
        .request(method, format!("http://{addr}{path}"))
        .timeout(timeout);
    if let Some(b) = body {
        req = req.json(&b);
    }
    match req.send().await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let v: Value = resp.json().await.unwrap_or(Value::Null);
            let code = v["error"]["code"].as_str().unwrap_or("unknown").to_string();
            match status {
                200..=299 => Outcome::Ok(v),
                // Answered by the state machine or rejected before proposing: no effect.
                400..=499 => Outcome::Fail(code),
                // 5xx may come after the command was proposed: unknown.
                _ => Outcome::Info(code),
            }
        }
        // Never sent: a definite failure.
        Err(e) if e.is_connect() => Outcome::Fail("connect".into()),
        Err(e) if e.is_timeout() => Outcome::Info("timeout".into()),
        Err(_) => Outcome::Info("connection".into()),
    }
}

struct Shared {
    rec: Recorder,
    http: reqwest::Client,
    addrs: Vec<(u64, String)>,
    stop: AtomicBool,
    next_value: AtomicI64,
    keys: usize,
}

const OP_TIMEOUT: Duration = Duration::from_secs(2);

/// Finish an operation: record the completion; retire the process after an `info`.
fn complete(sh: &Shared, process: &mut u64, mut done: Event, outcome: &Outcome) {
    match outcome {
        Outcome::Ok(_) => done.kind = Kind::Ok,
        Outcome::Fail(code) => {
            done.kind = Kind::Fail;
            done.error = Some(code.clone());
        }
        Outcome::Info(code) => {
            done.kind = Kind::Info;
            done.error = Some(code.clone());
        }
    }
    done.time_ns = sh.rec.now();
    let info = matches!(outcome, Outcome::Info(_));
    sh.rec.record(done);
    if info {
        *process = sh.rec.new_process();
    }
}

fn parse_value(v: &Value) -> Option<i64> {
    v["value"].as_str().and_then(|s| s.parse().ok())
}

/// A linearizable read, recorded. Returns (value, version) on success.
async fn recorded_read(
    sh: &Shared,
    process: &mut u64,
    key: &str,
    node: usize,
) -> Option<(Option<i64>, u64)> {
    let (id, addr) = &sh.addrs[node];
    let mut inv = Event::new(*process, Kind::Invoke, OpKind::Read, key, sh.rec.now());
    inv.node = Some(*id);
    sh.rec.record(inv.clone());
    let outcome = call(
        &sh.http,
        addr,
        reqwest::Method::GET,
        &format!("/v1/kv/{key}"),
        None,
        OP_TIMEOUT,
    )
    .await;
    // A missing key is a successful read of "absent".
    let outcome = match outcome {
        Outcome::Fail(code) if code == "not_found" => Outcome::Ok(Value::Null),
        o => o,
    };
    let mut done = inv;
    let result = match &outcome {
        Outcome::Ok(v) => {
            done.value = parse_value(v);
            Some((done.value, v["version"].as_u64().unwrap_or(0)))
        }
        _ => None,
    };
    complete(sh, process, done, &outcome);
    result
}

async fn register_client(sh: Arc<Shared>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut process = sh.rec.new_process();
    while !sh.stop.load(Ordering::Relaxed) {
        let key = format!("r{}", rng.gen_range(0..sh.keys));
        let node = rng.gen_range(0..sh.addrs.len());
        let (id, addr) = sh.addrs[node].clone();
        match rng.gen_range(0..10) {
            0..=3 => {
                recorded_read(&sh, &mut process, &key, node).await;
            }
            4..=6 => {
                let value = sh.next_value.fetch_add(1, Ordering::Relaxed);
                let mut inv = Event::new(process, Kind::Invoke, OpKind::Write, &key, sh.rec.now());
                inv.value = Some(value);
                inv.node = Some(id);
                sh.rec.record(inv.clone());
                let body = json!({"value": value.to_string()});
                let outcome = call(
                    &sh.http,
                    &addr,
                    reqwest::Method::PUT,
                    &format!("/v1/kv/{key}"),
                    Some(body),
                    OP_TIMEOUT,
                )
                .await;
                let mut done = inv;
                if let Outcome::Ok(v) = &outcome {
                    done.revision = v["revision"].as_u64();
                }
                complete(&sh, &mut process, done, &outcome);
            }
            _ => {
                // Compare-and-set by value: read the current (value, version), then write
                // conditionally on that version. Values are unique, so "version unchanged" is
                // exactly "value unchanged".
                let Some((current, version)) = recorded_read(&sh, &mut process, &key, node).await
                else {
                    continue;
                };
                let value = sh.next_value.fetch_add(1, Ordering::Relaxed);
                let mut inv = Event::new(process, Kind::Invoke, OpKind::Cas, &key, sh.rec.now());
                inv.value = Some(value);
                inv.expected = current;
                inv.node = Some(id);
                sh.rec.record(inv.clone());
                let body = match current {
                    None => json!({"value": value.to_string(), "if_absent": true}),
                    Some(_) => json!({"value": value.to_string(), "if_version": version}),
                };
                let outcome = call(
                    &sh.http,
                    &addr,
                    reqwest::Method::PUT,
                    &format!("/v1/kv/{key}"),
                    Some(body),
                    OP_TIMEOUT,
                )
                .await;
                let mut done = inv;
                if let Outcome::Ok(v) = &outcome {
                    done.revision = v["revision"].as_u64();
                }
                complete(&sh, &mut process, done, &outcome);
            }
        }
    }
}

const SEM_NAME: &str = "chaos-sem";
const SEM_CAPACITY: u64 = 2;
/// The capacity checker counts a hold from the acquire's `ok` to the release's invocation or
/// the end of the lease's guaranteed life (recorded as `valid_until_ns`), whichever is first;
/// a TTL longer than acquire plus hold keeps most holds whole.
const SEM_LEASE_TTL_MS: u64 = 10_000;

async fn semaphore_client(sh: Arc<Shared>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut process = sh.rec.new_process();
    while !sh.stop.load(Ordering::Relaxed) {
        let node = rng.gen_range(0..sh.addrs.len());
        let (id, addr) = sh.addrs[node].clone();
        let Some((lease, valid_until)) = grant_lease(&sh, &addr, SEM_LEASE_TTL_MS).await else {
            continue;
        };
        let mut inv = Event::new(
            process,
            Kind::Invoke,
            OpKind::SemAcquire,
            SEM_NAME,
            sh.rec.now(),
        );
        inv.node = Some(id);
        inv.capacity = Some(SEM_CAPACITY);
        inv.valid_until_ns = Some(valid_until);
        sh.rec.record(inv.clone());
        let body = json!({"lease_id": lease, "permits": 1, "wait_ms": LOCK_WAIT_MS});
        let timeout = OP_TIMEOUT + Duration::from_millis(LOCK_WAIT_MS);
        let outcome = call(
            &sh.http,
            &addr,
            reqwest::Method::POST,
            &format!("/v1/semaphores/{SEM_NAME}/acquire"),
            Some(body),
            timeout,
        )
        .await;
        let mut done = inv;
        let token = match &outcome {
            Outcome::Ok(v) => v["token"].as_u64(),
            _ => None,
        };
        done.token = token;
        complete(&sh, &mut process, done, &outcome);
        if token.is_some() {
            tokio::time::sleep(Duration::from_millis(rng.gen_range(5..40))).await;
            let mut inv = Event::new(
                process,
                Kind::Invoke,
                OpKind::SemRelease,
                SEM_NAME,
                sh.rec.now(),
            );
            inv.node = Some(id);
            inv.capacity = Some(SEM_CAPACITY);
            sh.rec.record(inv.clone());
            let body = json!({"lease_id": lease});
            let outcome = call(
                &sh.http,
                &addr,
                reqwest::Method::POST,
                &format!("/v1/semaphores/{SEM_NAME}/release"),
                Some(body),
                OP_TIMEOUT,
            )
            .await;
            complete(&sh, &mut process, inv, &outcome);
        }
        revoke_lease(&sh, &addr, lease).await;
    }
}

const LOCK_NAME: &str = "chaos-lock";
const LOCK_WAIT_MS: u64 = 1500;

const BARRIER_NAME: &str = "chaos-barrier";
/// Parties of every generation; the barrier workload needs at least this many clients.
pub const BARRIER_PARTIES: u64 = 3;
const BARRIER_WAIT_MS: u64 = 3000;
/// Longer than a round's worst case (a keepalive plus a wait: 2 s + 5 s), so a lease kept alive
/// every round survives a round against a paused node.
const BARRIER_LEASE_TTL_MS: u64 = 10_000;
/// Rounds one lease serves before it is revoked and a fresh one granted (a new party joins).
const BARRIER_LEASE_ROUNDS: u32 = 20;

/// Revoke a lease, ignoring the outcome (it expires anyway).
async fn revoke_lease(sh: &Shared, addr: &str, lease: u64) {
    let _ = call(
        &sh.http,
        addr,
        reqwest::Method::DELETE,
        &format!("/v1/leases/{lease}"),
        None,
        OP_TIMEOUT,
    )
    .await;
}

/// One client of the barrier workload: holds a lease (kept alive every round, re-granted when
/// lost and every [`BARRIER_LEASE_ROUNDS`] rounds) and waits at [`BARRIER_NAME`] with
/// `parties` parties, again and again. Waits never name a `generation` nor carry a
/// `request_id`, so a wait after a release is always an arrival in a later generation, which is
/// what the barrier checker relies on. After an `info` the lease may still be waiting (or be
/// about to arrive): the next process's wait resumes that wait or arrives anew.
async fn barrier_client(sh: Arc<Shared>, seed: u64, parties: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut process = sh.rec.new_process();
    // The lease, the node that granted it, and the rounds it has served.
    let mut lease: Option<(u64, String, u32)> = None;
    while !sh.stop.load(Ordering::Relaxed) {
        let node = rng.gen_range(0..sh.addrs.len());
        let (id, addr) = sh.addrs[node].clone();
        // The lease is not part of the checked history.
        if let Some((l, granted_by, rounds)) = lease.take() {
            if rounds >= BARRIER_LEASE_ROUNDS {
                revoke_lease(&sh, &granted_by, l).await;
            } else {
                let kept = call(
                    &sh.http,
                    &addr,
                    reqwest::Method::POST,
                    &format!("/v1/leases/{l}/keepalive"),
                    None,
                    OP_TIMEOUT,
                )
                .await;
                if !matches!(&kept, Outcome::Fail(code) if code == "lease_not_found") {
                    lease = Some((l, granted_by, rounds));
                }
            }
        }
        let l = match &mut lease {
            Some((l, _, rounds)) => {
                *rounds += 1;
                *l
            }
            None => {
                match call(
                    &sh.http,
                    &addr,
                    reqwest::Method::POST,
                    "/v1/leases",
                    Some(json!({"ttl_ms": BARRIER_LEASE_TTL_MS})),
                    OP_TIMEOUT,
                )
                .await
                {
                    Outcome::Ok(v) => {
                        let l = v["lease_id"].as_u64().unwrap_or(0);
                        lease = Some((l, addr.clone(), 1));
                        l
                    }
                    _ => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                }
            }
        };
        let mut inv = Event::new(
            process,
            Kind::Invoke,
            OpKind::BarrierWait,
            BARRIER_NAME,
            sh.rec.now(),
        );
        inv.node = Some(id);
        inv.capacity = Some(parties);
        sh.rec.record(inv.clone());
        let body = json!({"lease_id": l, "parties": parties, "wait_ms": BARRIER_WAIT_MS});
        let timeout = OP_TIMEOUT + Duration::from_millis(BARRIER_WAIT_MS);
        let outcome = call(
            &sh.http,
            &addr,
            reqwest::Method::POST,
            &format!("/v1/barriers/{BARRIER_NAME}/wait"),
            Some(body),
            timeout,
        )
        .await;
        let mut done = inv;
        match &outcome {
            Outcome::Ok(v) => {
                done.value = v["generation"].as_i64();
                done.token = v["token"].as_u64();
            }
            Outcome::Fail(code) if code == "lease_not_found" => lease = None,
            _ => {}
        }
        complete(&sh, &mut process, done, &outcome);
    }
    if let Some((l, granted_by, _)) = lease {
        revoke_lease(&sh, &granted_by, l).await;
    }
}

/// Grant a lease (not part of the checked history: an unknown grant is harmless). Returns the
/// lease id and the monotonic time until which it is guaranteed alive: the cluster stamps the
/// deadline at apply, after the invoke, so it lives at least `ttl_ms` from now.
async fn grant_lease(sh: &Shared, addr: &str, ttl_ms: u64) -> Option<(u64, u64)> {
    let valid_until = sh.rec.now() + ttl_ms * 1_000_000;
    match call(
        &sh.http,
        addr,
        reqwest::Method::POST,
        "/v1/leases",
        Some(json!({"ttl_ms": ttl_ms})),
        OP_TIMEOUT,
    )
    .await
    {
        Outcome::Ok(v) => v["lease_id"].as_u64().map(|l| (l, valid_until)),
        _ => None,
    }
}

/// A recorded acquire of [`LOCK_NAME`] under `lease`; the granted token on success.
async fn recorded_lock_acquire(
    sh: &Shared,
    process: &mut u64,
    (id, addr): (u64, &str),
    (lease, valid_until): (u64, u64),
    wait_ms: u64,
) -> Option<u64> {
    let mut inv = Event::new(
        *process,
        Kind::Invoke,
        OpKind::Acquire,
        LOCK_NAME,
        sh.rec.now(),
    );
    inv.node = Some(id);
    inv.valid_until_ns = Some(valid_until);
    sh.rec.record(inv.clone());
    let body = json!({"lease_id": lease, "wait_ms": wait_ms});
    let timeout = OP_TIMEOUT + Duration::from_millis(wait_ms);
    let outcome = call(
        &sh.http,
        addr,
        reqwest::Method::POST,
        &format!("/v1/locks/{LOCK_NAME}/acquire"),
        Some(body),
        timeout,
    )
    .await;
    let mut done = inv;
    let token = match &outcome {
        Outcome::Ok(v) => v["token"].as_u64(),
        _ => None,
    };
    done.token = token;
    complete(sh, process, done, &outcome);
    token
}

/// A recorded write of the lock's register fenced by `token`.
async fn recorded_fenced_write(
    sh: &Shared,
    process: &mut u64,
    (id, addr): (u64, &str),
    token: u64,
) {
    let value = sh.next_value.fetch_add(1, Ordering::Relaxed);
    let mut inv = Event::new(
        *process,
        Kind::Invoke,
        OpKind::FencedWrite,
        LOCK_NAME,
        sh.rec.now(),
    );
    inv.value = Some(value);
    inv.token = Some(token);
    inv.node = Some(id);
    sh.rec.record(inv.clone());
    let body = json!({"value": value.to_string(), "fence": {"lock": LOCK_NAME, "token": token}});
    let outcome = call(
        &sh.http,
        addr,
        reqwest::Method::PUT,
        "/v1/kv/chaos-lock-register",
        Some(body),
        OP_TIMEOUT,
    )
    .await;
    let mut done = inv;
    if let Outcome::Ok(v) = &outcome {
        done.revision = v["revision"].as_u64();
    }
    complete(sh, process, done, &outcome);
}

/// A recorded release of the hold with `token`, then the lease's revoke (not recorded).
async fn recorded_release_and_revoke(
    sh: &Shared,
    process: &mut u64,
    (id, addr): (u64, &str),
    lease: u64,
    token: u64,
) {
    let mut inv = Event::new(
        *process,
        Kind::Invoke,
        OpKind::Release,
        LOCK_NAME,
        sh.rec.now(),
    );
    inv.node = Some(id);
    inv.token = Some(token);
    sh.rec.record(inv.clone());
    let body = json!({"lease_id": lease});
    let outcome = call(
        &sh.http,
        addr,
        reqwest::Method::POST,
        &format!("/v1/locks/{LOCK_NAME}/release"),
        Some(body),
        OP_TIMEOUT,
    )
    .await;
    complete(sh, process, inv, &outcome);
    revoke_lease(sh, addr, lease).await;
}

/// Lease TTL of the lock workload.
const LOCK_LEASE_TTL_MS: u64 = 3000;

/// Lease TTL of the lease workload: short, so that abandoned holds expire often.
const LEASE_WORKLOAD_TTL_MS: u64 = 2000;

/// The lock workload (`abandons == false`): lease, acquire, fenced write, release, revoke.
///
/// The lease workload (`abandons == true`): the same, but a third of the holders abandon their
/// lock instead of releasing it: they stop renewing the lease, wait until it must have expired
/// (its TTL, plus up to 1.5 s), and then try a write fenced by their stale token, which the
/// cluster must refuse once anyone else was granted the lock. Waiters meanwhile queue behind
/// the abandoned hold and get the lock when the lease expires. Checked by the lock checker,
/// including that no hold ends before its lease could have expired ([`check::LOCK_LEASE_HOLD`]).
async fn lock_client(sh: Arc<Shared>, seed: u64, abandons: bool) {
    let ttl_ms = match abandons {
        true => LEASE_WORKLOAD_TTL_MS,
        false => LOCK_LEASE_TTL_MS,
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let mut process = sh.rec.new_process();
    while !sh.stop.load(Ordering::Relaxed) {
        let node = rng.gen_range(0..sh.addrs.len());
        let (id, addr) = sh.addrs[node].clone();
        let Some(lease) = grant_lease(&sh, &addr, ttl_ms).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let at = (id, addr.as_str());
        let Some(token) = recorded_lock_acquire(&sh, &mut process, at, lease, LOCK_WAIT_MS).await
        else {
            revoke_lease(&sh, &addr, lease.0).await;
            continue;
        };
        recorded_fenced_write(&sh, &mut process, at, token).await;
        if !abandons || rng.gen_ratio(2, 3) {
            recorded_release_and_revoke(&sh, &mut process, at, lease.0, token).await;
            continue;
        }
        // Abandon the hold: no keepalive, no release. Wake after the lease's guaranteed life.
        let now = sh.rec.now();
        let after = lease.1.saturating_sub(now) + rng.gen_range(0..1_500_000_000);
        tokio::time::sleep(Duration::from_nanos(after)).await;
        let node = rng.gen_range(0..sh.addrs.len());
        let (id, addr) = sh.addrs[node].clone();
        recorded_fenced_write(&sh, &mut process, (id, &addr), token).await;
    }
}

// ---------------------------------------------------------------------------------------
// Nemesis
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, serde::Serialize)]
pub struct FaultRecord {
    pub kind: String,
    pub detail: String,
    pub start_ms: u64,
    pub end_ms: u64,
    /// From the heal to the first successful write (None: not within the bound).
    pub recovery_ms: Option<u64>,
}

/// Time from now until a write succeeds through some node, up to `bound`.
async fn measure_recovery(sh: &Shared, rng: &mut StdRng, bound: Duration) -> Option<u64> {
    let healed = Instant::now();
    while healed.elapsed() < bound {
        let (_, addr) = &sh.addrs[rng.gen_range(0..sh.addrs.len())];
        let body = json!({"value": "recovered"});
        let put = call(
            &sh.http,
            addr,
            reqwest::Method::PUT,
            "/v1/kv/chaos-recovery",
            Some(body),
            OP_TIMEOUT,
        );
        if let Outcome::Ok(_) = put.await {
            return Some(healed.elapsed().as_millis() as u64);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

enum Active {
    Killed(u64),
    Paused(u64),
    Partitioned,
    Disconnected(u64),
}

/// Blocked sets for a partition of `ids` into groups: a node talks only inside its groups.
fn partition_sets(ids: &[u64], groups: &[Vec<u64>]) -> BTreeMap<u64, BTreeSet<u64>> {
    ids.iter()
        .map(|id| {
            let reach: BTreeSet<u64> = groups
                .iter()
                .filter(|g| g.contains(id))
                .flatten()
                .copied()
                .collect();
            (
                *id,
                ids.iter().filter(|o| !reach.contains(o)).copied().collect(),
            )
        })
        .collect()
}

async fn choose_target(c: &ProcCluster, rng: &mut StdRng) -> u64 {
    let ids: Vec<u64> = c.addrs.keys().copied().collect();
    if rng.gen_bool(0.5) {
        if let Some(l) = c.leader().await {
            return l;
        }
    }
    ids[rng.gen_range(0..ids.len())]
}

async fn inject(
    c: &mut ProcCluster,
    kind: Nemesis,
    rng: &mut StdRng,
) -> anyhow::Result<(Active, String, String)> {
    let kind = match kind {
        Nemesis::Mixed => [Nemesis::Kill, Nemesis::Pause, Nemesis::Partition][rng.gen_range(0..3)],
        k => k,
    };
    let ids: Vec<u64> = c.addrs.keys().copied().collect();
    match kind {
        Nemesis::Kill => {
            let t = choose_target(c, rng).await;
            c.kill(t);
            Ok((
                Active::Killed(t),
                "kill".into(),
                format!("kill -9 node {t}"),
            ))
        }
        Nemesis::Pause => {
            let t = choose_target(c, rng).await;
            c.signal(t, "-STOP");
            Ok((
                Active::Paused(t),
                "pause".into(),
                format!("SIGSTOP node {t}"),
            ))
        }
        _ if c.compose.is_some() => {
            let t = choose_target(c, rng).await;
            c.disconnect(t, true);
            Ok((
                Active::Disconnected(t),
                "partition".into(),
                format!("disconnect container n{t} from the network"),
            ))
        }
        _ => {
            let mut shuffled = ids.clone();
            for i in (1..shuffled.len()).rev() {
                shuffled.swap(i, rng.gen_range(0..=i));
            }
            let n = ids.len();
            let mode = if n >= 5 {
                rng.gen_range(0..4)
            } else {
                rng.gen_range(0..2)
            };
            let (groups, detail) = match mode {
                0 => {
                    let t = choose_target(c, rng).await;
                    let rest: Vec<u64> = ids.iter().filter(|i| **i != t).copied().collect();
                    (vec![vec![t], rest], format!("isolate node {t}"))
                }
                1 => {
                    let (a, b) = shuffled.split_at(n / 2);
                    (
                        vec![a.to_vec(), b.to_vec()],
                        format!("halves {a:?} | {b:?}"),
                    )
                }
                2 => {
                    // Bridge: two halves that both see one node in the middle.
                    let mid = shuffled[0];
                    let rest = &shuffled[1..];
                    let (a, b) = rest.split_at(rest.len() / 2);
                    let mut ga = a.to_vec();
                    ga.push(mid);
                    let mut gb = b.to_vec();
                    gb.push(mid);
                    (vec![ga, gb], format!("bridge {a:?} - {mid} - {b:?}"))
                }
                _ => {
                    // Ring: each node sees its two neighbours.
                    let groups = (0..n)
                        .map(|i| vec![shuffled[i], shuffled[(i + 1) % n]])
                        .collect();
                    (groups, format!("ring {shuffled:?}"))
                }
            };
            for (id, blocked) in partition_sets(&ids, &groups) {
                c.set_blocked(id, &blocked).await;
            }
            Ok((Active::Partitioned, "partition".into(), detail))
        }
    }
}

async fn heal(c: &mut ProcCluster, active: Active) -> anyhow::Result<()> {
    match active {
        Active::Killed(t) => c.spawn(t)?,
        Active::Paused(t) => c.signal(t, "-CONT"),
        Active::Disconnected(t) => c.disconnect(t, false),
        Active::Partitioned => {
            let ids: Vec<u64> = c.addrs.keys().copied().collect();
            for id in ids {
                c.set_blocked(id, &BTreeSet::new()).await;
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------

#[derive(Debug, serde::Serialize)]
pub struct Summary {
    pub seed: u64,
    pub workload: String,
    pub nemesis: String,
    pub nodes: u64,
    pub duration_ms: u64,
    pub ops_ok: usize,
    pub ops_fail: usize,
    pub ops_info: usize,
    pub faults: Vec<FaultRecord>,
    pub recovery_ms: Option<u64>,
    /// Recovery after each healed fault: median and max, in ms.
    pub recovery_median_ms: Option<u64>,
    pub recovery_max_ms: Option<u64>,
    pub violations: Vec<String>,
    pub inconclusive: Vec<String>,
}

/// The client kinds of the mixed workload, in turn.
const MIXED: [Workload; 5] = [
    Workload::Register,
    Workload::Lock,
    Workload::Semaphore,
    Workload::Lease,
    Workload::Barrier,
];

pub async fn run(args: ChaosArgs) -> anyhow::Result<Summary> {
    if args.workload == Workload::Barrier {
        anyhow::ensure!(
            args.clients >= BARRIER_PARTIES as usize,
            "the barrier workload needs --clients >= {BARRIER_PARTIES} (got {}): every \
             generation releases only when {BARRIER_PARTIES} clients wait at the barrier",
            args.clients
        );
    }
    let seed = args.seed.unwrap_or_else(rand::random);
    let mut rng = StdRng::seed_from_u64(seed);
    std::fs::create_dir_all(&args.out)?;
    let bin = match &args.bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?,
    };
    eprintln!(
        "chaos: seed {seed}, {} nodes, workload {:?}, nemesis {:?}, {:?}, out {}",
        args.nodes,
        args.workload,
        args.nemesis,
        args.duration,
        args.out.display()
    );
    let mut cluster = match &args.compose {
        Some(project) => ProcCluster::attach_compose(project, args.nodes)?,
        None => ProcCluster::start(
            bin,
            &args.out,
            args.nodes,
            args.unsafe_stale_reads,
            args.net,
            &[],
        )?,
    };
    let boot = Instant::now();
    while cluster.leader().await.is_none() {
        anyhow::ensure!(
            boot.elapsed() < Duration::from_secs(30),
            "cluster did not elect a leader"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sh = Arc::new(Shared {
        rec: Recorder {
            start: Instant::now(),
            history: Mutex::new(History { events: Vec::new() }),
            next_process: AtomicU64::new(0),
        },
        http: reqwest::Client::builder()
            .no_proxy()
            .tcp_nodelay(true)
            .build()?,
        addrs: cluster.addrs.iter().map(|(i, a)| (*i, a.clone())).collect(),
        stop: AtomicBool::new(false),
        next_value: AtomicI64::new(1),
        keys: args.keys.max(1),
    });
    if matches!(args.workload, Workload::Semaphore | Workload::Mixed) {
        let created = {
            let mut ok = false;
            for attempt in 0..100 {
                let (_, addr) = &sh.addrs[attempt % sh.addrs.len()];
                let body = json!({"capacity": SEM_CAPACITY});
                if let Outcome::Ok(_) = call(
                    &sh.http,
                    addr,
                    reqwest::Method::POST,
                    &format!("/v1/semaphores/{SEM_NAME}"),
                    Some(body),
                    OP_TIMEOUT,
                )
                .await
                {
                    ok = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            ok
        };
        anyhow::ensure!(created, "could not create the semaphore");
    }
    let kinds: Vec<Workload> = (0..args.clients.max(1))
        .map(|i| match args.workload {
            Workload::Mixed => MIXED[i % MIXED.len()],
            w => w,
        })
        .collect();
    let parties = match args.workload {
        Workload::Mixed => kinds.iter().filter(|k| **k == Workload::Barrier).count() as u64,
        _ => BARRIER_PARTIES,
    };
    let mut tasks = Vec::new();
    for kind in kinds {
        let s = sh.clone();
        let client_seed = rng.gen();
        tasks.push(tokio::spawn(async move {
            match kind {
                Workload::Lock => lock_client(s, client_seed, false).await,
                Workload::Lease => lock_client(s, client_seed, true).await,
                Workload::Semaphore => semaphore_client(s, client_seed).await,
                Workload::Barrier => barrier_client(s, client_seed, parties).await,
                Workload::Register | Workload::Mixed => register_client(s, client_seed).await,
            }
        }));
    }

    // The nemesis: fault, hold, heal, quiet; repeated until the duration is over.
    let mut faults = Vec::new();
    let end = Instant::now() + args.duration;
    tokio::time::sleep(Duration::from_secs(2).min(args.duration / 4)).await;
    while args.nemesis != Nemesis::None && Instant::now() + Duration::from_secs(4) < end {
        let start_ms = sh.rec.start.elapsed().as_millis() as u64;
        let (active, kind, detail) = inject(&mut cluster, args.nemesis, &mut rng).await?;
        eprintln!("chaos: {:>6} ms  {detail}", start_ms);
        let hold = Duration::from_millis(rng.gen_range(2500..5000));
        tokio::time::sleep(hold.min(end.saturating_duration_since(Instant::now()))).await;
        heal(&mut cluster, active).await?;
        let end_ms = sh.rec.start.elapsed().as_millis() as u64;
        let recovery_ms = measure_recovery(&sh, &mut rng, args.recovery_bound).await;
        eprintln!("chaos: {end_ms:>6} ms  healed; writes again after {recovery_ms:?} ms");
        faults.push(FaultRecord {
            kind,
            detail,
            start_ms,
            end_ms,
            recovery_ms,
        });
        let quiet = Duration::from_millis(rng.gen_range(1500..3500));
        tokio::time::sleep(quiet.min(end.saturating_duration_since(Instant::now()))).await;
    }
    tokio::time::sleep(end.saturating_duration_since(Instant::now())).await;
    sh.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }

    // Recovery: how long until a write succeeds again after everything is healed.
    let healed = Instant::now();
    let mut recovery_ms = None;
    let mut process = sh.rec.new_process();
    while healed.elapsed() < args.recovery_bound {
        let (_, addr) = &sh.addrs[rng.gen_range(0..sh.addrs.len())];
        let body = json!({"value": "recovered"});
        if let Outcome::Ok(_) = call(
            &sh.http,
            addr,
            reqwest::Method::PUT,
            "/v1/kv/chaos-recovery",
            Some(body),
            OP_TIMEOUT,
        )
        .await
        {
            recovery_ms = Some(healed.elapsed().as_millis() as u64);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Final linearizable reads of every register: an acknowledged write that is lost shows.
    if matches!(args.workload, Workload::Register | Workload::Mixed) {
        for k in 0..sh.keys {
            let key = format!("r{k}");
            for attempt in 0..20 {
                let node = attempt % sh.addrs.len();
                if recorded_read(&sh, &mut process, &key, node).await.is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    cluster.stop_all();

    let history = std::mem::replace(
        &mut *sh.rec.history.lock().unwrap_or_else(|e| e.into_inner()),
        History { events: Vec::new() },
    );
    std::fs::write(args.out.join("history.jsonl"), history.to_jsonl())?;
    let results = check::check_all(&history).map_err(anyhow::Error::msg)?;
    let (inconclusive, violations): (Vec<&Violation>, Vec<&Violation>) = results
        .iter()
        .partition(|v| v.checker.ends_with("inconclusive"));
    let mut violations: Vec<String> = violations.iter().map(|v| describe(v)).collect();
    for f in faults.iter().filter(|f| f.recovery_ms.is_none()) {
        violations.push(format!(
            "recovery: no write succeeded within {:?} after healing `{}` at {} ms",
            args.recovery_bound, f.detail, f.end_ms
        ));
    }
    if recovery_ms.is_none() {
        violations.push(format!(
            "recovery: no write succeeded within {:?} at the end of the run",
            args.recovery_bound
        ));
    }
    let mut recoveries: Vec<u64> = faults.iter().filter_map(|f| f.recovery_ms).collect();
    recoveries.sort_unstable();
    let count = |k: Kind| history.events.iter().filter(|e| e.kind == k).count();
    let summary = Summary {
        seed,
        workload: format!("{:?}", args.workload).to_lowercase(),
        nemesis: format!("{:?}", args.nemesis).to_lowercase(),
        nodes: args.nodes,
        duration_ms: args.duration.as_millis() as u64,
        ops_ok: count(Kind::Ok),
        ops_fail: count(Kind::Fail),
        ops_info: count(Kind::Info),
        faults,
        recovery_ms,
        recovery_median_ms: recoveries.get(recoveries.len() / 2).copied(),
        recovery_max_ms: recoveries.last().copied(),
        violations,
        inconclusive: inconclusive.iter().map(|v| describe(v)).collect(),
    };
    std::fs::write(
        args.out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    Ok(summary)
}

fn describe(v: &Violation) -> String {
    // The operations nearest the failure are the last ones listed.
    let mut s = format!("[{}] {}", v.checker, v.message);
    let skip = v.ops.len().saturating_sub(8);
    if skip > 0 {
        s += &format!("\n      ... {skip} earlier operations (all in history.jsonl)");
    }
    for op in &v.ops[skip..] {
        s += &format!("\n      {op:?}");
    }
    s
}

pub fn print_summary(s: &Summary) {
    println!("chaos summary (seed {})", s.seed);
    println!(
        "  workload {} / nemesis {} / {} nodes / {} ms",
        s.workload, s.nemesis, s.nodes, s.duration_ms
    );
    println!(
        "  ops: {} ok, {} failed, {} unknown (info)",
        s.ops_ok, s.ops_fail, s.ops_info
    );
    println!("  faults injected: {}", s.faults.len());
    for f in &s.faults {
        let rec = f
            .recovery_ms
            .map_or("NONE".to_string(), |r| format!("{r} ms"));
        println!(
            "    {:>6}-{:<6} ms  {:<40} writes again {rec} after the heal",
            f.start_ms, f.end_ms, f.detail
        );
    }
    if let (Some(m), Some(x)) = (s.recovery_median_ms, s.recovery_max_ms) {
        println!(
            "  recovery after a heal: median {m} ms, max {x} ms (to the first successful write)"
        );
    }
    match s.recovery_ms {
        Some(ms) => println!("  at the end of the run: writes succeed after {ms} ms"),
        None => println!("  at the end of the run: NO write succeeded"),
    }
    for i in &s.inconclusive {
        println!("  inconclusive: {i}");
    }
    if s.violations.is_empty() {
        println!("  violations: none");
    } else {
        println!("  VIOLATIONS: {}", s.violations.len());
        for v in &s.violations {
            println!("    {v}");
        }
    }
}
