//! HTTP API: public `/v1` routes, health, and the internal `/raft` RPCs.
//!
//! Every node serves every route. Writes and linearizable reads must run on the leader: the
//! `route_to_leader` middleware runs them locally when this node leads, forwards them to the
//! leader otherwise (hop-limited), or answers 307 with `?redirect=true`. Every response carries
//! `X-Concord-Leader` and `X-Concord-Index`.

mod barriers;
mod conditions;
mod deadlocks;
mod elections;
pub mod error;
mod extract;
mod forward;
mod queues;
mod raft;
mod semaphores;
mod v1;
mod watch;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::HeaderValue;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::Router;

use crate::node::Node;

pub use extract::{ApiJson, ApiQuery};

/// Public request bodies are limited to 1 MiB.
pub const BODY_LIMIT: usize = 1 << 20;

pub fn router(node: Arc<Node>) -> Router {
    let leader_routes = v1::leader_routes()
        .merge(semaphores::routes())
        .merge(conditions::routes())
        .merge(deadlocks::routes())
        .merge(barriers::routes())
        .merge(elections::routes())
        .merge(queues::routes())
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(
            node.clone(),
            forward::route_to_leader,
        ));
    Router::new()
        .merge(v1::local_routes())
        .merge(watch::routes())
        .merge(leader_routes)
        .merge(raft::routes().layer(middleware::from_fn_with_state(
            node.clone(),
            raft::drop_blocked,
        )))
        .merge(v1::admin_routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            node.clone(),
            cluster_headers,
        ))
        .with_state(node)
}

async fn cluster_headers(State(node): State<Arc<Node>>, req: Request, next: Next) -> Response {
    let written = Arc::new(AtomicU64::new(0));
    let mut resp = WRITE_INDEX.scope(written.clone(), next.run(req)).await;
    let h = resp.headers_mut();
    if !h.contains_key("x-concord-leader") {
        let leader = node
            .current_leader()
            .map_or("none".to_string(), |l| l.to_string());
        if let Ok(v) = HeaderValue::from_str(&leader) {
            h.insert("x-concord-leader", v);
        }
    }
    if !h.contains_key("x-concord-index") {
        let index = node.sm.read().sm.index.max(written.load(Ordering::Relaxed));
        h.insert("x-concord-index", HeaderValue::from(index));
    }
    resp
}

tokio::task_local! {
    /// The highest log index a request's own writes got (see [`note_write_index`]).
    static WRITE_INDEX: Arc<AtomicU64>;
}

/// Record that the current request wrote at `index`: its `X-Concord-Index` is then at least
/// that, even when this node (a follower) has not applied it yet. Outside a request: no-op.
pub fn note_write_index(index: u64) {
    let _ = WRITE_INDEX.try_with(|w| w.fetch_max(index, Ordering::Relaxed));
}

async fn not_found(uri: axum::http::Uri) -> error::ApiError {
    error::ApiError::new(
        crate::sm::ErrorCode::NotFound,
        format!("no route for {}", uri.path()),
    )
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    use axum::response::IntoResponse;
    let e = error::ApiError::invalid(format!("method {method} is not allowed on {}", uri.path()));
    (
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        axum::Json(
            serde_json::json!({"error": {"code": "method_not_allowed", "message": e.message}}),
        ),
    )
        .into_response()
}
