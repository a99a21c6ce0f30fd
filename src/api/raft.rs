//! Internal Raft RPC endpoints (`/raft/*`): bincode bodies in and out. `/raft/propose`
//! carries writes that clients sent to a follower.

use std::io::Cursor;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use openraft::raft::{AppendEntriesRequest, VoteRequest};
use openraft::Snapshot;
use serde::Serialize;

use crate::network::SnapshotRequest;
use crate::node::Node;
use crate::sm::LogEntry;
use crate::types::TypeConfig;

/// Snapshots travel in one body; allow up to 1 GiB on these routes only.
const RAFT_BODY_LIMIT: usize = 1 << 30;

pub fn routes() -> Router<Arc<Node>> {
    Router::new()
        .route("/raft/append", post(append))
        .route("/raft/vote", post(vote))
        .route("/raft/pre-vote", post(pre_vote))
        .route("/raft/snapshot", post(snapshot))
        .route("/raft/propose", post(propose))
        .route(crate::raft_stream::PATH, post(crate::raft_stream::accept))
        .layer(axum::extract::DefaultBodyLimit::max(RAFT_BODY_LIMIT))
}

/// The receiving half of the fault switch: drop RPCs from a blocked peer.
pub async fn drop_blocked(
    axum::extract::State(node): State<Arc<Node>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let from = crate::network::from_node(req.headers());
    if from.is_some_and(|f| node.faults.is_blocked(f)) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "link cut by the fault switch",
        )
            .into_response();
    }
    next.run(req).await
}

fn encode<T: Serialize, E: std::fmt::Display>(r: Result<T, E>) -> Response {
    match r {
        Ok(v) => match bincode::serialize(&v) {
            Ok(b) => (StatusCode::OK, b).into_response(),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        },
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    bincode::deserialize(body).map_err(|e| format!("bad raft rpc body: {e}"))
}

fn bad_body(msg: String) -> Response {
    (StatusCode::BAD_REQUEST, msg).into_response()
}

async fn append(State(node): State<Arc<Node>>, body: Bytes) -> Response {
    match decode::<AppendEntriesRequest<TypeConfig>>(&body) {
        Ok(req) => encode(node.raft.append_entries(req).await),
        Err(m) => bad_body(m),
    }
}

async fn vote(State(node): State<Arc<Node>>, body: Bytes) -> Response {
    match decode::<VoteRequest<TypeConfig>>(&body) {
        Ok(req) => encode(node.raft.vote(req).await),
        Err(m) => bad_body(m),
    }
}

async fn pre_vote(State(node): State<Arc<Node>>, body: Bytes) -> Response {
    match decode::<VoteRequest<TypeConfig>>(&body) {
        Ok(req) => encode(node.raft.pre_vote(req).await),
        Err(m) => bad_body(m),
    }
}

async fn snapshot(State(node): State<Arc<Node>>, body: Bytes) -> Response {
    match decode::<SnapshotRequest>(&body) {
        Ok((vote, meta, data)) => {
            let snap = Snapshot {
                meta,
                snapshot: Cursor::new(data),
            };
            encode(node.raft.install_full_snapshot(vote, snap).await)
        }
        Err(m) => bad_body(m),
    }
}

/// Entries proposed on a follower (`propose.rs`): submitted as one batch, answered in order.
async fn propose(State(node): State<Arc<Node>>, body: Bytes) -> Response {
    match decode::<Vec<LogEntry>>(&body) {
        Ok(entries) => encode(Ok::<_, String>(
            crate::propose::write_many(&node, entries).await,
        )),
        Err(m) => bad_body(m),
    }
}
