//! `/v1/conditions`: condition variables over exclusive locks (see `sm/condition.rs`), and
//! `/v1/conflicts`: what is contended now, the wait-for graph and recent deadlocks.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};

use super::deadlocks::{deadlock_error, lost_wait};
use super::error::ApiError;
use super::v1::{
    apply, check_name, ok, read_barrier, unexpected, wait_for_grant, ApiResult, ReadQuery,
    WaitState, MAX_NAME_LEN,
};
use super::{ApiJson, ApiQuery};
use crate::node::Node;
use crate::sm::{Command, LockMode, Response, Sm, MAX_WAIT_MS};

pub fn routes() -> Router<Arc<Node>> {
    Router::new()
        .route("/v1/conditions/{name}", get(status))
        .route("/v1/conditions/{name}/wait", post(wait))
        .route("/v1/conditions/{name}/notify", post(notify))
        .route("/v1/conflicts", get(conflicts))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wait {
    lease_id: u64,
    lock: String,
    wait_ms: u64,
    request_id: Option<String>,
}

async fn wait(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    ApiJson(b): ApiJson<Wait>,
) -> ApiResult {
    check_name("condition name", &name, MAX_NAME_LEN)?;
    check_name("lock", &b.lock, MAX_NAME_LEN)?;
    if b.wait_ms == 0 || b.wait_ms > MAX_WAIT_MS {
        return Err(ApiError::invalid(format!(
            "wait_ms must be 1 to {MAX_WAIT_MS}"
        )));
    }
    let applied = node.sm.subscribe();
    let cmd = Command::CondWait {
        name: name.clone(),
        lease_id: b.lease_id,
        lock: b.lock.clone(),
        wait_ms: b.wait_ms,
    };
    let (released, deadline) = match apply(&node, cmd, b.request_id).await? {
        Response::CondWaiting {
            released_token,
            deadline_ms,
        } => (released_token, deadline_ms),
        r => return Err(unexpected(r)),
    };
    let (lease_id, lock) = (b.lease_id, b.lock.clone());
    // Log time the wait started: refusals recorded since then are this wait's.
    let since = deadline.saturating_sub(b.wait_ms);
    let token = wait_for_grant(
        &node,
        applied,
        lease_id,
        &format!("lock {lock} after condition {name}"),
        |sm| probe(sm, &name, &lock, lease_id, since),
    )
    .await?;
    ok(
        json!({"condition": name, "lock": lock, "lease_id": lease_id,
              "token": token, "released_token": released}),
    )
}

/// Parked on the condition or queued for the lock: waiting; holding the lock: woken and
/// granted (a parked lease holds nothing, so any hold seen after the wait is a new grant).
/// `since` is the log time the wait started.
fn probe(sm: &Sm, name: &str, lock: &str, lease_id: u64, since: u64) -> WaitState {
    if let Some(w) = sm
        .conditions
        .get(name)
        .and_then(|c| c.waiters.iter().find(|w| w.lease_id == lease_id))
    {
        return WaitState::Queued(w.deadline_ms);
    }
    let l = sm.locks.get(lock);
    if let Some((LockMode::Exclusive, h)) = l.and_then(|l| l.hold_of(lease_id)) {
        return WaitState::Granted(h.token);
    }
    if let Some(w) = l.and_then(|l| l.queue.iter().find(|w| w.lease_id == lease_id)) {
        return WaitState::Queued(w.deadline_ms);
    }
    // The re-queue was refused, or the re-queued wait was later cancelled as a victim.
    let lost = lost_wait(sm, lease_id, &format!("lock:{lock}"), |d| {
        d.time_ms >= since
    });
    match lost {
        Some(d) => {
            let mut e = deadlock_error(d, &format!("lock {lock}"));
            e.message = format!("woken from condition {name}: {}", e.message);
            WaitState::Refused(e)
        }
        None => WaitState::Gone,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Notify {
    #[serde(default)]
    all: bool,
    request_id: Option<String>,
}

async fn notify(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    ApiJson(b): ApiJson<Notify>,
) -> ApiResult {
    check_name("condition name", &name, MAX_NAME_LEN)?;
    let cmd = Command::CondNotify {
        name: name.clone(),
        all: b.all,
    };
    match apply(&node, cmd, b.request_id).await? {
        Response::CondNotified { woken } => ok(json!({"condition": name, "woken": woken})),
        r => Err(unexpected(r)),
    }
}

async fn status(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<ReadQuery>,
) -> ApiResult {
    check_name("condition name", &name, MAX_NAME_LEN)?;
    read_barrier(&node, &q).await?;
    let st = node.sm.read();
    let waiters: Vec<Value> = st
        .sm
        .conditions
        .get(&name)
        .map(|c| {
            c.waiters
                .iter()
                .map(|w| json!({"lease_id": w.lease_id, "lock": w.lock, "since_ms": w.since_ms, "deadline_ms": w.deadline_ms}))
                .collect()
        })
        .unwrap_or_default();
    ok(json!({"condition": name, "waiters": waiters}))
}

/// `GET /v1/conflicts`: contended resources (locks and semaphores with waiters) sorted by
/// their longest wait, the wait-for graph, the recent deadlocks and the deadlock policy.
async fn conflicts(State(node): State<Arc<Node>>, ApiQuery(q): ApiQuery<ReadQuery>) -> ApiResult {
    read_barrier(&node, &q).await?;
    let st = node.sm.read();
    ok(conflicts_json(&st.sm))
}

pub(super) fn conflicts_json(sm: &Sm) -> Value {
    let now = sm.time_ms;
    let owner = |id: u64| sm.leases.get(&id).and_then(|l| l.owner.clone());
    let mut resources = Vec::new();
    for (name, l) in sm.locks.iter().filter(|(_, l)| !l.queue.is_empty()) {
        let holders: Vec<Value> = l
            .holders()
            .map(|(m, h)| json!({"lease_id": h.lease_id, "owner": owner(h.lease_id), "mode": m.as_str(), "token": h.token, "held_ms": now.saturating_sub(h.since_ms)}))
            .collect();
        let waiters: Vec<Value> = l
            .queue
            .iter()
            .map(|w| json!({"lease_id": w.lease_id, "owner": owner(w.lease_id), "mode": w.mode.as_str(), "waited_ms": now.saturating_sub(w.since_ms)}))
            .collect();
        let longest = l.queue.iter().map(|w| now.saturating_sub(w.since_ms)).max();
        resources.push((longest.unwrap_or(0), json!({"resource": format!("lock:{name}"), "holders": holders, "waiters": waiters, "longest_wait_ms": longest})));
    }
    for (name, s) in sm.semaphores.iter().filter(|(_, s)| !s.queue.is_empty()) {
        let holders: Vec<Value> = s
            .holders
            .iter()
            .map(|(id, h)| json!({"lease_id": id, "owner": owner(*id), "permits": h.permits, "token": h.token, "held_ms": now.saturating_sub(h.since_ms)}))
            .collect();
        let waiters: Vec<Value> = s
            .queue
            .iter()
            .map(|w| json!({"lease_id": w.lease_id, "owner": owner(w.lease_id), "permits": w.permits, "priority": w.priority, "waited_ms": now.saturating_sub(w.since_ms)}))
            .collect();
        let longest = s.queue.iter().map(|w| now.saturating_sub(w.since_ms)).max();
        resources.push((longest.unwrap_or(0), json!({"resource": format!("semaphore:{name}"), "capacity": s.capacity, "free": s.free(), "holders": holders, "waiters": waiters, "longest_wait_ms": longest})));
    }
    // Elections: the leader holds, the queued candidates wait for it to resign or end.
    for (name, e) in sm
        .elections
        .iter()
        .filter(|(_, e)| !e.candidates.is_empty())
    {
        let l = &e.leader;
        let holders = vec![
            json!({"lease_id": l.lease_id, "owner": owner(l.lease_id), "token": l.token, "held_ms": now.saturating_sub(l.since_ms)}),
        ];
        let waiters: Vec<Value> = e
            .candidates
            .iter()
            .map(|c| json!({"lease_id": c.lease_id, "owner": owner(c.lease_id), "waited_ms": now.saturating_sub(c.since_ms)}))
            .collect();
        let longest = e
            .candidates
            .iter()
            .map(|c| now.saturating_sub(c.since_ms))
            .max();
        resources.push((longest.unwrap_or(0), json!({"resource": format!("election:{name}"), "holders": holders, "waiters": waiters, "longest_wait_ms": longest})));
    }
    resources.sort_by_key(|r| std::cmp::Reverse(r.0));
    let resources: Vec<Value> = resources.into_iter().map(|(_, v)| v).collect();
    json!({
        "revision": sm.index,
        "time_ms": now,
        "resources": resources,
        "wait_for": sm.wait_graph(),
        "deadlocks": sm.deadlocks.iter().rev().collect::<Vec<_>>(),
        "deadlock_policy": sm.deadlock_policy.as_str(),
    })
}
