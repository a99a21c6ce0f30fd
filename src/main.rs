//! `concord`: the server (`concord serve`) and its command-line client.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use concord::client::{Client, ClientError};
use concord::config::ServeArgs;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    name = "concord",
    version,
    about = "Raft-replicated coordination for AI agents"
)]
struct Cli {
    /// Nodes to talk to (any of them; comma separated).
    #[arg(
        long,
        global = true,
        env = "CONCORD_ENDPOINTS",
        default_value = "127.0.0.1:7700",
        value_delimiter = ','
    )]
    endpoints: Vec<String>,
    /// Print JSON instead of human output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a node (with no flags: a single-node cluster on 127.0.0.1:7700, data in ./data).
    Serve(ServeArgs),
    /// Cluster membership.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Leases (agent sessions).
    #[command(subcommand)]
    Lease(LeaseCmd),
    /// The key-value store.
    #[command(subcommand)]
    Kv(KvCmd),
    /// Locks with fencing tokens.
    #[command(subcommand)]
    Lock(LockCmd),
    /// Counting semaphores with a fair, priority-aware queue.
    #[command(subcommand)]
    Sem(SemCmd),
    /// Condition variables over exclusive locks.
    #[command(subcommand)]
    Cond(CondCmd),
    /// Stream changes (Server-Sent Events from /v1/watch), one JSON line each; reconnects to
    /// the next endpoint from the next revision when a node goes away.
    Watch {
        #[arg(long, default_value = "")]
        prefix: String,
        /// Comma-separated event types (kv, lock, semaphore, lease, ...).
        #[arg(long)]
        types: Option<String>,
        #[arg(long)]
        from_revision: Option<u64>,
    },
    /// What is contended now: resources with waiters, the wait-for graph, recent deadlocks.
    Conflicts {
        /// Print the wait-for graph in Graphviz dot format.
        #[arg(long)]
        dot: bool,
    },
    /// Show the deadlock victim policy, or set it: refuse (the request that closes a cycle
    /// fails), youngest (the newest lease of the cycle loses its wait) or lowest_priority.
    DeadlockPolicy {
        /// The policy to set; without it, print the current one.
        policy: Option<String>,
    },
    /// Barriers (wait until N arrive, by generation) and double barriers (enter and leave
    /// together).
    #[command(subcommand)]
    Barrier(BarrierCmd),
    /// Leader elections with fencing tokens.
    #[command(subcommand)]
    Election(ElectionCmd),
    /// Work queues: each item is handed to one lease at a time until acked.
    #[command(subcommand)]
    Queue(QueueCmd),
    /// Start a cluster of real processes, drive it, inject faults, and check the history.
    Chaos(concord::chaos::runner::ChaosArgs),
    /// Load the cluster with one workload; report throughput, latency percentiles and errors
    /// by code (see docs/benchmarks.md). `--target etcd` speaks etcd's v3 JSON gateway.
    Bench(concord::bench::BenchArgs),
    /// Start a local 3-node cluster and measure failover, lock hand-off after a lease expiry,
    /// or memory and restart time with a large state (see docs/benchmarks.md).
    Perf(concord::perf::PerfArgs),
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Leader, term, members and indexes.
    Status,
    /// Add a node: it joins as a learner, catches up, then becomes a voter.
    Add { id: u64, addr: String },
    /// Remove a node; its id can never be used again.
    Remove { id: u64 },
    /// Exit 0 if the first endpoint is ready (leader known, caught up); for health checks.
    Ready,
}

#[derive(Subcommand)]
enum LeaseCmd {
    Grant {
        #[arg(long, default_value_t = 10_000)]
        ttl_ms: u64,
        #[arg(long)]
        owner: Option<String>,
    },
    Keepalive {
        id: u64,
    },
    Revoke {
        id: u64,
    },
    Get {
        id: u64,
    },
}

#[derive(Subcommand)]
enum KvCmd {
    Put {
        key: String,
        value: String,
        #[arg(long)]
        lease: Option<u64>,
        #[arg(long)]
        if_version: Option<u64>,
        #[arg(long)]
        if_absent: bool,
        /// Fence the write with a lock token: LOCK:TOKEN.
        #[arg(long)]
        fence: Option<String>,
    },
    Get {
        key: String,
        /// Read this node's state without a read index.
        #[arg(long)]
        stale: bool,
    },
    Del {
        key: String,
    },
    List {
        #[arg(long, default_value = "")]
        prefix: String,
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
}

#[derive(Subcommand)]
enum SemCmd {
    Create {
        name: String,
        #[arg(long)]
        capacity: u64,
    },
    Acquire {
        name: String,
        #[arg(long)]
        lease: u64,
        #[arg(long, default_value_t = 1)]
        permits: u64,
        #[arg(long, default_value_t = 0)]
        wait_ms: u64,
        /// 0 (default, lowest) to 9; waiters age one level per second.
        #[arg(long, default_value_t = 0)]
        priority: u64,
    },
    Release {
        name: String,
        #[arg(long)]
        lease: u64,
    },
    Status {
        name: String,
    },
}

#[derive(Subcommand)]
enum BarrierCmd {
    /// Wait at barrier NAME until PARTIES leases have arrived; prints the generation passed.
    Wait {
        name: String,
        #[arg(long)]
        lease: u64,
        #[arg(long)]
        parties: u64,
        #[arg(long, default_value_t = 60_000)]
        wait_ms: u64,
        /// The generation to pass (to resume a wait whose answer was lost).
        #[arg(long)]
        generation: Option<u64>,
    },
    /// Generation, parties and arrived leases of barrier NAME (of double barrier NAME with
    /// --double).
    Status {
        name: String,
        #[arg(long)]
        double: bool,
    },
    /// Enter double barrier NAME: returns once PARTIES leases have entered together.
    Enter {
        name: String,
        #[arg(long)]
        lease: u64,
        #[arg(long)]
        parties: u64,
        #[arg(long, default_value_t = 60_000)]
        wait_ms: u64,
        #[arg(long)]
        generation: Option<u64>,
    },
    /// Leave double barrier NAME: returns once everyone who entered has left.
    Leave {
        name: String,
        #[arg(long)]
        lease: u64,
        #[arg(long)]
        parties: Option<u64>,
        #[arg(long, default_value_t = 60_000)]
        wait_ms: u64,
    },
}

#[derive(Subcommand)]
enum ElectionCmd {
    /// Become leader (prints the token), waiting up to --wait-ms in the candidate line.
    Campaign {
        name: String,
        #[arg(long)]
        lease: u64,
        #[arg(long, default_value = "")]
        value: String,
        #[arg(long, default_value_t = 0)]
        wait_ms: u64,
    },
    /// Replace the leader's value (only the leader).
    Proclaim {
        name: String,
        #[arg(long)]
        lease: u64,
        #[arg(long)]
        value: String,
    },
    /// Step down (the next candidate takes over), or leave the candidate line.
    Resign {
        name: String,
        #[arg(long)]
        lease: u64,
    },
    Status {
        name: String,
    },
}

#[derive(Subcommand)]
enum QueueCmd {
    /// Add an item (prints its id).
    Push {
        name: String,
        item: String,
        /// 0 (default, lowest) to 9; items age one level per second.
        #[arg(long, default_value_t = 0)]
        priority: u64,
    },
    /// Take the next item for a lease, waiting up to --wait-ms.
    Claim {
        name: String,
        #[arg(long)]
        lease: u64,
        #[arg(long, default_value_t = 0)]
        wait_ms: u64,
    },
    /// Mark a claimed item done.
    Ack {
        name: String,
        id: u64,
        #[arg(long)]
        lease: u64,
    },
    /// Give a claimed item back to the queue.
    Nack {
        name: String,
        id: u64,
        #[arg(long)]
        lease: u64,
    },
    Status {
        name: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

#[derive(Subcommand)]
enum LockCmd {
    Acquire {
        name: String,
        #[arg(long)]
        lease: u64,
        #[arg(long, default_value_t = 0)]
        wait_ms: u64,
        /// exclusive (one writer) or shared (many readers).
        #[arg(long, default_value = "exclusive")]
        mode: String,
    },
    Release {
        name: String,
        #[arg(long)]
        lease: u64,
    },
    Status {
        name: String,
    },
    /// Hold NAME while CMD runs (keeping a lease alive); CMD gets the token in CONCORD_FENCE
    /// and is stopped if the lease is lost.
    Run {
        name: String,
        #[arg(long, default_value_t = 10_000)]
        ttl_ms: u64,
        #[arg(long, default_value_t = 60_000)]
        wait_ms: u64,
        #[arg(trailing_var_arg = true, required = true)]
        cmd: Vec<String>,
    },
}

#[derive(Subcommand)]
enum CondCmd {
    /// Release LOCK (held exclusively by the lease) and wait on condition NAME; prints the new
    /// token once notified and holding the lock again.
    Wait {
        name: String,
        #[arg(long)]
        lease: u64,
        #[arg(long)]
        lock: String,
        #[arg(long, default_value_t = 60_000)]
        wait_ms: u64,
    },
    /// Wake the first waiter (or all with --all).
    Notify {
        name: String,
        #[arg(long)]
        all: bool,
    },
    Status {
        name: String,
    },
}

/// The server's Rust heap is mimalloc. Under load glibc's malloc and free were about a quarter
/// of the leader's CPU (`cfree`, `_int_free`, `unlink_chunk`, `malloc` on top of the profile of
/// put with 256 clients; docs/benchmarks.md). RocksDB's C++ allocations stay with glibc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// glibc gives threads that contend for the heap arenas of their own, up to eight per core.
/// A node's tokio workers, RocksDB threads and fsync thread spread its heap over many arenas,
/// and the freed space in each is not reused by the others: with 100 000 keys, 10 000 leases
/// and 10 000 locks a node held 335-353 MB, and 229-284 MB with two arenas
/// (docs/benchmarks.md, resources). An explicit `MALLOC_ARENA_MAX` wins.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; called before any thread starts.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Cmd::Serve(args) = &cli.cmd {
        return serve(args).await;
    }
    if let Cmd::Chaos(args) = &cli.cmd {
        let summary = concord::chaos::runner::run(args.clone()).await?;
        concord::chaos::runner::print_summary(&summary);
        return Ok(if summary.violations.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        });
    }
    if let Cmd::Bench(args) = &cli.cmd {
        let report = concord::bench::run(&cli.endpoints, args.clone()).await?;
        if cli.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            println!("{}", report.human());
        }
        return Ok(if report.failed() {
            ExitCode::from(2)
        } else {
            ExitCode::SUCCESS
        });
    }
    if let Cmd::Perf(args) = &cli.cmd {
        let report = concord::perf::run(args.clone()).await?;
        if cli.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            println!("{}", report.human());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let client = Client::new(&cli.endpoints);
    let out = |v: Value, human: String| {
        if cli.json {
            println!("{v}");
        } else {
            println!("{human}");
        }
    };
    let res: Result<(), ClientError> = async {
        match cli.cmd {
            Cmd::Serve(_) | Cmd::Chaos(_) | Cmd::Bench(_) | Cmd::Perf(_) => unreachable!("handled above"),
            Cmd::Cluster(c) => match c {
                ClusterCmd::Status => {
                    let v = client.cluster().await?;
                    let mut s = format!(
                        "node {} leader {} term {} applied {} commit {}\n",
                        v["id"], v["leader"], v["term"], v["applied_index"], v["commit_index"]
                    );
                    for m in v["members"].as_array().into_iter().flatten() {
                        s += &format!(
                            "  {} {} {}{}\n",
                            m["id"],
                            m["addr"].as_str().unwrap_or(""),
                            m["role"].as_str().unwrap_or(""),
                            if m["leader"] == json!(true) {
                                " (leader)"
                            } else {
                                ""
                            }
                        );
                    }
                    out(v.clone(), s.trim_end().to_string());
                }
                ClusterCmd::Add { id, addr } => {
                    let v = client.add_member(id, &addr).await?;
                    out(
                        v.clone(),
                        format!("added node {id} at {addr}; voters {}", v["voters"]),
                    );
                }
                ClusterCmd::Ready => {
                    let url = format!(
                        "http://{}/ready",
                        cli.endpoints[0].trim_start_matches("http://")
                    );
                    let ready = reqwest::Client::new()
                        .get(url)
                        .timeout(Duration::from_secs(2))
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success());
                    if !ready {
                        return Err(ClientError::Unavailable("not ready".into()));
                    }
                    out(json!({"ready": true}), "ready".into());
                }
                ClusterCmd::Remove { id } => {
                    let v = client.remove_member(id).await?;
                    out(
                        v.clone(),
                        format!("removed node {id}; voters {}", v["voters"]),
                    );
                }
            },
            Cmd::Lease(c) => match c {
                LeaseCmd::Grant { ttl_ms, owner } => {
                    let id = client.lease_grant(ttl_ms, owner.as_deref()).await?;
                    out(json!({"lease_id": id, "ttl_ms": ttl_ms}), id.to_string());
                }
                LeaseCmd::Keepalive { id } => {
                    let v = client.lease_keepalive(id).await?;
                    out(
                        v.clone(),
                        format!("lease {id} kept alive (ttl {} ms)", v["ttl_ms"]),
                    );
                }
                LeaseCmd::Revoke { id } => {
                    let v = client.lease_revoke(id).await?;
                    out(v, format!("lease {id} revoked"));
                }
                LeaseCmd::Get { id } => {
                    let v = client.lease_get(id).await?;
                    out(
                        v.clone(),
                        format!(
                            "lease {id} owner {} remaining {} ms of {} ms; locks {} keys {}",
                            v["owner"], v["remaining_ms"], v["ttl_ms"], v["locks"], v["keys"]
                        ),
                    );
                }
            },
            Cmd::Kv(c) => match c {
                KvCmd::Put {
                    key,
                    value,
                    lease,
                    if_version,
                    if_absent,
                    fence,
                } => {
                    let fence = match fence {
                        None => Value::Null,
                        Some(f) => {
                            let (lock, token) =
                                f.rsplit_once(':').ok_or_else(|| ClientError::Api {
                                    status: 400,
                                    code: "invalid_argument".into(),
                                    message: "--fence must be LOCK:TOKEN".into(),
                                    body: Value::Null,
                                })?;
                            let token: u64 = token.parse().map_err(|_| ClientError::Api {
                                status: 400,
                                code: "invalid_argument".into(),
                                message: "--fence token must be a number".into(),
                                body: Value::Null,
                            })?;
                            json!({"lock": lock, "token": token})
                        }
                    };
                    let body = json!({"value": value, "lease_id": lease, "if_version": if_version,
                        "if_absent": if_absent, "fence": fence});
                    let v = client.kv_put(&key, body).await?;
                    out(
                        v.clone(),
                        format!("{key} version {} revision {}", v["version"], v["revision"]),
                    );
                }
                KvCmd::Get { key, stale } => {
                    let v = client.kv_get(&key, stale).await?;
                    out(v.clone(), v["value"].as_str().unwrap_or("").to_string());
                }
                KvCmd::Del { key } => {
                    let v = client.kv_delete(&key).await?;
                    out(v.clone(), format!("{key} deleted: {}", v["deleted"]));
                }
                KvCmd::List { prefix, limit } => {
                    let v = client.kv_list(&prefix, limit).await?;
                    let lines: Vec<String> = v["kvs"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|kv| {
                            format!(
                                "{} = {}",
                                kv["key"].as_str().unwrap_or(""),
                                kv["value"].as_str().unwrap_or("")
                            )
                        })
                        .collect();
                    out(v.clone(), lines.join("\n"));
                }
            },
            Cmd::Sem(c) => match c {
                SemCmd::Create { name, capacity } => {
                    let v = client.sem_create(&name, capacity).await?;
                    out(v, format!("{name}: capacity {capacity}"));
                }
                SemCmd::Acquire { name, lease, permits, wait_ms, priority } => {
                    let token = client.sem_acquire(&name, lease, permits, wait_ms, priority).await?;
                    out(json!({"semaphore": name, "lease_id": lease, "permits": permits, "token": token}), token.to_string());
                }
                SemCmd::Release { name, lease } => {
                    let v = client.sem_release(&name, lease).await?;
                    out(v, format!("{name} released"));
                }
                SemCmd::Status { name } => {
                    let v = client.sem_status(&name).await?;
                    let human = format!("{name}: {} of {} permits free; {} holders, {} waiting",
                        v["free"], v["capacity"], v["holders"].as_array().map_or(0, |h| h.len()),
                        v["queue"].as_array().map_or(0, |q| q.len()));
                    out(v, human);
                }
            },
            Cmd::Cond(c) => match c {
                CondCmd::Wait {
                    name,
                    lease,
                    lock,
                    wait_ms,
                } => {
                    let v = client.cond_wait(&name, lease, &lock, wait_ms).await?;
                    let human = v["token"].to_string();
                    out(v, human);
                }
                CondCmd::Notify { name, all } => {
                    let v = client.cond_notify(&name, all).await?;
                    let human = format!("woke {}", v["woken"]);
                    out(v, human);
                }
                CondCmd::Status { name } => {
                    let v = client
                        .get(&format!("/v1/conditions/{}", concord::client::encode_segment(&name)))
                        .await?;
                    let human = format!("{name}: {} waiting", v["waiters"].as_array().map_or(0, |w| w.len()));
                    out(v, human);
                }
            },
            Cmd::Watch {
                prefix,
                types,
                from_revision,
            } => watch(&client, &prefix, types.as_deref(), from_revision).await?,
            Cmd::Conflicts { dot } => {
                let v = client.get("/v1/conflicts").await?;
                if dot {
                    println!("{}", conflicts_dot(&v));
                } else {
                    let mut human = String::new();
                    for r in v["resources"].as_array().into_iter().flatten() {
                        human += &format!(
                            "{}: {} holding, {} waiting, longest wait {} ms\n",
                            r["resource"].as_str().unwrap_or(""),
                            r["holders"].as_array().map_or(0, |h| h.len()),
                            r["waiters"].as_array().map_or(0, |w| w.len()),
                            r["longest_wait_ms"]
                        );
                    }
                    for d in v["deadlocks"].as_array().into_iter().flatten() {
                        human += &deadlock_line(d);
                    }
                    if human.is_empty() {
                        human = "nothing is contended".into();
                    }
                    out(v, human.trim_end().to_string());
                }
            }
            Cmd::DeadlockPolicy { policy } => {
                let v = match policy {
                    Some(p) => client.set_deadlock_policy(&p).await?,
                    None => client.deadlock_policy().await?,
                };
                let human = v["policy"].as_str().unwrap_or("").to_string();
                out(v, human);
            }
            Cmd::Barrier(c) => match c {
                BarrierCmd::Wait { name, lease, parties, wait_ms, generation } => {
                    let v = client.barrier_wait(&name, lease, parties, wait_ms, generation).await?;
                    let human = format!("{name}: passed generation {} (token {})", v["generation"], v["token"]);
                    out(v, human);
                }
                BarrierCmd::Status { name, double: false } => {
                    let v = client.barrier_status(&name).await?;
                    let human = format!("{name}: generation {}, {} of {} parties arrived",
                        v["generation"], v["arrived"].as_array().map_or(0, |a| a.len()), v["parties"]);
                    out(v, human);
                }
                BarrierCmd::Status { name, double: true } => {
                    let v = client.double_barrier_status(&name).await?;
                    let human = format!("{name}: generation {}, {}; {} entering, {} inside ({} not leaving)",
                        v["generation"], v["phase"].as_str().unwrap_or(""),
                        v["entering"].as_array().map_or(0, |a| a.len()),
                        v["inside"].as_array().map_or(0, |a| a.len()), v["remaining"]);
                    out(v, human);
                }
                BarrierCmd::Enter { name, lease, parties, wait_ms, generation } => {
                    let v = client.double_barrier_enter(&name, lease, parties, wait_ms, generation).await?;
                    let human = format!("{name}: entered generation {} (token {})", v["generation"], v["token"]);
                    out(v, human);
                }
                BarrierCmd::Leave { name, lease, parties, wait_ms } => {
                    let v = client.double_barrier_leave(&name, lease, parties, wait_ms).await?;
                    let human = format!("{name}: everyone left generation {} (token {})", v["generation"], v["token"]);
                    out(v, human);
                }
            },
            Cmd::Election(c) => match c {
                ElectionCmd::Campaign { name, lease, value, wait_ms } => {
                    let v = client.election_campaign(&name, lease, &value, wait_ms).await?;
                    let human = v["token"].to_string();
                    out(v, human);
                }
                ElectionCmd::Proclaim { name, lease, value } => {
                    let v = client.election_proclaim(&name, lease, &value).await?;
                    out(v, format!("{name}: value proclaimed"));
                }
                ElectionCmd::Resign { name, lease } => {
                    let v = client.election_resign(&name, lease).await?;
                    let human = match v["leader"].as_u64() {
                        Some(l) => format!("{name}: resigned; lease {l} leads with token {}", v["token"]),
                        None => format!("{name}: resigned"),
                    };
                    out(v, human);
                }
                ElectionCmd::Status { name } => {
                    let v = client.election_status(&name).await?;
                    let waiting = v["candidates"].as_array().map_or(0, |c| c.len());
                    let human = match v["leader"].as_u64() {
                        Some(l) => format!("{name}: led by lease {l} with token {} (value {}); {waiting} candidates",
                            v["token"], v["value"]),
                        None => format!("{name}: no leader"),
                    };
                    out(v, human);
                }
            },
            Cmd::Queue(c) => match c {
                QueueCmd::Push { name, item, priority } => {
                    let v = client.queue_push(&name, &item, priority).await?;
                    let human = v["id"].to_string();
                    out(v, human);
                }
                QueueCmd::Claim { name, lease, wait_ms } => {
                    let v = client.queue_claim(&name, lease, wait_ms).await?;
                    let human = format!("{}\t{}", v["id"], v["item"].as_str().unwrap_or(""));
                    out(v, human);
                }
                QueueCmd::Ack { name, id, lease } => {
                    let v = client.queue_ack(&name, lease, id).await?;
                    out(v, format!("{name}: item {id} acked"));
                }
                QueueCmd::Nack { name, id, lease } => {
                    let v = client.queue_nack(&name, lease, id).await?;
                    out(v, format!("{name}: item {id} returned"));
                }
                QueueCmd::Status { name, limit } => {
                    let v = client.queue_status(&name, limit).await?;
                    let human = format!("{name}: {} pending, {} claimed, {} waiting claimers",
                        v["pending_count"], v["claimed_count"], v["waiting_count"]);
                    out(v, human);
                }
            },
            Cmd::Lock(c) => match c {
                LockCmd::Acquire {
                    name,
                    lease,
                    wait_ms,
                    mode,
                } => {
                    let token = client.lock_acquire_mode(&name, lease, wait_ms, &mode).await?;
                    out(
                        json!({"lock": name, "lease_id": lease, "mode": mode, "token": token}),
                        token.to_string(),
                    );
                }
                LockCmd::Release { name, lease } => {
                    let v = client.lock_release(&name, lease).await?;
                    out(v, format!("{name} released"));
                }
                LockCmd::Status { name } => {
                    let v = client.lock_status(&name).await?;
                    let waiting = v["queue"].as_array().map_or(0, |q| q.len());
                    let human = match (v["holder"].is_null(), v["shared_holders"].as_array()) {
                        (false, _) => format!(
                            "{name} held by lease {} with token {}; {waiting} waiting",
                            v["holder"]["lease_id"], v["holder"]["token"],
                        ),
                        (true, Some(s)) if !s.is_empty() => format!(
                            "{name} held shared by {} leases; {waiting} waiting",
                            s.len()
                        ),
                        _ => format!("{name} is free"),
                    };
                    out(v, human);
                }
                LockCmd::Run {
                    name,
                    ttl_ms,
                    wait_ms,
                    cmd,
                } => {
                    return lock_run(&client, &name, ttl_ms, wait_ms, &cmd)
                        .await
                        .map(|c| {
                            std::process::exit(c);
                        });
                }
            },
        }
        Ok(())
    }
    .await;
    match res {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            if cli.json {
                match &e {
                    ClientError::Api { body, .. } => println!("{body}"),
                    ClientError::Unavailable(m) => println!(
                        "{}",
                        json!({"error": {"code": "unavailable", "message": m}})
                    ),
                }
            } else {
                eprintln!("error: {e}");
            }
            Ok(ExitCode::from(match e.code() {
                "unavailable" | "no_leader" => 3,
                _ => 2,
            }))
        }
    }
}

async fn serve(args: &ServeArgs) -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,openraft=warn".into()),
        )
        .init();
    let cfg = args.validate().map_err(anyhow::Error::msg)?;
    let mut running = concord::node::start(cfg).await.context("starting node")?;
    let node = running.node.clone();
    tokio::select! {
        _ = running.wait() => {}
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("shutting down");
        }
    }
    node.stopping.send_replace(true);
    let _ = node.raft.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

/// Hold a lock while a command runs. Exit code: the command's, or 75 if the lease was lost.
async fn lock_run(
    client: &Client,
    name: &str,
    ttl_ms: u64,
    wait_ms: u64,
    cmd: &[String],
) -> Result<i32, ClientError> {
    let lease = client.lease_grant(ttl_ms, Some("concord lock run")).await?;
    let token = match client.lock_acquire(name, lease, wait_ms).await {
        Ok(t) => t,
        Err(e) => {
            let _ = client.lease_revoke(lease).await;
            return Err(e);
        }
    };
    let mut child = match tokio::process::Command::new(&cmd[0])
        .args(&cmd[1..])
        .env("CONCORD_FENCE", token.to_string())
        .env("CONCORD_LOCK", name)
        .env("CONCORD_LEASE", lease.to_string())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            let _ = client.lease_revoke(lease).await;
            eprintln!("error: cannot start {}: {e}", cmd[0]);
            return Ok(127);
        }
    };
    let mut tick = tokio::time::interval(Duration::from_millis((ttl_ms / 3).max(100)));
    tick.tick().await;
    loop {
        tokio::select! {
            status = child.wait() => {
                let code = status.ok().and_then(|s| s.code()).unwrap_or(1);
                let _ = client.lock_release(name, lease).await;
                let _ = client.lease_revoke(lease).await;
                return Ok(code);
            }
            _ = tick.tick() => {
                if let Err(e) = client.lease_keepalive(lease).await {
                    if e.code() == "lease_not_found" {
                        eprintln!("error: lease {lease} lost; stopping the command");
                        let _ = child.kill().await;
                        return Ok(75);
                    }
                }
            }
        }
    }
}

/// Follow `/v1/watch`, printing each change as a JSON line; on a broken stream, resume from
/// the next revision on the next endpoint.
async fn watch(
    client: &Client,
    prefix: &str,
    types: Option<&str>,
    from: Option<u64>,
) -> Result<(), ClientError> {
    // Resume from the revision of the last change printed, skipping the changes of that
    // revision already printed (one entry can make several changes).
    let mut next = from;
    let mut printed_at: Option<(u64, usize)> = None;
    let mut endpoint = 0;
    let mut failures = 0;
    loop {
        let mut q = format!("prefix={}", concord::client::encode_segment(prefix));
        if let Some(t) = types {
            q += &format!("&types={t}");
        }
        let start = printed_at.map(|(r, _)| r).or(next);
        if let Some(r) = start {
            q += &format!("&from_revision={r}");
        }
        let mut skip = printed_at.map_or(0, |(_, n)| n);
        match client.watch(endpoint, &q).await {
            Ok(mut w) => loop {
                match w.next().await {
                    Ok(Some(ev)) if ev.event == "change" => {
                        failures = 0;
                        let rev = ev.data["revision"].as_u64().unwrap_or(0);
                        if Some(rev) == start && skip > 0 {
                            skip -= 1;
                            continue;
                        }
                        printed_at = match printed_at {
                            Some((r, n)) if r == rev => Some((r, n + 1)),
                            _ => Some((rev, 1)),
                        };
                        println!("{}", ev.data);
                    }
                    Ok(Some(ev)) if ev.event == "progress" => {
                        // Everything up to here was sent: resume after it.
                        if let Some(r) = ev.data["revision"].as_u64() {
                            if printed_at.is_none_or(|(p, _)| p <= r) {
                                next = Some(r + 1).max(next);
                                printed_at = None;
                            }
                        }
                    }
                    Ok(Some(ev)) if ev.event == "compacted" => {
                        return Err(ClientError::Api {
                            status: 410,
                            code: "compacted".into(),
                            message: format!(
                                "history before {} is gone",
                                ev.data["oldest_revision"]
                            ),
                            body: ev.data,
                        });
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            },
            Err(e @ ClientError::Api { .. }) => return Err(e),
            Err(_) => {}
        }
        failures += 1;
        if failures > 3 * client.endpoint_count() {
            return Err(ClientError::Unavailable(
                "no endpoint serves the watch".into(),
            ));
        }
        endpoint += 1;
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// One line of `concord conflicts` per recent deadlock: a refusal, or a victim's cancelled
/// wait (records written before victim policies have no `requester`: they are refusals).
fn deadlock_line(d: &Value) -> String {
    let resource = d["resource"].as_str().unwrap_or("");
    match d["requester"].as_u64() {
        Some(r) if Some(r) != d["victim"].as_u64() => format!(
            "deadlock at index {}: lease {}'s wait on {resource} cancelled by policy {} (lease {r} proceeds)\n",
            d["index"],
            d["victim"],
            d["policy"].as_str().unwrap_or("")
        ),
        _ => format!(
            "deadlock refused at index {}: lease {} on {resource}\n",
            d["index"], d["victim"]
        ),
    }
}

/// The wait-for graph of `/v1/conflicts` in Graphviz dot format.
fn conflicts_dot(v: &Value) -> String {
    let mut s = String::from("digraph wait_for {\n  rankdir=LR;\n");
    for e in v["wait_for"].as_array().into_iter().flatten() {
        s += &format!(
            "  \"lease {}\" -> \"lease {}\" [label=\"{}\"];\n",
            e["lease_id"],
            e["waits_for"],
            e["resource"].as_str().unwrap_or("").replace('"', "\\\"")
        );
    }
    s += "}";
    s
}
