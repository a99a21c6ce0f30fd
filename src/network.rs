//! Raft RPC client: HTTP POST with bincode bodies to `/raft/*` on the peer, over one pooled
//! `reqwest` client with TCP_NODELAY. The server side is `api::raft`.

use std::future::Future;
use std::io::Cursor;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use openraft::alias::SnapshotOf;
use openraft::base::{BoxFuture, BoxStream};
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::v2::RaftNetworkV2;
use openraft::network::{stream_append_sequential, RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, OptionalSend};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::faults::Faults;
use crate::raft_stream;
use crate::types::{NodeId, SnapshotMeta, TypeConfig, Vote};

type StreamAnswer = Result<openraft::raft::StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>;

/// Body of `/raft/snapshot`.
pub type SnapshotRequest = (Vote, SnapshotMeta, Vec<u8>);

/// How long a peer without the replication stream is replicated to one request at a time
/// before it is asked again.
const STREAM_RETRY: Duration = Duration::from_secs(60);

/// Header naming the sending node on Raft RPCs (for the fault switch on the receiver).
pub const FROM_HEADER: &str = "x-concord-from";

/// The sending node named by a request's [`FROM_HEADER`], if any.
pub fn from_node(headers: &axum::http::HeaderMap) -> Option<NodeId> {
    headers
        .get(FROM_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// The error of an RPC to `target` while the fault switch cuts the link.
pub fn link_cut(target: NodeId) -> RPCError<TypeConfig> {
    let msg = format!("link to node {target} is cut by the fault switch");
    RPCError::Unreachable(Unreachable::from_string(msg))
}

#[derive(Clone)]
pub struct Network {
    client: reqwest::Client,
    id: NodeId,
    faults: Arc<Faults>,
    streams: Arc<raft_stream::StreamStats>,
}

impl Network {
    pub fn new(id: NodeId, faults: Arc<Faults>, streams: Arc<raft_stream::StreamStats>) -> Network {
        let client = reqwest::Client::builder()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(16)
            .connect_timeout(Duration::from_secs(2))
            .no_proxy()
            .build()
            .expect("http client");
        Network {
            client,
            id,
            faults,
            streams,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        Peer {
            target,
            addr: node.addr.clone(),
            client: self.client.clone(),
            from: self.id,
            faults: self.faults.clone(),
            no_streams_since: None,
            stats: self.streams.clone(),
        }
    }
}

pub struct Peer {
    target: NodeId,
    addr: String,
    client: reqwest::Client,
    from: NodeId,
    faults: Arc<Faults>,
    /// When the peer last answered that it has no replication stream (an older version);
    /// asked again after [`STREAM_RETRY`], as it may have been upgraded meanwhile.
    no_streams_since: Option<std::time::Instant>,
    stats: Arc<raft_stream::StreamStats>,
}

/// Why a bincode POST to another node failed.
#[derive(Debug)]
pub enum PostError {
    /// No connection could be made: the peer did not get the request.
    Connect(reqwest::Error),
    /// The request or its answer broke off (or timed out): the peer may have acted on it.
    Transport(reqwest::Error),
    /// The peer answered with an error status (and this body).
    Status(reqwest::StatusCode, String),
}

impl std::fmt::Display for PostError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PostError::Connect(e) | PostError::Transport(e) => write!(f, "{e}"),
            PostError::Status(status, body) => write!(f, "answered {status}: {body}"),
        }
    }
}

/// POST a bincode `body` to `http://{addr}{path}` as node `from`; the answer's bytes on success.
/// Raft RPCs and forwarded proposals both go this way.
pub async fn post_bincode(
    client: &reqwest::Client,
    addr: &str,
    path: &str,
    from: NodeId,
    body: Vec<u8>,
    timeout: Duration,
) -> Result<axum::body::Bytes, PostError> {
    let resp = client
        .post(format!("http://{addr}{path}"))
        .header("content-type", "application/octet-stream")
        .header(FROM_HEADER, from)
        .body(body)
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| {
            if e.is_connect() {
                PostError::Connect(e)
            } else {
                PostError::Transport(e)
            }
        })?;
    let status = resp.status();
    let bytes = resp.bytes().await.map_err(PostError::Transport)?;
    if !status.is_success() {
        let text = String::from_utf8_lossy(&bytes).into_owned();
        return Err(PostError::Status(status, text));
    }
    Ok(bytes)
}

impl Peer {
    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        path: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<TypeConfig>> {
        if self.faults.is_blocked(self.target) {
            return Err(link_cut(self.target));
        }
        let body = bincode::serialize(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let path = format!("/raft/{path}");
        let bytes = post_bincode(&self.client, &self.addr, &path, self.from, body, timeout)
            .await
            .map_err(|e| match e {
                PostError::Connect(e) => RPCError::Unreachable(Unreachable::new(&e)),
                PostError::Transport(e) => RPCError::Network(NetworkError::new(&e)),
                e @ PostError::Status(..) => RPCError::Unreachable(Unreachable::from_string(
                    format!("node {} {e}", self.target),
                )),
            })?;
        bincode::deserialize(&bytes).map_err(|e| RPCError::Network(NetworkError::new(&e)))
    }
}

impl RaftNetworkV2<TypeConfig> for Peer {
    type SnapshotData = Cursor<Vec<u8>>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call("append", &rpc, option.hard_ttl()).await
    }

    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<'s, Result<BoxStream<'s, StreamAnswer>, RPCError<TypeConfig>>>
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + OptionalSend + Unpin + 'static,
    {
        Box::pin(async move {
            if self.faults.is_blocked(self.target) {
                return Err(link_cut(self.target));
            }
            // A stream of exactly one request (openraft's heartbeats: `stream::once`) goes as
            // one plain request over the pooled connections; opening a stream costs more.
            let single = input.size_hint().1 == Some(1);
            let refused = self
                .no_streams_since
                .is_some_and(|t| t.elapsed() < STREAM_RETRY);
            if !refused && !single {
                let ttl = option.hard_ttl();
                match raft_stream::open(&self.client, &self.addr, self.from, ttl).await? {
                    raft_stream::Opened::Stream(conn) => {
                        self.stats.opened.fetch_add(1, Ordering::Relaxed);
                        let (faults, stats) = (self.faults.clone(), self.stats.clone());
                        let target = self.target;
                        return Ok(raft_stream::pipeline(
                            conn, input, faults, stats, target, ttl,
                        ));
                    }
                    raft_stream::Opened::Unsupported => {
                        tracing::info!(
                            target = self.target,
                            "peer has no replication stream; sending one request at a time"
                        );
                        self.no_streams_since = Some(std::time::Instant::now());
                        self.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            stream_append_sequential(self, input, option).await
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call("vote", &rpc, option.hard_ttl()).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call("pre-vote", &rpc, option.hard_ttl()).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: SnapshotOf<TypeConfig, Self::SnapshotData>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let req: SnapshotRequest = (vote, snapshot.meta, snapshot.snapshot.into_inner());
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            res = self.call("snapshot", &req, option.hard_ttl()) => Ok(res?),
        }
    }
}
