//! `GET /v1/watch`: a Server-Sent Events stream of every change, in revision order.
//!
//! Served by the node the client is connected to, from its own applied history (every node
//! applies the same entries and produces the same events with the same revisions), so a
//! watch is never forwarded and survives a leader change. Events:
//! - `change`: one change (`id:` is its revision; data `{revision, type, name, action, detail}`);
//! - `progress`: `{revision}`: every change up to `revision` has been sent (sent first, then
//!   every `progress_ms` while the stream is quiet);
//! - `compacted`: `{from_revision, oldest_revision}`: the requested history is gone; the stream
//!   ends. Resume from `oldest_revision` after re-reading the state, or from a newer revision.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use futures::Stream;
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use super::v1::ApiResult;
use super::ApiQuery;
use crate::node::Node;
use crate::sm::Event;
use crate::store::watch::Read;

/// Event types a watch can filter on.
const TYPES: &[&str] = &[
    "kv",
    "lock",
    "semaphore",
    "barrier",
    "double_barrier",
    "election",
    "queue",
    "condition",
    "lease",
    "deadlock",
];

pub fn routes() -> Router<Arc<Node>> {
    Router::new().route("/v1/watch", get(watch))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct WatchQuery {
    /// Only names (keys, resource names) starting with this.
    #[serde(default)]
    prefix: String,
    /// Comma-separated event types; all when absent.
    types: Option<String>,
    /// First revision to send (inclusive); the next one when absent.
    from_revision: Option<u64>,
    /// Quiet-stream progress interval (100..=60000, default 5000).
    progress_ms: Option<u64>,
}

struct Filter {
    prefix: String,
    types: Option<Vec<String>>,
}

impl Filter {
    fn wants(&self, e: &Event) -> bool {
        e.name.starts_with(&self.prefix) && self.types.as_ref().is_none_or(|t| t.contains(&e.kind))
    }
}

fn sse(name: &str, data: serde_json::Value) -> SseEvent {
    SseEvent::default().event(name).data(data.to_string())
}

async fn watch(State(node): State<Arc<Node>>, ApiQuery(q): ApiQuery<WatchQuery>) -> ApiResult {
    let types = match &q.types {
        None => None,
        Some(t) => {
            let list: Vec<String> = t.split(',').map(|s| s.trim().to_string()).collect();
            if let Some(bad) = list.iter().find(|x| !TYPES.contains(&x.as_str())) {
                return Err(ApiError::invalid(format!(
                    "unknown event type {bad:?}; types are {}",
                    TYPES.join(", ")
                )));
            }
            Some(list)
        }
    };
    let progress_ms = q.progress_ms.unwrap_or(5_000);
    if !(100..=60_000).contains(&progress_ms) {
        return Err(ApiError::invalid("progress_ms must be 100 to 60000"));
    }
    let filter = Filter {
        prefix: q.prefix,
        types,
    };
    // Subscribe before reading the history, so nothing applied in between is missed.
    let applied = node.sm.subscribe();
    let (cursor, from, oldest) = {
        let h = node.sm.history();
        let from = q.from_revision.unwrap_or(h.last_revision() + 1);
        (h.cursor_at(from), from, h.oldest_revision())
    };
    let mut pending = std::collections::VecDeque::new();
    if cursor.is_none() {
        pending.push_back(compacted(from, oldest));
    }
    let st = St {
        applied,
        stopping: node.stopping.subscribe(),
        node,
        cursor,
        from,
        filter,
        pending,
        progress: Duration::from_millis(progress_ms),
        next_progress: None,
    };
    Ok(Sse::new(stream(st))
        .keep_alive(KeepAlive::default())
        .into_response())
}

fn compacted(from: u64, oldest: u64) -> SseEvent {
    sse(
        "compacted",
        json!({"from_revision": from, "oldest_revision": oldest}),
    )
}

struct St {
    node: Arc<Node>,
    applied: tokio::sync::watch::Receiver<u64>,
    stopping: tokio::sync::watch::Receiver<bool>,
    /// `None` once the stream must end (after the pending events).
    cursor: Option<u64>,
    from: u64,
    filter: Filter,
    pending: std::collections::VecDeque<SseEvent>,
    progress: Duration,
    /// When the next progress event is due; `None` until the first catch-up.
    next_progress: Option<tokio::time::Instant>,
}

fn stream(st: St) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    futures::stream::unfold(st, |mut s| async move {
        let mut through;
        loop {
            if let Some(e) = s.pending.pop_front() {
                return Some((Ok(e), s));
            }
            let cursor = s.cursor?;
            let read = s.node.sm.history().read(cursor, 1_000);
            match read {
                Read::Compacted { oldest_revision } => {
                    s.pending.push_back(compacted(s.from, oldest_revision));
                    s.cursor = None;
                    continue;
                }
                Read::Events(evs, next, t) => {
                    s.cursor = Some(next);
                    through = t;
                    // A start ahead of this node: skip what it applies before getting there.
                    let from = s.from;
                    for e in evs
                        .iter()
                        .filter(|e| e.revision >= from && s.filter.wants(e))
                    {
                        let data = serde_json::to_value(e).unwrap_or_default();
                        s.pending
                            .push_back(sse("change", data).id(e.revision.to_string()));
                    }
                    if !evs.is_empty() {
                        continue;
                    }
                }
            }
            // Caught up: say how far, at once the first time, then periodically.
            let now = tokio::time::Instant::now();
            let due = *s.next_progress.get_or_insert(now);
            if due <= now {
                s.next_progress = Some(now + s.progress);
                s.pending
                    .push_back(sse("progress", json!({"revision": through})));
                continue;
            }
            let woke = tokio::select! {
                r = s.applied.changed() => r.is_ok(),
                _ = s.stopping.wait_for(|x| *x) => false,
                _ = tokio::time::sleep_until(due) => true,
            };
            if !woke {
                return None;
            }
        }
    })
}
