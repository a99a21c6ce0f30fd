//! Wiring: open the store, start Raft, serve HTTP, initialize the cluster once, run the
//! leader-only ticker, and shut down.

use openraft::async_runtime::WatchReceiver;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openraft::errors::RaftError;
use openraft::{BasicNode, SnapshotPolicy};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Mutex};
use tokio::task::JoinHandle;

use crate::api::error::ApiError;
use crate::config::Config;
use crate::faults::Faults;
use crate::network::Network;
use crate::propose;
use crate::sm::{Command, ErrorCode, LogEntry, Response};
use crate::store::{self, FsyncStats, SmShared};
use crate::types::{NodeId, Raft};

/// How long a request waits for an election to produce a leader before answering 503.
pub const LEADER_WAIT: Duration = Duration::from_secs(3);

/// How often the leader checks for due deadlines.
const TICK_INTERVAL: Duration = Duration::from_millis(50);

/// One running Concord node, shared by every request handler.
pub struct Node {
    pub id: NodeId,
    pub addr: String,
    pub raft: Raft,
    pub sm: Arc<SmShared>,
    pub fsync: Arc<FsyncStats>,
    /// Client for forwarding requests to the leader (separate pool from Raft RPCs).
    pub http: reqwest::Client,
    /// Membership changes are serialized: one at a time.
    pub membership_lock: Mutex<()>,
    /// The link fault switch (chaos tests).
    pub faults: Arc<Faults>,
    /// Replication streams opened and accepted (`raft_stream`; `/v1/cluster`).
    pub streams: Arc<crate::raft_stream::StreamStats>,
    /// Set when the node shuts down, so blocked calls answer at once (and clients retry
    /// elsewhere) instead of waiting on a state machine that no longer moves.
    pub stopping: tokio::sync::watch::Sender<bool>,
    /// Writes proposed on a follower go to the leader through this queue (`propose.rs`).
    pub forwarder: crate::propose::Forwarder,
    /// DELIBERATELY UNSAFE debugging mode: serve every read from local state without a read
    /// index. Exists so the chaos checkers can be shown to catch stale reads.
    pub unsafe_stale_reads: bool,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Node {
    /// Propose a command through Raft and return the state machine's response. On a follower
    /// the entry goes to the leader in a batch with others (`propose.rs`; no leader within
    /// [`LEADER_WAIT`]: `no_leader`, 503, retry), and the answer comes once the leader applied
    /// it: this node may not have yet (the response's `X-Concord-Index` is the entry's index).
    pub async fn propose(
        &self,
        cmd: Command,
        request_id: Option<String>,
    ) -> Result<Response, ApiError> {
        self.propose_indexed(cmd, request_id).await.map(|(_, r)| r)
    }

    /// [`Node::propose`], returning once this node has applied the entry too, with its index:
    /// for handlers that go on to read this node's state.
    pub async fn propose_at(
        &self,
        cmd: Command,
        request_id: Option<String>,
    ) -> Result<(u64, Response), ApiError> {
        let (index, response) = self.propose_indexed(cmd, request_id).await?;
        propose::await_applied(self, index).await?;
        Ok((index, response))
    }

    /// [`Node::propose`], also returning the entry's index, without waiting for this node's
    /// apply: a handler that reads this node's state only in some outcomes (an acquire that
    /// queued) waits for it then (`propose::await_applied`).
    pub async fn propose_indexed(
        &self,
        cmd: Command,
        request_id: Option<String>,
    ) -> Result<(u64, Response), ApiError> {
        let entry = LogEntry {
            time_ms: now_ms(),
            request_id,
            cmd,
        };
        let (index, response) = if self.current_leader() == Some(self.id) {
            match self.raft.client_write(Arc::new(entry)).await {
                Ok(r) => (r.log_id.index(), r.data),
                Err(RaftError::APIError(e)) => return Err(propose::write_error(e).into()),
                Err(RaftError::Fatal(e)) => {
                    let msg = format!("raft stopped: {e}");
                    return Err(ApiError::new(ErrorCode::Unavailable, msg));
                }
            }
        } else {
            self.forwarder.submit(entry).await?
        };
        crate::api::note_write_index(index);
        Ok((index, response))
    }

    /// The current leader, waiting up to [`LEADER_WAIT`] for an election to produce one.
    pub async fn wait_for_leader(&self) -> Option<NodeId> {
        self.wait_for_leader_except(None).await
    }

    /// The current leader if it is not `stale`, else the next one within [`LEADER_WAIT`].
    pub async fn wait_for_leader_except(&self, stale: Option<NodeId>) -> Option<NodeId> {
        let known = |l: Option<NodeId>| l.filter(|l| Some(*l) != stale);
        if let Some(l) = known(self.current_leader()) {
            return Some(l);
        }
        let mut rx = self.raft.metrics();
        let wait = async {
            loop {
                if let Some(l) = known(rx.borrow_and_update().current_leader) {
                    return Some(l);
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        };
        tokio::time::timeout(LEADER_WAIT, wait).await.ok().flatten()
    }

    pub fn current_leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow_watched().current_leader
    }

    pub fn node_addr(&self, id: NodeId) -> Option<String> {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        m.membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone())
    }

    /// Make a linearizable read possible: confirm leadership with a quorum (read index) and
    /// wait until this node applied up to it.
    pub async fn read_barrier(&self) -> Result<(), ApiError> {
        if self.unsafe_stale_reads {
            return Ok(());
        }
        self.raft
            .ensure_linearizable(openraft::raft::ReadPolicy::ReadIndex)
            .await
            .map(|_| ())
            .map_err(|e| ApiError::new(ErrorCode::NoLeader, format!("read index failed: {e}")))
    }
}

/// A started node: its address and how to stop it.
pub struct Running {
    pub node: Arc<Node>,
    pub local_addr: std::net::SocketAddr,
    shutdown_tx: Option<oneshot::Sender<()>>,
    server: JoinHandle<()>,
    ticker: JoinHandle<()>,
}

impl Running {
    /// Stop serving and stop Raft; the store is closed when this returns.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown_tx.take() {
            let _ = tx.send(());
        }
        self.ticker.abort();
        self.node.stopping.send_replace(true);
        let _ = self.node.raft.shutdown().await;
        self.server.abort();
        let _ = (&mut self.server).await;
        let _ = (&mut self.ticker).await;
    }

    /// Wait until the server stops (for `concord serve`).
    pub async fn wait(&mut self) {
        let _ = (&mut self.server).await;
    }
}

/// Open storage, start Raft and the HTTP server on an already bound listener.
pub async fn start_with_listener(cfg: Config, listener: TcpListener) -> anyhow::Result<Running> {
    let (log_store, sm_store) = open_store_retrying(&cfg).await?;
    let raft_cfg = openraft::Config {
        cluster_name: "concord".into(),
        heartbeat_interval: cfg.heartbeat_ms,
        election_timeout_min: cfg.election_ms,
        election_timeout_max: cfg.election_ms * 2,
        install_snapshot_timeout: 10_000,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_entries),
        max_in_snapshot_log_to_keep: cfg.keep_logs,
        enable_pre_vote: Some(true),
        ..Default::default()
    };
    let raft_cfg = Arc::new(raft_cfg.validate()?);
    let sm = sm_store.shared.clone();
    let fsync = log_store.stats.clone();
    let faults = Arc::new(Faults::new(cfg.fault_injection));
    let streams = Arc::new(crate::raft_stream::StreamStats::default());
    let network = Network::new(cfg.id, faults.clone(), streams.clone());
    let raft = Raft::new(cfg.id, raft_cfg, network, log_store, sm_store).await?;
    let http = reqwest::Client::builder()
        .tcp_nodelay(true)
        .no_proxy()
        .build()?;
    let (forwarder, queue) = propose::Forwarder::new();
    let node = Arc::new(Node {
        id: cfg.id,
        addr: cfg.advertise.clone(),
        raft,
        sm,
        fsync,
        http,
        membership_lock: Mutex::new(()),
        faults,
        streams,
        forwarder,
        stopping: tokio::sync::watch::channel(false).0,
        unsafe_stale_reads: cfg.unsafe_stale_reads,
    });
    tokio::spawn(propose::run(Arc::downgrade(&node), queue));
    if cfg.unsafe_stale_reads {
        tracing::warn!("--unsafe-stale-reads: reads skip the read index and may be stale");
    }
    let local_addr = listener.local_addr()?;
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let app = crate::api::router(node.clone());
    // No Nagle delay on answers (Go, and so etcd, does the same): the replication stream
    // (`raft_stream`) writes answers back to back, and a small write waiting for the ACK of the
    // previous one waits for the peer's delayed ACK (40 ms on Linux).
    // Keepalive: a replication stream whose leader vanished (host gone, packets dropped) is
    // found dead by the kernel and its task ends, instead of waiting for bytes forever.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY on an accepted connection: {e}");
        }
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(30))
            .with_interval(Duration::from_secs(10))
            .with_retries(3);
        if let Err(e) = socket2::SockRef::from(&*tcp).set_tcp_keepalive(&keepalive) {
            tracing::debug!("TCP keepalive on an accepted connection: {e}");
        }
    });
    let server = tokio::spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = shutdown_rx.await;
            })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "http server stopped");
        }
    });
    if let Some(members) = &cfg.initial_cluster {
        initialize_once(&node, members).await?;
    }
    let ticker = tokio::spawn(ticker(node.clone()));
    tracing::info!(id = cfg.id, addr = %local_addr, "concord node started");
    Ok(Running {
        node,
        local_addr,
        shutdown_tx: Some(shutdown_tx),
        server,
        ticker,
    })
}

pub async fn start(cfg: Config) -> anyhow::Result<Running> {
    let listener = TcpListener::bind(&cfg.listen).await?;
    start_with_listener(cfg, listener).await
}

/// RocksDB keeps a lock file; a node restarted in the same process may find the previous
/// instance still closing, so retry briefly.
async fn open_store_retrying(
    cfg: &Config,
) -> anyhow::Result<(store::LogStore, store::StateMachineStore)> {
    let mut last = None;
    for _ in 0..50 {
        match store::open(&cfg.data_dir) {
            Ok(s) => return Ok(s),
            Err(e) if e.to_string().contains("lock") => {
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(last
        .map(anyhow::Error::from)
        .unwrap_or_else(|| anyhow::anyhow!("cannot open store")))
}

/// Initialize a pristine node with the initial members. Every member does this with the same
/// membership, which yields the same first log entry everywhere, so it is safe.
async fn initialize_once(node: &Node, members: &BTreeMap<NodeId, String>) -> anyhow::Result<()> {
    if node.raft.is_initialized().await? {
        return Ok(());
    }
    let nodes: BTreeMap<NodeId, BasicNode> = members
        .iter()
        .map(|(id, addr)| (*id, BasicNode { addr: addr.clone() }))
        .collect();
    if let Err(e) = node.raft.initialize(nodes).await {
        tracing::info!(error = %e, "initialize skipped");
    }
    Ok(())
}

/// Leader-only: propose a `Tick` when a lease or wait deadline is due and nothing else was
/// written. (The leader-change grace is applied by the state machine itself, on the first
/// entry of each new term.)
async fn ticker(node: Arc<Node>) {
    loop {
        tokio::time::sleep(TICK_INTERVAL).await;
        if node.current_leader() != Some(node.id) {
            continue;
        }
        let due = node
            .sm
            .read()
            .sm
            .next_deadline()
            .is_some_and(|d| d <= now_ms());
        if due {
            if let Err(e) = node.propose(Command::Tick, None).await {
                tracing::debug!(error = %e.message, "tick failed");
            }
        }
    }
}
