//! `/v1/semaphores`: counting semaphores with a fair, priority-aware queue (see
//! `sm/semaphore.rs` for the policy and its bound).

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
    apply_indexed, apply_nowait, check_name, ok, read_barrier, unexpected, victim_state,
    wait_for_grant, ApiResult, ReadQuery, WaitState, MAX_NAME_LEN,
};
use super::{ApiJson, ApiQuery};
use crate::node::Node;
use crate::sm::{Command, ErrorCode, Response, MAX_WAIT_MS};

pub fn routes() -> Router<Arc<Node>> {
    Router::new()
        .route("/v1/semaphores/{name}", post(create).get(status))
        .route("/v1/semaphores/{name}/acquire", post(acquire))
        .route("/v1/semaphores/{name}/release", post(release))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Create {
    capacity: u64,
    request_id: Option<String>,
}

async fn create(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    ApiJson(b): ApiJson<Create>,
) -> ApiResult {
    check_name("semaphore name", &name, MAX_NAME_LEN)?;
    let cmd = Command::SemCreate {
        name: name.clone(),
        capacity: b.capacity,
    };
    match apply_nowait(&node, cmd, b.request_id).await? {
        Response::SemCreated { capacity, created } => {
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            let body = json!({"semaphore": name, "capacity": capacity, "created": created});
            Ok((status, Json(body)).into_response())
        }
        r => Err(unexpected(r)),
    }
}

fn default_permits() -> u64 {
    1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Acquire {
    lease_id: u64,
    #[serde(default = "default_permits")]
    permits: u64,
    #[serde(default)]
    wait_ms: u64,
    #[serde(default)]
    priority: u64,
    request_id: Option<String>,
}

async fn acquire(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    ApiJson(b): ApiJson<Acquire>,
) -> ApiResult {
    check_name("semaphore name", &name, MAX_NAME_LEN)?;
    if b.wait_ms > MAX_WAIT_MS {
        return Err(ApiError::invalid(format!(
            "wait_ms must be at most {MAX_WAIT_MS}"
        )));
    }
    let applied = node.sm.subscribe_lease(b.lease_id);
    let cmd = Command::SemAcquire {
        name: name.clone(),
        lease_id: b.lease_id,
        permits: b.permits,
        wait_ms: b.wait_ms,
        priority: b.priority,
    };
    let granted = |token: u64| {
        ok(json!({"semaphore": name, "lease_id": b.lease_id, "permits": b.permits, "token": token}))
    };
    // Deadlock records after the index before this call's entry are about its wait (see
    // `lock_acquire`).
    let (index, response) = apply_indexed(&node, cmd, b.request_id).await?;
    let since = index - 1;
    match response {
        Response::SemGranted { token } => return granted(token),
        Response::SemQueued { .. } if b.wait_ms == 0 => {
            return Err(ApiError::new(
                ErrorCode::LockHeld,
                format!(
                    "not enough permits of {name}; lease {} is already queued",
                    b.lease_id
                ),
            ))
        }
        Response::SemQueued { .. } => {}
        r => return Err(unexpected(r)),
    }
    // The wait is watched in this node's state, which must hold the queued entry first.
    crate::propose::await_applied(&node, index).await?;
    let lease_id = b.lease_id;
    let what = format!("semaphore {name}");
    let token = wait_for_grant(&node, applied, lease_id, &what, |sm| {
        let sem = sm.semaphores.get(&name);
        if let Some(h) = sem.and_then(|s| s.holders.get(&lease_id)) {
            return WaitState::Granted(h.token);
        }
        let waiter = sem.and_then(|s| s.queue.iter().find(|w| w.lease_id == lease_id));
        match waiter {
            Some(w) => WaitState::Queued(w.deadline_ms),
            None => victim_state(sm, lease_id, &format!("semaphore:{name}"), since, &what),
        }
    })
    .await?;
    granted(token)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Release {
    lease_id: u64,
    request_id: Option<String>,
}

async fn release(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    ApiJson(b): ApiJson<Release>,
) -> ApiResult {
    check_name("semaphore name", &name, MAX_NAME_LEN)?;
    let cmd = Command::SemRelease {
        name: name.clone(),
        lease_id: b.lease_id,
    };
    match apply_nowait(&node, cmd, b.request_id).await? {
        Response::SemReleased { granted } => {
            ok(json!({"semaphore": name, "released": true, "granted": granted}))
        }
        r => Err(unexpected(r)),
    }
}

async fn status(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<ReadQuery>,
) -> ApiResult {
    check_name("semaphore name", &name, MAX_NAME_LEN)?;
    read_barrier(&node, &q).await?;
    let st = node.sm.read();
    let Some(sem) = st.sm.semaphores.get(&name) else {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!("semaphore {name} does not exist"),
        ));
    };
    let holders: Vec<Value> = sem
        .holders
        .iter()
        .map(|(id, h)| json!({"lease_id": id, "permits": h.permits, "token": h.token, "since_ms": h.since_ms}))
        .collect();
    let queue: Vec<Value> = sem
        .queue
        .iter()
        .map(|w| {
            json!({"lease_id": w.lease_id, "permits": w.permits, "priority": w.priority,
            "since_ms": w.since_ms, "deadline_ms": w.deadline_ms})
        })
        .collect();
    ok(json!({
        "semaphore": name,
        "capacity": sem.capacity,
        "used": sem.used(),
        "free": sem.free(),
        "holders": holders,
        "queue": queue,
    }))
}
