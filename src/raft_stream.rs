//! Pipelined replication: a leader's AppendEntries to one follower flow over one upgraded
//! HTTP connection, without waiting for each answer before sending the next request.
//!
//! openraft drives replication as a stream of AppendEntries requests (new entries and commit
//! advances as they happen) and reads a stream of answers in the same order. Sent one request
//! per HTTP exchange, each request waited for the previous answer: an entry written while the
//! follower was fsyncing the previous batch (or receiving a commit notice) waited a whole round
//! trip before it was even sent. Here the leader opens `POST /raft/stream` with
//! `Upgrade: concord-raft-stream/1`; after `101 Switching Protocols` the connection carries
//! frames (4-byte big-endian length, then bincode): requests one way, answers the other, in
//! order, on one TCP stream, so the follower sees them in the order sent.
//!
//! The leader holds back while the follower has unanswered entries: it asks openraft for the
//! next request only while fewer than [`WINDOW`] places are taken. openraft builds each request
//! when asked, from everything written since the last one, so holding back makes the next
//! request carry all that arrived meanwhile: under `put` with 64 clients a request carried
//! about 5 entries when each went out as soon as it was written, and 19 with the window; each
//! request costs both nodes a frame, a Raft core round, a RocksDB write and an answer
//! (docs/benchmarks.md). A request takes a place per entry, as many as are free (at least one,
//! so it never waits once asked for), and a request of [`FULL`] entries or more takes one place
//! only: it already spreads its fixed costs, and a follower catching up (openraft sends up to
//! 300 entries per request) or a long link keeps several requests in flight. Requests of an
//! entry or two (a lock handed from waiter to waiter) go at once, several in flight, so
//! latency-bound workloads keep their pipelining.
//!
//! Failures end the stream and openraft opens a new one: no answer at all for the RPC timeout
//! while requests are outstanding (a partition that silently drops packets), a broken
//! connection, or the fault switch cutting the link (checked for every frame on both sides, and
//! again as the follower hands a request to Raft). A peer without the endpoint (an older version
//! during a rolling upgrade) answers 404; the leader then replicates to it one request at a
//! time, as before, and asks again a minute later.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, BoxStream, StreamExt};
use openraft::errors::{NetworkError, RPCError, Unreachable};
use openraft::raft::{AppendEntriesRequest, StreamAppendResult};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;

use crate::faults::Faults;
use crate::network::link_cut;
use crate::node::Node;
use crate::types::{NodeId, TypeConfig};

/// The `Upgrade` protocol name; a new framing would get a new name.
pub const PROTOCOL: &str = "concord-raft-stream/1";
/// The path of the upgrade request.
pub const PATH: &str = "/raft/stream";
/// Largest frame accepted (a snapshot never travels here; a batch of entries is far smaller).
const MAX_FRAME: usize = 1 << 30;
/// Places for unanswered entries per follower (see the module doc). Measured against no limit
/// (docs/benchmarks.md): 1 cut CPU per op most but made lock hand-offs wait a round trip more
/// (lock-contended -9 to -15 %); 4 and 8 cut the servers' CPU per op under `put` with 64
/// clients by 10-20 % with lock-contended unchanged; 32 by less.
pub const WINDOW: usize = 4;
/// A request with this many entries takes one place of the window, whatever its size.
pub const FULL: usize = 64;

/// Counters for `/v1/cluster`.
#[derive(Debug, Default)]
pub struct StreamStats {
    /// Streams this node opened to followers (as leader).
    pub opened: AtomicU64,
    /// Streams this node accepted from a leader.
    pub accepted: AtomicU64,
    /// Followers found without the endpoint (replicated to one request at a time).
    pub fallbacks: AtomicU64,
    /// AppendEntries requests sent on streams (as leader), and how many of them carried no
    /// entries (a commit advance alone).
    pub requests: AtomicU64,
    pub empty_requests: AtomicU64,
}

type Answer = Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>;

async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, body: &[u8]) -> io::Result<()> {
    let len = u32::try_from(body.len()).map_err(|_| io::Error::other("frame too large"))?;
    w.write_all(&len.to_be_bytes()).await?;
    w.write_all(body).await?;
    w.flush().await
}

/// The next frame, or None at a clean end of the stream.
async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes"),
        ));
    }
    // Grown as bytes arrive: a length prefix alone does not make this node allocate it.
    let mut body = Vec::with_capacity(len.min(1 << 20));
    (&mut *r).take(len as u64).read_to_end(&mut body).await?;
    if body.len() < len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("frame cut at {} of {len} bytes", body.len()),
        ));
    }
    Ok(Some(body))
}

fn net_err(e: impl std::fmt::Display) -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::from_string(e.to_string()))
}

/// How opening a stream to a peer went.
pub enum Opened {
    Stream(reqwest::Upgraded),
    /// The peer does not know the endpoint: replicate request by request.
    Unsupported,
}

/// Ask `addr` to switch the connection to the replication stream.
pub async fn open(
    client: &reqwest::Client,
    addr: &str,
    from: NodeId,
    timeout: Duration,
) -> Result<Opened, RPCError<TypeConfig>> {
    let resp = client
        .post(format!("http://{addr}{PATH}"))
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, PROTOCOL)
        .header(crate::network::FROM_HEADER, from)
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| {
            if e.is_connect() {
                RPCError::Unreachable(Unreachable::new(&e))
            } else {
                net_err(e)
            }
        })?;
    match resp.status() {
        StatusCode::SWITCHING_PROTOCOLS => {
            resp.upgrade().await.map(Opened::Stream).map_err(net_err)
        }
        StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => Ok(Opened::Unsupported),
        status => {
            let body = resp.text().await.unwrap_or_default();
            let msg = format!("answered {status} to the stream upgrade: {body}");
            Err(RPCError::Unreachable(Unreachable::from_string(msg)))
        }
    }
}

/// Aborts a task when dropped: the request writer when the answer stream goes, the follower's
/// frame reader when its stream ends.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Reader<IO> {
    rd: tokio::io::ReadHalf<IO>,
    /// The window: the writer takes permits for each request it sends (one per entry, as many
    /// as are free, at least one; one for a request of [`FULL`] entries or more), the reader
    /// gives them back as the answers come.
    window: Arc<Semaphore>,
    /// When each request was sent and how many permits it holds, in order: each answer is due
    /// `ttl` after its request.
    sent: mpsc::UnboundedReceiver<(Instant, u32)>,
    writer: AbortOnDrop<Result<(), RPCError<TypeConfig>>>,
    faults: Arc<Faults>,
    target: NodeId,
    ttl: Duration,
    /// When the last answer arrived.
    progress: Instant,
}

/// The leader's side: send `input` over `conn`, asking openraft for the next request only with
/// a place free in the [`WINDOW`]; answer in order.
pub fn pipeline<IO, S>(
    conn: IO,
    mut input: S,
    faults: Arc<Faults>,
    stats: Arc<StreamStats>,
    target: NodeId,
    ttl: Duration,
) -> BoxStream<'static, Answer>
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
    S: futures::Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
{
    let (rd, wr) = tokio::io::split(conn);
    let (sent_tx, sent) = mpsc::unbounded_channel();
    let write_faults = faults.clone();
    let window = Arc::new(Semaphore::new(WINDOW));
    let permits = window.clone();
    let writer = tokio::spawn(async move {
        let mut wr = BufWriter::new(wr);
        loop {
            // Ask openraft for the next request only with room in the window: what is written
            // meanwhile goes in that one request.
            let Ok(first) = permits.acquire().await else {
                return Ok(());
            };
            first.forget();
            let Some(req) = input.next().await else { break };
            if write_faults.is_blocked(target) {
                return Err(link_cut(target));
            }
            stats.requests.fetch_add(1, Ordering::Relaxed);
            if req.entries.is_empty() {
                stats.empty_requests.fetch_add(1, Ordering::Relaxed);
            }
            // The other entries take what room is left, without waiting: this request goes now.
            // Only this task takes permits, so what is available stays available.
            let n = req.entries.len();
            let more =
                if n >= FULL { 0 } else { n.saturating_sub(1) }.min(permits.available_permits());
            let held = 1 + more as u32;
            if more > 0 {
                permits
                    .try_acquire_many(more as u32)
                    .expect("only the writer takes permits")
                    .forget();
            }
            let body = bincode::serialize(&req).map_err(net_err)?;
            write_frame(&mut wr, &body)
                .await
                .map_err(|e| net_err(format!("sending to node {target}: {e}")))?;
            if sent_tx.send((Instant::now(), held)).is_err() {
                return Ok(());
            }
        }
        // openraft ended the session: let the follower see the end of its input.
        let _ = wr.shutdown().await;
        Ok(())
    });
    let reader = Reader {
        rd,
        window,
        sent,
        writer: AbortOnDrop(writer),
        faults,
        target,
        ttl,
        progress: Instant::now(),
    };
    stream::unfold(Some(reader), |state| async move {
        let mut r = state?;
        let Some((sent_at, held)) = r.sent.recv().await else {
            // Every request was answered and the writer stopped: say why if it failed.
            let res = (&mut r.writer.0).await;
            return match res {
                Ok(Err(e)) => Some((Err(e), None)),
                _ => None,
            };
        };
        // Answers come in order, so this one also waits for every earlier request the follower
        // has queued: it is late when nothing at all arrived for `ttl` since it was sent or
        // since the previous answer, whichever is later.
        let due = sent_at.max(r.progress) + r.ttl;
        let frame = tokio::time::timeout_at(due, read_frame(&mut r.rd)).await;
        r.progress = Instant::now();
        r.window.add_permits(held as usize);
        let answer = match frame {
            Err(_) => Err(net_err(format!(
                "node {} answered nothing for {:?}",
                r.target, r.ttl
            ))),
            Ok(Err(e)) => Err(net_err(format!("reading from node {}: {e}", r.target))),
            Ok(Ok(None)) => Err(net_err(format!("node {} closed the stream", r.target))),
            Ok(Ok(Some(_))) if r.faults.is_blocked(r.target) => Err(link_cut(r.target)),
            Ok(Ok(Some(body))) => {
                bincode::deserialize::<StreamAppendResult<TypeConfig>>(&body).map_err(net_err)
            }
        };
        // An error, or a refusal (conflict, higher vote), ends the stream.
        let next = matches!(answer, Ok(Ok(_))).then_some(r);
        Some((answer, next))
    })
    .boxed()
}

/// The follower's side of `POST /raft/stream` (the fault switch already let the opener in).
pub async fn accept(State(node): State<Arc<Node>>, mut req: Request) -> Response {
    let wants = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok());
    if wants != Some(PROTOCOL) {
        let msg = format!("expected Upgrade: {PROTOCOL}");
        return (StatusCode::BAD_REQUEST, msg).into_response();
    }
    let Some(from) = crate::network::from_node(req.headers()) else {
        let msg = format!("missing {}", crate::network::FROM_HEADER);
        return (StatusCode::BAD_REQUEST, msg).into_response();
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(conn) => {
                node.streams.accepted.fetch_add(1, Ordering::Relaxed);
                serve(node, from, hyper_util::rt::TokioIo::new(conn)).await
            }
            Err(e) => tracing::debug!(from, "raft stream upgrade failed: {e}"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, PROTOCOL)
        .body(Body::empty())
        .expect("static response parts")
}

/// Feed the requests read from `conn` to Raft and write its answers back, in order, until
/// either side stops.
async fn serve<IO>(node: Arc<Node>, from: NodeId, conn: IO)
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, wr) = tokio::io::split(conn);
    let (tx, rx) = mpsc::channel::<AppendEntriesRequest<TypeConfig>>(64);
    let faults = node.faults.clone();
    let reader = tokio::spawn(async move {
        while let Ok(Some(body)) = read_frame(&mut rd).await {
            if faults.is_blocked(from) {
                break;
            }
            let Ok(req) = bincode::deserialize(&body) else {
                tracing::warn!(from, "undecodable frame on the raft stream");
                break;
            };
            if tx.send(req).await.is_err() {
                break;
            }
        }
    });
    let _reader = AbortOnDrop(reader);
    let faults = node.faults.clone();
    // Checked again as Raft takes each request: nothing read before a cut reaches the log after.
    let input = stream::unfold(rx, move |mut rx| {
        let faults = faults.clone();
        async move {
            let req = rx.recv().await?;
            (!faults.is_blocked(from)).then_some((req, rx))
        }
    });
    let answers = node.raft.stream_append(Box::pin(input));
    let mut answers = std::pin::pin!(answers);
    let mut stopping = node.stopping.subscribe();
    let mut wr = BufWriter::new(wr);
    loop {
        // This node shutting down closes the stream at once, even when it is idle or the
        // leader stopped reading.
        let next = tokio::select! {
            next = answers.next() => next,
            _ = stopping.wait_for(|s| *s) => None,
        };
        let Some(answer) = next else { break };
        // A fatal error: Raft stopped on this node. Closing tells the leader.
        let Ok(answer) = answer else { break };
        if node.faults.is_blocked(from) {
            break;
        }
        let Ok(body) = bincode::serialize(&answer) else {
            break;
        };
        let written = tokio::select! {
            w = write_frame(&mut wr, &body) => w.is_ok(),
            _ = stopping.wait_for(|s| *s) => false,
        };
        if !written || answer.is_err() {
            break;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_end_cleanly() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            write_frame(&mut a, b"hello").await.unwrap();
            write_frame(&mut a, b"").await.unwrap();
            write_frame(&mut a, &[7u8; 300]).await.unwrap();
        });
        assert_eq!(read_frame(&mut b).await.unwrap(), Some(b"hello".to_vec()));
        assert_eq!(read_frame(&mut b).await.unwrap(), Some(vec![]));
        assert_eq!(read_frame(&mut b).await.unwrap(), Some(vec![7u8; 300]));
        writer.await.unwrap();
        assert_eq!(read_frame(&mut b).await.unwrap(), None, "writer closed");
    }

    /// A peer without the endpoint (an older version) is told apart from an unreachable one.
    #[tokio::test]
    async fn open_reports_a_peer_without_the_endpoint_as_unsupported() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let app = axum::Router::new().route("/v1/health", axum::routing::get(|| async { "ok" }));
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let client = reqwest::Client::new();
        let t = Duration::from_secs(2);
        let opened = open(&client, &addr, 1, t).await.unwrap();
        assert!(matches!(opened, Opened::Unsupported));
        server.abort();
        let _ = server.await;
        // Nobody listens there now: unreachable, so openraft backs off and retries. (A new
        // client: the first one's pooled connection may outlive the aborted server task.)
        match open(&reqwest::Client::new(), &addr, 1, t).await {
            Err(RPCError::Unreachable(_)) => {}
            Err(e) => panic!("expected unreachable, got {e}"),
            Ok(_) => panic!("expected unreachable, got a stream"),
        }
    }

    /// `n` blank entries from index `first` on, as the leader would send them.
    fn request(first: u64, n: u64) -> AppendEntriesRequest<TypeConfig> {
        let entries = (first..first + n)
            .map(|i| openraft::testing::blank_ent::<TypeConfig>(1, 1, i))
            .collect();
        AppendEntriesRequest {
            vote: crate::types::Vote::new_committed(1, 1),
            prev_log_id: None,
            leader_commit: None,
            entries,
        }
    }

    /// The first index of the next request the follower reads, within `wait`.
    async fn next_request<R: AsyncRead + Unpin>(rd: &mut R, wait: Duration) -> Option<u64> {
        let frame = tokio::time::timeout(wait, read_frame(rd)).await.ok()?;
        let req: AppendEntriesRequest<TypeConfig> =
            bincode::deserialize(&frame.unwrap().unwrap()).unwrap();
        Some(req.entries[0].log_id.index)
    }

    /// Small requests go at once, several in flight; once the [`WINDOW`] is taken, the next
    /// request is not even asked for (openraft builds it when asked, from all that was written
    /// by then) until an answer frees a place; a request of [`FULL`] entries takes one place.
    #[tokio::test]
    async fn the_leader_keeps_at_most_a_window_of_entries_in_flight() {
        assert_eq!(
            (WINDOW, FULL),
            (4, 64),
            "the steps below fill a window of 4"
        );
        let (leader, follower) = tokio::io::duplex(1 << 20);
        let (mut frd, mut fwr) = tokio::io::split(follower);
        let (input, rx) = futures::channel::mpsc::unbounded();
        let asked = Arc::new(AtomicU64::new(0));
        let counted = asked.clone();
        let rx = rx.inspect(move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
        });
        let stats = Arc::new(StreamStats::default());
        let faults = Arc::new(Faults::new(false));
        let ttl = Duration::from_secs(30);
        let mut answers = pipeline(leader, rx, faults, stats.clone(), 2, ttl);
        // openraft reads the answers as they come; so does this task.
        let (answered_tx, mut answered) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(a) = answers.next().await {
                let _ = answered_tx.send(a.unwrap().unwrap().unwrap().index);
            }
        });
        let short = Duration::from_millis(300);
        let long = Duration::from_secs(10);
        // The follower accepts everything up to `last`; the leader reads that answer.
        let mut answer = async |last: u64| {
            let ok: StreamAppendResult<TypeConfig> =
                Ok(Some(openraft::testing::log_id::<TypeConfig>(1, 1, last)));
            write_frame(&mut fwr, &bincode::serialize(&ok).unwrap())
                .await
                .unwrap();
            let read = tokio::time::timeout(long, answered.recv()).await;
            assert_eq!(read.expect("answer read in time"), Some(last));
        };

        // 1 + 2 entries: both requests go without an answer.
        input.unbounded_send(request(1, 1)).unwrap();
        input.unbounded_send(request(2, 2)).unwrap();
        assert_eq!(next_request(&mut frd, long).await, Some(1));
        assert_eq!(next_request(&mut frd, long).await, Some(2));
        // One place left: a request of 3 still goes, taking it (nothing waits once asked for).
        input.unbounded_send(request(4, 3)).unwrap();
        assert_eq!(next_request(&mut frd, long).await, Some(4));
        // The window is taken: the next request is neither sent nor asked for.
        input.unbounded_send(request(7, 1)).unwrap();
        assert_eq!(
            next_request(&mut frd, short).await,
            None,
            "sent with a full window"
        );
        assert_eq!(
            asked.load(Ordering::SeqCst),
            3,
            "asked for with a full window"
        );

        // The answer to the first request frees its place.
        answer(1).await;
        assert_eq!(next_request(&mut frd, long).await, Some(7));
        // Answers to the second and third: one place taken (7), three free. A full request
        // takes one of them, so a small one still goes after it.
        answer(3).await;
        answer(6).await;
        input.unbounded_send(request(8, FULL as u64)).unwrap();
        input.unbounded_send(request(8 + FULL as u64, 1)).unwrap();
        assert_eq!(next_request(&mut frd, long).await, Some(8));
        assert_eq!(next_request(&mut frd, long).await, Some(8 + FULL as u64));
        assert_eq!(stats.requests.load(Ordering::Relaxed), 6);
    }

    #[tokio::test]
    async fn oversized_and_truncated_frames_are_errors() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&(MAX_FRAME as u32 + 1).to_be_bytes())
            .await
            .unwrap();
        let e = read_frame(&mut b).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);

        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&10u32.to_be_bytes()).await.unwrap();
        a.write_all(b"abc").await.unwrap();
        drop(a);
        let e = read_frame(&mut b).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
