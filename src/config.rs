//! `concord serve` configuration: flags and env vars, validated into an immutable [`Config`]
//! before any socket or file is opened.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Args;

use crate::types::NodeId;

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// This node's id (a positive integer, never reused in a cluster).
    #[arg(long, env = "CONCORD_ID", default_value_t = 1)]
    pub id: NodeId,
    /// Address to listen on for the HTTP API and Raft RPCs.
    #[arg(long, env = "CONCORD_LISTEN", default_value = "127.0.0.1:7700")]
    pub listen: String,
    /// Address other nodes and clients use to reach this node (defaults to --listen).
    #[arg(long, env = "CONCORD_ADVERTISE")]
    pub advertise: Option<String>,
    /// Directory for the RocksDB store.
    #[arg(long, env = "CONCORD_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Initial voters, `1=host:port,2=host:port,...`; the cluster initializes itself once.
    /// Without it (and without --join) the node starts as a single-node cluster.
    #[arg(long, env = "CONCORD_INITIAL_CLUSTER")]
    pub initial_cluster: Option<String>,
    /// Start uninitialized and wait to be added with `concord cluster add`.
    #[arg(long, env = "CONCORD_JOIN", default_value_t = false)]
    pub join: bool,
    /// Raft heartbeat interval in milliseconds.
    #[arg(long, env = "CONCORD_HEARTBEAT_MS", default_value_t = 100)]
    pub heartbeat_ms: u64,
    /// Minimum election timeout in milliseconds (the maximum is twice this). A follower
    /// campaigns after hearing nothing for the leader lease (twice this) plus a random
    /// election timeout: 900 to 1200 ms with the default (docs/benchmarks.md, failover).
    #[arg(long, env = "CONCORD_ELECTION_MS", default_value_t = 300)]
    pub election_ms: u64,
    /// Take a snapshot after this many log entries. A snapshot encodes the whole state, so
    /// its cost per entry is the state's size over this; the log tail it leaves lives on disk,
    /// not in memory, and a restart replays it (docs/benchmarks.md, restart). etcd's default
    /// (`--snapshot-count`, 3.4) is the same.
    #[arg(long, env = "CONCORD_SNAPSHOT_ENTRIES", default_value_t = 100_000)]
    pub snapshot_entries: u64,
    /// Enable the link fault switch (`/admin/faults`) for chaos tests. Off by default.
    #[arg(long, env = "CONCORD_ENABLE_FAULT_INJECTION", default_value_t = false)]
    pub enable_fault_injection: bool,
    /// UNSAFE, for testing the chaos checkers only: serve reads from local state without a
    /// read index, so a partitioned old leader answers stale reads.
    #[arg(
        long,
        env = "CONCORD_UNSAFE_STALE_READS",
        default_value_t = false,
        hide = true
    )]
    pub unsafe_stale_reads: bool,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub id: NodeId,
    pub listen: String,
    pub advertise: String,
    pub data_dir: PathBuf,
    /// `None`: join an existing cluster, never initialize.
    pub initial_cluster: Option<BTreeMap<NodeId, String>>,
    pub heartbeat_ms: u64,
    pub election_ms: u64,
    pub snapshot_entries: u64,
    /// Log entries kept behind a snapshot (for slow followers).
    pub keep_logs: u64,
    pub fault_injection: bool,
    pub unsafe_stale_reads: bool,
}

impl ServeArgs {
    pub fn validate(&self) -> Result<Config, String> {
        if self.id == 0 {
            return Err("--id must be a positive integer".into());
        }
        let advertise = self
            .advertise
            .clone()
            .unwrap_or_else(|| self.listen.clone());
        if advertise.starts_with("0.0.0.0") {
            return Err("--advertise must be an address peers can reach, not 0.0.0.0".into());
        }
        let initial_cluster = match (&self.initial_cluster, self.join) {
            (Some(_), true) => return Err("--initial-cluster and --join exclude each other".into()),
            (None, true) => None,
            (None, false) => Some(BTreeMap::from([(self.id, advertise.clone())])),
            (Some(s), false) => {
                let m = parse_members(s)?;
                if !m.contains_key(&self.id) {
                    return Err(format!(
                        "--initial-cluster does not contain this node's id {}",
                        self.id
                    ));
                }
                Some(m)
            }
        };
        if self.heartbeat_ms == 0 || self.election_ms < 3 * self.heartbeat_ms {
            return Err("--election-ms must be at least 3 x --heartbeat-ms".into());
        }
        Ok(Config {
            id: self.id,
            listen: self.listen.clone(),
            advertise,
            data_dir: self.data_dir.clone(),
            initial_cluster,
            heartbeat_ms: self.heartbeat_ms,
            election_ms: self.election_ms,
            snapshot_entries: self.snapshot_entries.max(10),
            keep_logs: 1000,
            fault_injection: self.enable_fault_injection,
            unsafe_stale_reads: self.unsafe_stale_reads,
        })
    }
}

/// Parse `1=host:port,2=host:port`.
pub fn parse_members(s: &str) -> Result<BTreeMap<NodeId, String>, String> {
    let mut m = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| format!("bad member {part:?}: expected ID=HOST:PORT"))?;
        let id: NodeId = id
            .trim()
            .parse()
            .map_err(|_| format!("bad node id in {part:?}"))?;
        if id == 0 || addr.trim().is_empty() {
            return Err(format!("bad member {part:?}"));
        }
        if m.insert(id, addr.trim().to_string()).is_some() {
            return Err(format!("node id {id} listed twice"));
        }
    }
    if m.is_empty() {
        return Err("empty member list".into());
    }
    Ok(m)
}

impl Config {
    /// A config for tests and embedding: one node, given addresses and directory.
    pub fn for_node(
        id: NodeId,
        addr: &str,
        data_dir: PathBuf,
        initial: Option<BTreeMap<NodeId, String>>,
    ) -> Config {
        Config {
            id,
            listen: addr.to_string(),
            advertise: addr.to_string(),
            data_dir,
            initial_cluster: initial,
            heartbeat_ms: 100,
            election_ms: 600,
            snapshot_entries: 20000,
            keep_logs: 1000,
            fault_injection: false,
            unsafe_stale_reads: false,
        }
    }
}
