//! `/v1/queues`: work queues whose items are handed to one lease at a time, with a FIFO line of
//! waiting claimers (see `sm/queue.rs` for the claim order and its aging bound).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::v1::{
    apply, check_name, ok, read_barrier, unexpected, wait_for_grant, ApiResult, ReadQuery,
    WaitState, MAX_NAME_LEN,
};
use super::{ApiJson, ApiQuery};
use crate::node::Node;
use crate::sm::{Command, ErrorCode, QueueClaim, Response, MAX_ITEM_LEN, MAX_WAIT_MS};

pub fn routes() -> Router<Arc<Node>> {
    Router::new()
        .route("/v1/queues/{name}", post(push).get(status))
        .route("/v1/queues/{name}/claim", post(claim))
        .route("/v1/queues/{name}/ack", post(ack))
        .route("/v1/queues/{name}/nack", post(nack))
        .route("/v1/queues/{name}/release", post(nack))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Push {
    item: String,
    #[serde(default)]
    priority: u64,
    request_id: Option<String>,
}

async fn push(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    ApiJson(b): ApiJson<Push>,
) -> ApiResult {
    check_name("queue name", &name, MAX_NAME_LEN)?;
    if b.item.len() > MAX_ITEM_LEN {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("item is larger than {MAX_ITEM_LEN} bytes"),
        ));
    }
    let cmd = Command::QueuePush {
        name: name.clone(),
        item: b.item,
        priority: b.priority,
    };
    match apply(&node, cmd, b.request_id).await? {
        Response::QueuePushed { id, claimed_by } => {
            let body =
                json!({"queue": name, "id": id, "priority": b.priority, "claimed_by": claimed_by});
            Ok((StatusCode::CREATED, Json(body)).into_response())
        }
        r => Err(unexpected(r)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Claim {
    lease_id: u64,
    #[serde(default)]
    wait_ms: u64,
    request_id: Option<String>,
}

fn claim_json(name: &str, c: &QueueClaim) -> Value {
    json!({
        "queue": name,
        "id": c.item.id,
        "item": c.item.item,
        "priority": c.item.priority,
        "pushed_ms": c.item.pushed_ms,
        "claims": c.item.claims,
        "lease_id": c.lease_id,
        "token": c.token,
    })
}

async fn claim(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    ApiJson(b): ApiJson<Claim>,
) -> ApiResult {
    check_name("queue name", &name, MAX_NAME_LEN)?;
    if b.wait_ms > MAX_WAIT_MS {
        return Err(ApiError::invalid(format!(
            "wait_ms must be at most {MAX_WAIT_MS}"
        )));
    }
    // Subscribe before proposing so no applied change is missed.
    let applied = node.sm.subscribe();
    let cmd = Command::QueueClaim {
        name: name.clone(),
        lease_id: b.lease_id,
        wait_ms: b.wait_ms,
    };
    let lease_id = b.lease_id;
    let ticket = match apply(&node, cmd, b.request_id).await? {
        Response::QueueClaimed {
            id,
            item,
            priority,
            pushed_ms,
            claims,
            token,
        } => {
            return ok(json!({
                "queue": name, "id": id, "item": item, "priority": priority,
                "pushed_ms": pushed_ms, "claims": claims, "lease_id": lease_id, "token": token,
            }))
        }
        // Trying never waits, even when the lease is already in line from an earlier call.
        Response::QueueWaiting { .. } if b.wait_ms == 0 => {
            return Err(ApiError::new(
                ErrorCode::Timeout,
                format!(
                    "queue {name} has no pending item; lease {lease_id} is already waiting for one"
                ),
            ))
        }
        Response::QueueWaiting { ticket, .. } => ticket,
        r => return Err(unexpected(r)),
    };
    // The item handed to this wait carries its ticket; the wait's own deadline bounds it.
    let id = wait_for_grant(
        &node,
        applied,
        lease_id,
        &format!("an item of queue {name}"),
        |sm| {
            let Some(q) = sm.queues.get(&name) else {
                return WaitState::Gone;
            };
            let mine = q
                .claimed
                .values()
                .find(|c| c.lease_id == lease_id && c.ticket == ticket);
            if let Some(c) = mine {
                return WaitState::Granted(c.item.id);
            }
            let w = q
                .waiters
                .iter()
                .find(|w| w.lease_id == lease_id && w.seq == ticket);
            w.map_or(WaitState::Gone, |w| WaitState::Queued(w.deadline_ms))
        },
    )
    .await?;
    let st = node.sm.read();
    match st.sm.queues.get(&name).and_then(|q| q.claimed.get(&id)) {
        Some(c) if c.lease_id == lease_id => ok(claim_json(&name, c)),
        // Handed to this lease, then given back (the lease ended, or it nacked the item)
        // before this answer was built; the item is back in the queue.
        _ if !st.sm.leases.contains_key(&lease_id) => Err(ApiError::new(
            ErrorCode::LeaseNotFound,
            format!("lease {lease_id} ended after it was handed item {id} of queue {name}; the item went back to the queue"),
        )),
        _ => Err(ApiError::new(
            ErrorCode::Conflict,
            format!("item {id} of queue {name} was handed to lease {lease_id} but is no longer claimed by it"),
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settle {
    lease_id: u64,
    id: u64,
    request_id: Option<String>,
}

async fn ack(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    ApiJson(b): ApiJson<Settle>,
) -> ApiResult {
    check_name("queue name", &name, MAX_NAME_LEN)?;
    let cmd = Command::QueueAck {
        name: name.clone(),
        lease_id: b.lease_id,
        id: b.id,
    };
    match apply(&node, cmd, b.request_id).await? {
        Response::QueueAcked { id } => ok(json!({"queue": name, "id": id, "acked": true})),
        r => Err(unexpected(r)),
    }
}

async fn nack(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    ApiJson(b): ApiJson<Settle>,
) -> ApiResult {
    check_name("queue name", &name, MAX_NAME_LEN)?;
    let cmd = Command::QueueNack {
        name: name.clone(),
        lease_id: b.lease_id,
        id: b.id,
    };
    match apply(&node, cmd, b.request_id).await? {
        Response::QueueReturned { id, claimed_by } => {
            ok(json!({"queue": name, "id": id, "returned": true, "claimed_by": claimed_by}))
        }
        r => Err(unexpected(r)),
    }
}

#[derive(Deserialize)]
struct LimitQuery {
    limit: Option<usize>,
}

/// Largest list in a status answer.
const MAX_STATUS_LIST: usize = 1000;

async fn status(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<ReadQuery>,
    ApiQuery(lq): ApiQuery<LimitQuery>,
) -> ApiResult {
    check_name("queue name", &name, MAX_NAME_LEN)?;
    let limit = lq.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_STATUS_LIST {
        return Err(ApiError::invalid(format!(
            "limit must be 1 to {MAX_STATUS_LIST}"
        )));
    }
    read_barrier(&node, &q).await?;
    let st = node.sm.read();
    // A queue with nothing pending, claimed or waiting is not stored: it reads as empty.
    let empty = Default::default();
    let wq = st.sm.queues.get(&name).unwrap_or(&empty);
    let pending: Vec<Value> = wq
        .pending_in_order()
        .take(limit)
        .map(|i| json!({"id": i.id, "item": i.item, "priority": i.priority, "pushed_ms": i.pushed_ms, "claims": i.claims}))
        .collect();
    let claimed: Vec<Value> = wq
        .claimed
        .values()
        .take(limit)
        .map(|c| {
            json!({"id": c.item.id, "item": c.item.item, "priority": c.item.priority,
            "pushed_ms": c.item.pushed_ms, "claims": c.item.claims, "lease_id": c.lease_id,
            "token": c.token, "claimed_ms": c.claimed_ms})
        })
        .collect();
    let waiting: Vec<Value> = wq
        .waiters
        .iter()
        .take(limit)
        .map(|w| json!({"lease_id": w.lease_id, "since_ms": w.since_ms, "deadline_ms": w.deadline_ms}))
        .collect();
    ok(json!({
        "queue": name,
        "pending_count": wq.pending.len(),
        "claimed_count": wq.claimed.len(),
        "waiting_count": wq.waiters.len(),
        "bytes": wq.bytes,
        "pending": pending,
        "claimed": claimed,
        "waiting": waiting,
        "truncated": wq.pending.len() > limit || wq.claimed.len() > limit || wq.waiters.len() > limit,
    }))
}
