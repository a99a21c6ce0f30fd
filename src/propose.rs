//! Proposals from a follower: the command, not the HTTP request, goes to the leader, and the
//! commands of many concurrent requests share one RPC.
//!
//! A write sent to a follower is parsed and checked there. Its log entry joins a queue; one
//! task drains the queue into batches (up to [`MAX_BATCH`] entries or [`MAX_BATCH_BYTES`]) and
//! posts each batch as one bincode body to the leader's `/raft/propose`, with at most
//! [`MAX_IN_FLIGHT`] batches outstanding: while they are, the queue fills, so batches grow
//! with load. The leader stamps the entries with its own clock, submits the whole batch to
//! Raft at once (`client_write_many`) and answers with each entry's log index and state
//! machine response. Handlers that go on to read this node's state (an acquire that queued,
//! which watches for its grant here) first wait until this node has applied that index
//! (`await_applied`); the others, and an acquire granted at once, answer at once, with the
//! index in `X-Concord-Index`.
//!
//! Proxying every HTTP request cost the leader an HTTP exchange and a JSON parse per request;
//! with clients spread over three nodes that was 30-40 % of `put` throughput at 64 clients
//! (docs/benchmarks.md).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::StreamExt;
use openraft::errors::ClientWriteError;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::api::error::ApiError;
use crate::node::{now_ms, Node};
use crate::sm::{ErrorCode, LogEntry, Response};
use crate::types::NodeId;

/// Entries per batch, at most.
pub const MAX_BATCH: usize = 512;
/// Encoded bytes per batch, at most (one entry larger than this still goes, alone).
pub const MAX_BATCH_BYTES: usize = 4 << 20;
/// Batches outstanding to the leader at once. Each batch costs the leader an HTTP exchange and
/// a Raft write of its own, so fewer, larger batches cost less per entry: with 2 instead of 4,
/// put with 64 clients took 5 to 8 % less server CPU per op for the same throughput, and put
/// with 256 clients and lock-contended were unchanged (docs/benchmarks.md). A single batch
/// outstanding would make every entry that arrives during a round trip wait for all of it.
pub const MAX_IN_FLIGHT: usize = 2;
/// How long a forwarded batch may take. Proposals do not block on coordination waits (those
/// happen on the follower), only on the commit.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a follower waits to apply an entry the leader reported committed.
const APPLY_WAIT: Duration = Duration::from_secs(5);

/// The outcome of one proposed entry: its log index and the state machine's response, or
/// an error code and message.
pub type Outcome = Result<(u64, Response), Refusal>;

/// A proposal's failure, as it crosses the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl From<ApiError> for Refusal {
    fn from(e: ApiError) -> Refusal {
        Refusal {
            code: e.code,
            message: e.message,
        }
    }
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> ApiError {
        ApiError::new(r.code, r.message)
    }
}

fn refusal(code: ErrorCode, message: impl Into<String>) -> Refusal {
    Refusal {
        code,
        message: message.into(),
    }
}

struct Pending {
    entry: LogEntry,
    reply: oneshot::Sender<Outcome>,
}

/// The follower's side: a queue of entries for the leader.
pub struct Forwarder {
    tx: mpsc::UnboundedSender<Pending>,
    stats: Arc<ForwardStats>,
}

/// Batches and entries this node sent to a leader (`/v1/cluster`: entries per batch).
#[derive(Default)]
pub struct ForwardStats {
    pub batches: AtomicU64,
    pub entries: AtomicU64,
}

impl Forwarder {
    /// The queue, and the receiving end for [`run`].
    pub fn new() -> (Forwarder, Queue) {
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(ForwardStats::default());
        let queue = Queue {
            rx,
            stats: stats.clone(),
        };
        (Forwarder { tx, stats }, queue)
    }

    pub fn stats(&self) -> &ForwardStats {
        &self.stats
    }

    /// Send `entry` to the leader with the next batch and wait for its outcome.
    pub async fn submit(&self, entry: LogEntry) -> Outcome {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Pending { entry, reply }).is_err() {
            return Err(refusal(ErrorCode::Unavailable, "this node is stopping"));
        }
        rx.await.unwrap_or_else(|_| {
            Err(refusal(
                ErrorCode::Unavailable,
                "the forwarded write was dropped; its outcome is unknown, retry with the same request_id",
            ))
        })
    }
}

/// The receiving end of a [`Forwarder`]'s queue.
pub struct Queue {
    rx: mpsc::UnboundedReceiver<Pending>,
    stats: Arc<ForwardStats>,
}

/// Drain the queue into batches for the leader until the node is dropped.
pub async fn run(node: Weak<Node>, queue: Queue) {
    let Queue { mut rx, stats } = queue;
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        // Wait for a slot before draining: entries that arrive meanwhile join this batch.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let mut bytes = encoded_len(&first.entry);
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += encoded_len(&p.entry);
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        // A request whose client went away while it queued is not proposed at all.
        batch.retain(|p| !p.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let Some(node) = node.upgrade() else {
            return;
        };
        let stats = stats.clone();
        tokio::spawn(async move {
            let (entries, replies): (Vec<_>, Vec<_>) =
                batch.into_iter().map(|p| (p.entry, p.reply)).unzip();
            let outcomes = send(&node, &stats, entries).await;
            drop(permit);
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(outcome);
            }
        });
    }
}

fn encoded_len(e: &LogEntry) -> usize {
    bincode::serialized_size(e).map_or(0, |n| n as usize)
}

/// One batch to whoever leads now (this node included: leadership may have moved here). The
/// entries a stale leader refused (`no_leader`: not proposed) go once more, to the next leader.
async fn send(node: &Node, stats: &ForwardStats, entries: Vec<LogEntry>) -> Vec<Outcome> {
    let n = entries.len();
    let mut outcomes: Vec<Option<Outcome>> = vec![None; n];
    let mut todo: Vec<usize> = (0..n).collect();
    let mut stale = None;
    for _attempt in 0..2 {
        let Some(leader) = node.wait_for_leader_except(stale).await else {
            break;
        };
        let batch: Vec<&LogEntry> = todo.iter().map(|&i| &entries[i]).collect();
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats
            .entries
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let answers = match send_to(node, leader, &batch).await {
            Ok(a) if a.len() == batch.len() => a,
            Ok(a) => {
                let msg = format!(
                    "leader {leader} answered {} outcomes for {} entries",
                    a.len(),
                    batch.len()
                );
                vec![Err(refusal(ErrorCode::Unavailable, msg)); batch.len()]
            }
            Err(e) => vec![Err(e); batch.len()],
        };
        let mut again = Vec::new();
        for (i, answer) in todo.into_iter().zip(answers) {
            if matches!(&answer, Err(r) if r.code == ErrorCode::NoLeader) {
                again.push(i);
            }
            outcomes[i] = Some(answer);
        }
        todo = again;
        if todo.is_empty() {
            break;
        }
        stale = Some(leader);
    }
    let none = || Err(refusal(ErrorCode::NoLeader, "no leader is elected; retry"));
    outcomes
        .into_iter()
        .map(|o| o.unwrap_or_else(none))
        .collect()
}

/// One batch to `leader`. `no_leader` answers mean the entries were not proposed; any other
/// failure leaves their outcome unknown.
async fn send_to(
    node: &Node,
    leader: NodeId,
    entries: &[&LogEntry],
) -> Result<Vec<Outcome>, Refusal> {
    let unknown = |what: String| {
        refusal(
            ErrorCode::Unavailable,
            format!("{what}; the outcome is unknown, retry with the same request_id"),
        )
    };
    if leader == node.id {
        let owned = entries.iter().map(|e| (*e).clone()).collect();
        return tokio::time::timeout(PROPOSE_TIMEOUT, write_many(node, owned))
            .await
            .map_err(|_| unknown(format!("no commit within {PROPOSE_TIMEOUT:?}")));
    }
    if node.faults.is_blocked(leader) {
        let msg = format!("leader {leader} is unreachable (link cut)");
        return Err(refusal(ErrorCode::Unavailable, msg));
    }
    let addr = node.node_addr(leader).ok_or_else(|| {
        refusal(
            ErrorCode::NoLeader,
            format!("leader {leader} has no known address"),
        )
    })?;
    let body = bincode::serialize(entries).map_err(|e| unknown(e.to_string()))?;
    let bytes = crate::network::post_bincode(
        &node.http,
        &addr,
        "/raft/propose",
        node.id,
        body,
        PROPOSE_TIMEOUT,
    )
    .await
    .map_err(|e| unknown(format!("forwarding to leader {leader}: {e}")))?;
    bincode::deserialize(&bytes).map_err(|e| unknown(format!("bad answer from {leader}: {e}")))
}

/// The leader's side: submit a batch to Raft at once and collect each entry's outcome in
/// order. Entries are stamped with this node's clock: lease deadlines follow the leader's time.
pub async fn write_many(node: &Node, mut entries: Vec<LogEntry>) -> Vec<Outcome> {
    let n = entries.len();
    let now = now_ms();
    for e in &mut entries {
        e.time_ms = now;
    }
    let mut out = Vec::with_capacity(n);
    let entries = entries.into_iter().map(Arc::new);
    match node.raft.client_write_many(entries).await {
        Ok(mut stream) => {
            while let Some(r) = stream.next().await {
                out.push(match r {
                    Ok(Ok(w)) => Ok((w.log_id.index(), w.response)),
                    Ok(Err(e)) => Err(write_error(e)),
                    Err(fatal) => Err(refusal(
                        ErrorCode::Unavailable,
                        format!("raft stopped: {fatal}"),
                    )),
                });
            }
        }
        Err(fatal) => {
            let msg = format!("raft stopped: {fatal}");
            return vec![Err(refusal(ErrorCode::Unavailable, msg)); n];
        }
    }
    // A stream that ended early (the core stopped): the rest did not get an answer.
    while out.len() < n {
        out.push(Err(refusal(ErrorCode::Unavailable, "raft stopped")));
    }
    out
}

pub fn write_error(e: ClientWriteError<crate::types::TypeConfig>) -> Refusal {
    match e {
        ClientWriteError::ForwardToLeader(f) => refusal(
            ErrorCode::NoLeader,
            format!("this node is not the leader (leader: {:?})", f.leader_id),
        ),
        e => refusal(ErrorCode::Unavailable, e.to_string()),
    }
}

/// Wait until this node applied `index`, so the handler reads its own write here.
pub async fn await_applied(node: &Node, index: u64) -> Result<(), ApiError> {
    match tokio::time::timeout(APPLY_WAIT, node.sm.wait_applied(index)).await {
        Ok(true) => Ok(()),
        _ => Err(ApiError::new(
            ErrorCode::Unavailable,
            format!(
                "the write was committed at index {index} but this node has not applied it yet; \
                 retry with the same request_id"
            ),
        )),
    }
}
