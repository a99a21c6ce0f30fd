//! `/v1/barriers` (cyclic barriers with generations) and `/v1/double-barriers` (enter together,
//! leave together). The state machine decides every release (`sm/barrier.rs`,
//! `sm/double_barrier.rs`); these handlers propose the arrival and then watch the replicated
//! state for the outcome of the generation they joined.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::v1::{
    apply, check_name, ok, read_barrier, unexpected, wait_for_grant, ApiResult, ReadQuery,
    WaitState, MAX_NAME_LEN,
};
use super::{ApiJson, ApiQuery};
use crate::node::Node;
use crate::sm::{
    BarrierRelease, BarrierWaiter, Command, ErrorCode, Response, MAX_PARTIES, MAX_WAIT_MS,
};

/// `wait_ms` when the body has none.
pub const DEFAULT_BARRIER_WAIT_MS: u64 = 60_000;

pub fn routes() -> Router<Arc<Node>> {
    Router::new()
        .route("/v1/barriers/{name}", get(barrier_status))
        .route("/v1/barriers/{name}/wait", post(barrier_wait))
        .route("/v1/double-barriers/{name}", get(double_status))
        .route("/v1/double-barriers/{name}/enter", post(double_enter))
        .route("/v1/double-barriers/{name}/leave", post(double_leave))
}

fn default_wait_ms() -> u64 {
    DEFAULT_BARRIER_WAIT_MS
}

/// Body of a barrier wait and a double barrier enter.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wait {
    lease_id: u64,
    parties: u64,
    #[serde(default = "default_wait_ms")]
    wait_ms: u64,
    /// The generation the caller means to pass (to resume after a lost answer).
    generation: Option<u64>,
    request_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Leave {
    lease_id: u64,
    parties: Option<u64>,
    #[serde(default = "default_wait_ms")]
    wait_ms: u64,
    request_id: Option<String>,
}

/// The state machine checks these too; checking here saves a log entry.
fn check_args(parties: Option<u64>, wait_ms: u64) -> Result<(), ApiError> {
    if let Some(p) = parties {
        if p == 0 || p > MAX_PARTIES {
            return Err(ApiError::invalid(format!(
                "parties must be 1 to {MAX_PARTIES}, got {p}"
            )));
        }
    }
    if wait_ms == 0 || wait_ms > MAX_WAIT_MS {
        return Err(ApiError::invalid(format!(
            "wait_ms must be 1 to {MAX_WAIT_MS}, got {wait_ms}"
        )));
    }
    Ok(())
}

/// A `timeout` from the shared wait loop, reworded for a barrier.
fn reword_timeout(e: ApiError, message: String) -> ApiError {
    match e.code {
        ErrorCode::Timeout => ApiError::new(ErrorCode::Timeout, message),
        _ => e,
    }
}

async fn barrier_wait(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    ApiJson(b): ApiJson<Wait>,
) -> ApiResult {
    check_name("barrier name", &name, MAX_NAME_LEN)?;
    check_args(Some(b.parties), b.wait_ms)?;
    // Subscribe before proposing so no applied change is missed.
    let applied = node.sm.subscribe();
    let cmd = Command::BarrierWait {
        name: name.clone(),
        lease_id: b.lease_id,
        parties: b.parties,
        wait_ms: b.wait_ms,
        generation: b.generation,
    };
    let lease_id = b.lease_id;
    let released = |generation: u64, parties: u64, token: u64| {
        ok(
            json!({"barrier": name, "generation": generation, "parties": parties,
            "lease_id": lease_id, "token": token}),
        )
    };
    let g = match apply(&node, cmd, b.request_id).await? {
        Response::BarrierReleased {
            generation,
            parties,
            token,
        } => return released(generation, parties, token),
        Response::BarrierWaiting { generation, .. } => generation,
        r => return Err(unexpected(r)),
    };
    let what = format!("barrier {name} generation {g}");
    let token = wait_for_grant(&node, applied, lease_id, &what, |sm| {
        let Some(bar) = sm.barriers.get(&name) else {
            return WaitState::Gone;
        };
        match bar.passed.get(&lease_id) {
            Some(p) if p.generation == g => return WaitState::Granted(p.token),
            _ => {}
        }
        match bar.waiting.get(&lease_id) {
            Some(w) if bar.generation == g => WaitState::Queued(w.deadline_ms),
            _ => WaitState::Gone,
        }
    })
    .await
    .map_err(|e| {
        reword_timeout(
            e,
            format!("{what} was not released before the wait deadline; lease {lease_id} left it"),
        )
    })?;
    // Every party of a generation named the same `parties` (the state machine refuses others).
    released(g, b.parties, token)
}

fn waiters_json(w: &std::collections::BTreeMap<u64, BarrierWaiter>) -> Vec<Value> {
    let mut v: Vec<(&u64, &BarrierWaiter)> = w.iter().collect();
    v.sort_by_key(|(_, w)| w.seq);
    v.into_iter()
        .map(
            |(id, w)| json!({"lease_id": id, "since_ms": w.since_ms, "deadline_ms": w.deadline_ms}),
        )
        .collect()
}

fn release_json(r: &Option<BarrierRelease>) -> Value {
    match r {
        None => Value::Null,
        Some(r) => json!({"generation": r.generation, "parties": r.parties, "token": r.token,
            "time_ms": r.time_ms, "leases": r.leases}),
    }
}

async fn barrier_status(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<ReadQuery>,
) -> ApiResult {
    check_name("barrier name", &name, MAX_NAME_LEN)?;
    read_barrier(&node, &q).await?;
    let st = node.sm.read();
    let Some(bar) = st.sm.barriers.get(&name) else {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!("barrier {name} does not exist (nobody has waited at it)"),
        ));
    };
    ok(json!({
        "barrier": name,
        "generation": bar.generation,
        "parties": bar.parties,
        "arrived": waiters_json(&bar.waiting),
        "last_release": release_json(&bar.last_release),
    }))
}

async fn double_enter(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    ApiJson(b): ApiJson<Wait>,
) -> ApiResult {
    check_name("double barrier name", &name, MAX_NAME_LEN)?;
    check_args(Some(b.parties), b.wait_ms)?;
    let applied = node.sm.subscribe();
    let cmd = Command::DoubleBarrierEnter {
        name: name.clone(),
        lease_id: b.lease_id,
        parties: b.parties,
        wait_ms: b.wait_ms,
        generation: b.generation,
    };
    let lease_id = b.lease_id;
    let entered = |generation: u64, parties: u64, token: u64| {
        ok(
            json!({"double_barrier": name, "generation": generation, "parties": parties,
            "lease_id": lease_id, "token": token}),
        )
    };
    let g = match apply(&node, cmd, b.request_id).await? {
        Response::DoubleBarrierEntered {
            generation,
            parties,
            token,
        } => return entered(generation, parties, token),
        Response::DoubleBarrierEntering { generation, .. } => generation,
        r => return Err(unexpected(r)),
    };
    let what = format!("double barrier {name} generation {g}");
    let token = wait_for_grant(&node, applied, lease_id, &what, |sm| {
        let Some(d) = sm.double_barriers.get(&name) else {
            return WaitState::Gone;
        };
        if d.generation == g {
            if let Some(m) = d.inside.get(&lease_id) {
                return WaitState::Granted(m.token);
            }
            if let Some(w) = d.entering.get(&lease_id) {
                return WaitState::Queued(w.deadline_ms);
            }
        }
        // Entered, and everyone already left again before this call looked.
        match d.passed.get(&lease_id) {
            Some(p) if p.generation == g => WaitState::Granted(p.enter_token),
            _ => WaitState::Gone,
        }
    })
    .await
    .map_err(|e| {
        reword_timeout(
            e,
            format!("{what}: not all parties arrived before the wait deadline; lease {lease_id} did not enter"),
        )
    })?;
    entered(g, b.parties, token)
}

async fn double_leave(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    ApiJson(b): ApiJson<Leave>,
) -> ApiResult {
    check_name("double barrier name", &name, MAX_NAME_LEN)?;
    check_args(b.parties, b.wait_ms)?;
    let applied = node.sm.subscribe();
    let cmd = Command::DoubleBarrierLeave {
        name: name.clone(),
        lease_id: b.lease_id,
        parties: b.parties,
        wait_ms: b.wait_ms,
    };
    let lease_id = b.lease_id;
    let left = |generation: u64, parties: u64, token: u64| {
        ok(
            json!({"double_barrier": name, "generation": generation, "parties": parties,
            "lease_id": lease_id, "token": token}),
        )
    };
    let (g, parties) = match apply(&node, cmd, b.request_id).await? {
        Response::DoubleBarrierLeft {
            generation,
            parties,
            token,
        } => return left(generation, parties, token),
        Response::DoubleBarrierLeaving {
            generation,
            parties,
            ..
        } => (generation, parties),
        r => return Err(unexpected(r)),
    };
    let what = format!("double barrier {name} generation {g}");
    let token = wait_for_grant(&node, applied, lease_id, &what, |sm| {
        let Some(d) = sm.double_barriers.get(&name) else {
            return WaitState::Gone;
        };
        match d.passed.get(&lease_id) {
            Some(p) if p.generation == g => return WaitState::Granted(p.leave_token),
            _ => {}
        }
        let leaving = d.inside.get(&lease_id).and_then(|m| m.leaving.as_ref());
        match leaving {
            Some(w) if d.generation == g => WaitState::Queued(w.deadline_ms),
            _ => WaitState::Gone,
        }
    })
    .await
    .map_err(|e| {
        reword_timeout(
            e,
            format!("{what}: others were still inside at the wait deadline; lease {lease_id} has left but stopped waiting"),
        )
    })?;
    left(g, parties, token)
}

async fn double_status(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<ReadQuery>,
) -> ApiResult {
    check_name("double barrier name", &name, MAX_NAME_LEN)?;
    read_barrier(&node, &q).await?;
    let st = node.sm.read();
    let Some(d) = st.sm.double_barriers.get(&name) else {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!("double barrier {name} does not exist (nobody has entered it)"),
        ));
    };
    let phase = match (d.entering.is_empty(), d.inside.is_empty()) {
        (true, true) => "idle",
        (false, _) => "entering",
        (true, false) => "inside",
    };
    let inside: Vec<Value> = d
        .inside
        .iter()
        .map(|(id, m)| {
            json!({"lease_id": id, "token": m.token, "leaving": m.leaving.is_some(),
                "leave_deadline_ms": m.leaving.as_ref().map(|w| w.deadline_ms)})
        })
        .collect();
    ok(json!({
        "double_barrier": name,
        "generation": d.generation,
        "parties": d.parties,
        "phase": phase,
        "entering": waiters_json(&d.entering),
        "inside": inside,
        "remaining": d.remaining(),
        "last_release": release_json(&d.last_release),
    }))
}
