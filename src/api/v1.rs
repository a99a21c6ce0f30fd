//! Public `/v1` handlers: extract, validate, call, map.

use openraft::async_runtime::WatchReceiver;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use openraft::{BasicNode, ChangeMembers};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::{deadlocks, ApiJson, ApiQuery};
use crate::node::{now_ms, Node};
use crate::sm::{Command, ErrorCode, Fence, LockMode, Response, MAX_WAIT_MS};
use crate::store::Wakeup;

/// Longest key, in bytes.
pub const MAX_KEY_LEN: usize = 1024;
/// Longest lock or resource name, in bytes.
pub(super) const MAX_NAME_LEN: usize = 256;
/// Largest value, in bytes (the body limit is 1 MiB).
pub const MAX_VALUE_LEN: usize = 512 * 1024;
/// Longest request id, in bytes.
pub const MAX_REQUEST_ID_LEN: usize = 128;

pub(super) type ApiResult = Result<HttpResponse, ApiError>;

/// Routes any node answers from its own state.
pub fn local_routes() -> Router<Arc<Node>> {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/v1/cluster", get(cluster_status))
        .route("/v1/openapi.json", get(openapi))
}

/// Fault injection (chaos tests): only when the node runs with `--enable-fault-injection`.
pub fn admin_routes() -> Router<Arc<Node>> {
    Router::new()
        .route("/admin/faults", get(faults_get).post(faults_set))
        .layer(axum::extract::DefaultBodyLimit::max(super::BODY_LIMIT))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultsBody {
    blocked: BTreeSet<u64>,
}

async fn faults_get(State(node): State<Arc<Node>>) -> ApiResult {
    ok(json!({"enabled": node.faults.enabled(), "blocked": node.faults.blocked()}))
}

async fn faults_set(State(node): State<Arc<Node>>, ApiJson(b): ApiJson<FaultsBody>) -> ApiResult {
    if !node.faults.set_blocked(b.blocked) {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "fault injection is disabled; start the node with --enable-fault-injection",
        ));
    }
    ok(json!({"enabled": true, "blocked": node.faults.blocked()}))
}

/// Routes that need the leader (writes, linearizable reads).
pub fn leader_routes() -> Router<Arc<Node>> {
    Router::new()
        .route("/v1/cluster/members", post(add_member))
        .route("/v1/cluster/members/{id}", delete(remove_member))
        .route("/v1/leases", post(lease_grant).get(lease_list))
        .route("/v1/leases/{id}", get(lease_get).delete(lease_revoke))
        .route("/v1/leases/{id}/keepalive", post(lease_keepalive))
        .route("/v1/kv", get(kv_list))
        .route("/v1/kv/{*key}", get(kv_get).put(kv_put).delete(kv_delete))
        .route("/v1/locks/{name}", get(lock_get))
        .route("/v1/locks/{name}/acquire", post(lock_acquire))
        .route("/v1/locks/{name}/release", post(lock_release))
        .route("/v1/fence/check", post(fence_check))
}

// ---------- helpers ----------

pub(super) fn ok(v: Value) -> ApiResult {
    Ok(Json(v).into_response())
}

fn check_request_id(id: &Option<String>) -> Result<(), ApiError> {
    match id {
        Some(id) if id.is_empty() || id.len() > MAX_REQUEST_ID_LEN => Err(ApiError::invalid(
            format!("request_id must be 1 to {MAX_REQUEST_ID_LEN} bytes"),
        )),
        _ => Ok(()),
    }
}

pub(super) fn check_name(what: &str, name: &str, max: usize) -> Result<(), ApiError> {
    if name.is_empty() || name.len() > max {
        return Err(ApiError::invalid(format!(
            "{what} must be 1 to {max} bytes"
        )));
    }
    if name.chars().any(|c| c.is_control()) {
        return Err(ApiError::invalid(format!(
            "{what} must not contain control characters"
        )));
    }
    Ok(())
}

pub(super) fn parse_id(s: &str) -> Result<u64, ApiError> {
    s.parse()
        .map_err(|_| ApiError::invalid(format!("{s:?} is not a valid id")))
}

/// A domain rejection (an applied entry whose response says why) becomes the client's error.
fn accepted(r: Response) -> Result<Response, ApiError> {
    match r {
        Response::Rejected(r) => Err(r.into()),
        r => Ok(r),
    }
}

/// Propose, wait until this node applied the entry too, and turn a domain rejection into an
/// error.
pub(super) async fn apply(
    node: &Node,
    cmd: Command,
    request_id: Option<String>,
) -> Result<Response, ApiError> {
    check_request_id(&request_id)?;
    let (_, response) = node.propose_at(cmd, request_id).await?;
    accepted(response)
}

/// [`apply`] for handlers that only answer with the response and read no state after it
/// (plain writes): on a follower it answers with the leader's result without waiting until
/// this node has applied the entry (`Node::propose`). Handlers that read this node's state
/// afterwards use [`apply`] or wait themselves ([`apply_indexed`]): leadership can move between
/// routing and proposing, and then even a leader route's entry goes through the forwarder.
pub(super) async fn apply_nowait(
    node: &Node,
    cmd: Command,
    request_id: Option<String>,
) -> Result<Response, ApiError> {
    check_request_id(&request_id)?;
    accepted(node.propose(cmd, request_id).await?)
}

/// [`apply_nowait`], also returning the entry's index. For acquires: a grant is answered from
/// the response at once; a queued acquire then waits until this node applied `index`
/// ([`propose::await_applied`]) before it watches this node's state for its grant.
pub(super) async fn apply_indexed(
    node: &Node,
    cmd: Command,
    request_id: Option<String>,
) -> Result<(u64, Response), ApiError> {
    check_request_id(&request_id)?;
    let (index, response) = node.propose_indexed(cmd, request_id).await?;
    Ok((index, accepted(response)?))
}

pub(super) fn unexpected(r: Response) -> ApiError {
    ApiError::new(
        ErrorCode::Unavailable,
        format!("unexpected state machine response {r:?}"),
    )
}

#[derive(Deserialize, Default)]
pub(super) struct ReadQuery {
    consistency: Option<String>,
}

/// Linearizable by default; `stale` reads this node's state as it is.
pub(super) async fn read_barrier(node: &Node, q: &ReadQuery) -> Result<(), ApiError> {
    match q.consistency.as_deref() {
        None | Some("linearizable") => node.read_barrier().await,
        Some("stale") => Ok(()),
        Some(other) => Err(ApiError::invalid(format!(
            "consistency must be linearizable or stale, got {other:?}"
        ))),
    }
}

// ---------- cluster ----------

async fn health() -> HttpResponse {
    Json(json!({"status": "ok"})).into_response()
}

async fn ready(State(node): State<Arc<Node>>) -> HttpResponse {
    let m = node.raft.metrics().borrow_watched().clone();
    let applied = m.last_applied.as_ref().map_or(0, |l| l.index);
    let committed = m.local_committed.as_ref().map_or(0, |l| l.index);
    let ready = m.current_leader.is_some() && applied >= committed;
    let body = json!({"ready": ready, "leader": m.current_leader, "applied_index": applied, "commit_index": committed});
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn cluster_status(State(node): State<Arc<Node>>) -> HttpResponse {
    let m = node.raft.metrics().borrow_watched().clone();
    let membership = m.membership_config.membership();
    let voters: BTreeSet<u64> = membership.voter_ids().collect();
    let members: Vec<Value> = membership
        .nodes()
        .map(|(id, n)| {
            let role = if voters.contains(id) {
                "voter"
            } else {
                "learner"
            };
            json!({"id": id, "addr": n.addr, "role": role, "leader": Some(*id) == m.current_leader})
        })
        .collect();
    let body = json!({
        "id": node.id,
        "leader": m.current_leader,
        "term": m.current_term,
        "state": format!("{:?}", m.state),
        "members": members,
        "applied_index": m.last_applied.as_ref().map_or(0, |l| l.index),
        "commit_index": m.local_committed.as_ref().map_or(0, |l| l.index),
        "last_log_index": m.last_log_index,
        "snapshot_index": m.snapshot.as_ref().map(|l| l.index),
        "fsyncs": node.fsync.fsyncs.load(std::sync::atomic::Ordering::Relaxed),
        "appended_entries": node.fsync.entries.load(std::sync::atomic::Ordering::Relaxed),
        "forwarded_batches": node.forwarder.stats().batches.load(std::sync::atomic::Ordering::Relaxed),
        "forwarded_entries": node.forwarder.stats().entries.load(std::sync::atomic::Ordering::Relaxed),
        "replication_streams_opened": node.streams.opened.load(std::sync::atomic::Ordering::Relaxed),
        "replication_streams_accepted": node.streams.accepted.load(std::sync::atomic::Ordering::Relaxed),
        "replication_stream_fallbacks": node.streams.fallbacks.load(std::sync::atomic::Ordering::Relaxed),
        "replication_requests": node.streams.requests.load(std::sync::atomic::Ordering::Relaxed),
        "replication_empty_requests": node.streams.empty_requests.load(std::sync::atomic::Ordering::Relaxed),
    });
    Json(body).into_response()
}

async fn openapi() -> HttpResponse {
    (
        [("content-type", "application/json")],
        include_str!("openapi.json"),
    )
        .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddMember {
    id: u64,
    addr: String,
}

async fn add_member(State(node): State<Arc<Node>>, ApiJson(b): ApiJson<AddMember>) -> ApiResult {
    if b.id == 0 {
        return Err(ApiError::invalid("node id must be positive"));
    }
    check_name("addr", &b.addr, 256)?;
    if !b.addr.contains(':') {
        return Err(ApiError::invalid("addr must be HOST:PORT"));
    }
    let _guard = node.membership_lock.lock().await;
    if node.sm.read().sm.retired_nodes.contains(&b.id) {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!(
                "node id {} was removed before; node ids are never reused",
                b.id
            ),
        ));
    }
    let m = node
        .raft
        .metrics()
        .borrow_watched()
        .membership_config
        .clone();
    if m.membership().voter_ids().any(|v| v == b.id) {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!("node {} is already a voter", b.id),
        ));
    }
    match m.membership().get_node(&b.id) {
        // A learner left by an interrupted add: resume with the promotion, same address only.
        Some(n) if n.addr != b.addr => {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!("node {} is already a learner at {}", b.id, n.addr),
            ))
        }
        Some(_) => {}
        None => {
            // Join as a learner and catch up (blocking, bounded), then become a voter.
            let add = node.raft.add_learner(
                b.id,
                BasicNode {
                    addr: b.addr.clone(),
                },
                true,
            );
            match tokio::time::timeout(MEMBERSHIP_TIMEOUT, add).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(ApiError::new(ErrorCode::Unavailable, format!("add learner: {e}"))),
                Err(_) => {
                    return Err(ApiError::new(
                        ErrorCode::Unavailable,
                        format!("node {} did not catch up within {MEMBERSHIP_TIMEOUT:?}; it stays a learner, retry to promote it or remove it", b.id),
                    ))
                }
            }
        }
    }
    let add_voter = ChangeMembers::AddVoterIds(BTreeSet::from([b.id]));
    node.raft
        .change_membership(add_voter, true)
        .await
        .map_err(|e| ApiError::new(ErrorCode::Unavailable, format!("change membership: {e}")))?;
    let voters: BTreeSet<u64> = node
        .raft
        .metrics()
        .borrow_watched()
        .membership_config
        .membership()
        .voter_ids()
        .collect();
    ok(json!({"id": b.id, "addr": b.addr, "voters": voters}))
}

/// How long adding a node may take to catch up.
const MEMBERSHIP_TIMEOUT: Duration = Duration::from_secs(60);

async fn remove_member(State(node): State<Arc<Node>>, Path(id): Path<String>) -> ApiResult {
    let id = parse_id(&id)?;
    let _guard = node.membership_lock.lock().await;
    let m = node
        .raft
        .metrics()
        .borrow_watched()
        .membership_config
        .clone();
    if m.membership().get_node(&id).is_none() {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!("node {id} is not a member"),
        ));
    }
    let is_voter = m.membership().voter_ids().any(|v| v == id);
    if is_voter && m.membership().voter_ids().count() == 1 {
        return Err(ApiError::invalid("cannot remove the last voter"));
    }
    apply(&node, Command::RetireNode { node_id: id }, None).await?;
    let ids = BTreeSet::from([id]);
    let change = if is_voter {
        ChangeMembers::RemoveVoters(ids)
    } else {
        ChangeMembers::RemoveNodes(ids)
    };
    // retain=false: a removed voter is dropped from the membership entirely.
    node.raft
        .change_membership(change, false)
        .await
        .map_err(|e| ApiError::new(ErrorCode::Unavailable, format!("change membership: {e}")))?;
    let voters: BTreeSet<u64> = node
        .raft
        .metrics()
        .borrow_watched()
        .membership_config
        .membership()
        .voter_ids()
        .collect();
    ok(json!({"removed": id, "voters": voters}))
}

// ---------- leases ----------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LeaseGrant {
    ttl_ms: u64,
    owner: Option<String>,
    request_id: Option<String>,
}

async fn lease_grant(State(node): State<Arc<Node>>, ApiJson(b): ApiJson<LeaseGrant>) -> ApiResult {
    if let Some(o) = &b.owner {
        check_name("owner", o, MAX_NAME_LEN)?;
    }
    let cmd = Command::LeaseGrant {
        ttl_ms: b.ttl_ms,
        owner: b.owner,
    };
    match apply_nowait(&node, cmd, b.request_id).await? {
        Response::LeaseGranted { lease_id, ttl_ms } => Ok((
            StatusCode::CREATED,
            Json(json!({"lease_id": lease_id, "ttl_ms": ttl_ms})),
        )
            .into_response()),
        r => Err(unexpected(r)),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct WithRequestId {
    request_id: Option<String>,
}

async fn lease_keepalive(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
    ApiJson(b): ApiJson<WithRequestId>,
) -> ApiResult {
    let lease_id = parse_id(&id)?;
    match apply_nowait(&node, Command::LeaseKeepAlive { lease_id }, b.request_id).await? {
        Response::LeaseKept { lease_id, ttl_ms } => {
            ok(json!({"lease_id": lease_id, "ttl_ms": ttl_ms}))
        }
        r => Err(unexpected(r)),
    }
}

async fn lease_revoke(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
    ApiJson(b): ApiJson<WithRequestId>,
) -> ApiResult {
    let lease_id = parse_id(&id)?;
    match apply_nowait(&node, Command::LeaseRevoke { lease_id }, b.request_id).await? {
        Response::LeaseRevoked { lease_id } => ok(json!({"lease_id": lease_id, "revoked": true})),
        r => Err(unexpected(r)),
    }
}

fn lease_json(l: &crate::sm::Lease, now: u64) -> Value {
    json!({
        "lease_id": l.id,
        "owner": l.owner,
        "ttl_ms": l.ttl_ms,
        "remaining_ms": l.deadline_ms.saturating_sub(now),
        "granted_ms": l.granted_ms,
        "deadline_ms": l.deadline_ms,
        "locks": l.locks,
        "waiting": l.waiting,
        "keys": l.keys,
    })
}

async fn lease_get(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<ReadQuery>,
) -> ApiResult {
    let lease_id = parse_id(&id)?;
    read_barrier(&node, &q).await?;
    let st = node.sm.read();
    // A lease past its deadline is dead even if the expiry tick has not been applied yet.
    let now = now_ms().max(st.sm.time_ms);
    match st.sm.leases.get(&lease_id) {
        Some(l) if l.deadline_ms > now => ok(lease_json(l, now)),
        _ => Err(ApiError::new(
            ErrorCode::LeaseNotFound,
            format!("lease {lease_id} does not exist or has expired"),
        )),
    }
}

async fn lease_list(State(node): State<Arc<Node>>, ApiQuery(q): ApiQuery<ReadQuery>) -> ApiResult {
    read_barrier(&node, &q).await?;
    let st = node.sm.read();
    let now = now_ms().max(st.sm.time_ms);
    let leases: Vec<Value> = st
        .sm
        .leases
        .values()
        .filter(|l| l.deadline_ms > now)
        .map(|l| lease_json(l, now))
        .collect();
    ok(json!({"leases": leases}))
}

// ---------- kv ----------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KvPut {
    value: String,
    lease_id: Option<u64>,
    if_version: Option<u64>,
    #[serde(default)]
    if_absent: bool,
    fence: Option<Fence>,
    request_id: Option<String>,
}

async fn kv_put(
    State(node): State<Arc<Node>>,
    Path(key): Path<String>,
    ApiJson(b): ApiJson<KvPut>,
) -> ApiResult {
    check_name("key", &key, MAX_KEY_LEN)?;
    if b.value.len() > MAX_VALUE_LEN {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("value is larger than {MAX_VALUE_LEN} bytes"),
        ));
    }
    if let Some(f) = &b.fence {
        check_name("fence.lock", &f.lock, MAX_NAME_LEN)?;
    }
    let cmd = Command::KvPut {
        key,
        value: b.value,
        lease_id: b.lease_id,
        if_version: b.if_version,
        if_absent: b.if_absent,
        fence: b.fence,
    };
    match apply_nowait(&node, cmd, b.request_id).await? {
        Response::KvPut { version, revision } => {
            ok(json!({"version": version, "revision": revision}))
        }
        r => Err(unexpected(r)),
    }
}

async fn kv_get(
    State(node): State<Arc<Node>>,
    Path(key): Path<String>,
    ApiQuery(q): ApiQuery<ReadQuery>,
) -> ApiResult {
    check_name("key", &key, MAX_KEY_LEN)?;
    read_barrier(&node, &q).await?;
    let st = node.sm.read();
    match st.sm.kv.get(&key) {
        Some(e) => ok(json!({
            "key": key,
            "value": e.value,
            "version": e.version,
            "create_revision": e.create_revision,
            "mod_revision": e.mod_revision,
            "lease_id": e.lease_id,
        })),
        None => Err(ApiError::new(
            ErrorCode::NotFound,
            format!("key {key:?} not found"),
        )),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct KvDelete {
    if_version: Option<u64>,
    request_id: Option<String>,
}

async fn kv_delete(
    State(node): State<Arc<Node>>,
    Path(key): Path<String>,
    ApiJson(b): ApiJson<KvDelete>,
) -> ApiResult {
    check_name("key", &key, MAX_KEY_LEN)?;
    let cmd = Command::KvDelete {
        key,
        if_version: b.if_version,
    };
    match apply_nowait(&node, cmd, b.request_id).await? {
        Response::KvDeleted { deleted, revision } => {
            ok(json!({"deleted": deleted, "revision": revision}))
        }
        r => Err(unexpected(r)),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    prefix: String,
    /// Return keys strictly after this one (paging: pass the last key of the previous page).
    start_after: Option<String>,
    limit: Option<usize>,
    consistency: Option<String>,
}

/// Largest page of a list.
const MAX_LIST: usize = 10_000;

async fn kv_list(State(node): State<Arc<Node>>, ApiQuery(q): ApiQuery<ListQuery>) -> ApiResult {
    let limit = q.limit.unwrap_or(1000);
    if limit == 0 || limit > MAX_LIST {
        return Err(ApiError::invalid(format!("limit must be 1 to {MAX_LIST}")));
    }
    read_barrier(
        &node,
        &ReadQuery {
            consistency: q.consistency.clone(),
        },
    )
    .await?;
    let st = node.sm.read();
    let mut kvs = Vec::new();
    let mut more = false;
    let start = match &q.start_after {
        Some(a) if a.as_str() >= q.prefix.as_str() => std::ops::Bound::Excluded(a.clone()),
        _ => std::ops::Bound::Included(q.prefix.clone()),
    };
    for (k, e) in st.sm.kv.range((start, std::ops::Bound::Unbounded)) {
        if !k.starts_with(&q.prefix) {
            break;
        }
        if kvs.len() == limit {
            more = true;
            break;
        }
        kvs.push(json!({
            "key": k, "value": e.value, "version": e.version,
            "create_revision": e.create_revision, "mod_revision": e.mod_revision, "lease_id": e.lease_id,
        }));
    }
    ok(json!({"kvs": kvs, "more": more, "revision": st.sm.index}))
}

// ---------- locks ----------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LockAcquire {
    lease_id: u64,
    #[serde(default)]
    wait_ms: u64,
    /// "exclusive" (default) or "shared".
    #[serde(default)]
    mode: LockMode,
    request_id: Option<String>,
}

/// Slack after a wait deadline before a blocked call gives up on the state machine deciding
/// (e.g. no leader to tick) and answers 503; a retry resumes the same queue position.
pub(super) const WAIT_SLACK: Duration = Duration::from_secs(5);

async fn lock_acquire(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    ApiJson(b): ApiJson<LockAcquire>,
) -> ApiResult {
    check_name("lock name", &name, MAX_NAME_LEN)?;
    if b.wait_ms > MAX_WAIT_MS {
        return Err(ApiError::invalid(format!(
            "wait_ms must be at most {MAX_WAIT_MS}"
        )));
    }
    // Subscribe before proposing so no applied change is missed.
    let applied = node.sm.subscribe_lease(b.lease_id);
    let cmd = Command::LockAcquire {
        name: name.clone(),
        lease_id: b.lease_id,
        wait_ms: b.wait_ms,
        mode: b.mode,
    };
    let mode = b.mode;
    let granted = |token: u64| {
        ok(json!({"lock": name, "lease_id": b.lease_id, "mode": mode.as_str(), "token": token}))
    };
    // Deadlock records after `since` are about this call's wait. It is the index before this
    // call's entry, the same on any node (a follower's own applied index may lag the leader's
    // and let an older record of the same lease and lock pass for this wait's).
    let (index, response) = apply_indexed(&node, cmd, b.request_id).await?;
    let since = index - 1;
    match response {
        Response::LockGranted { token } => return granted(token),
        // A try-lock never waits, even when the lease is already queued by an earlier call.
        Response::LockQueued { .. } if b.wait_ms == 0 => {
            return Err(ApiError::new(
                ErrorCode::LockHeld,
                format!(
                    "lock {name} is held; lease {} is already queued for it",
                    b.lease_id
                ),
            ))
        }
        Response::LockQueued { .. } => {}
        r => return Err(unexpected(r)),
    }
    // The wait is watched in this node's state, which must hold the queued entry first.
    crate::propose::await_applied(&node, index).await?;
    let lease_id = b.lease_id;
    let what = format!("lock {name}");
    let token = wait_for_grant(&node, applied, lease_id, &what, |sm| {
        let lock = sm.locks.get(&name);
        if let Some((_, h)) = lock.and_then(|l| l.hold_of(lease_id)) {
            return WaitState::Granted(h.token);
        }
        let waiter = lock.and_then(|l| l.queue.iter().find(|w| w.lease_id == lease_id));
        match waiter {
            Some(w) => WaitState::Queued(w.deadline_ms),
            None => victim_state(sm, lease_id, &format!("lock:{name}"), since, &what),
        }
    })
    .await?;
    granted(token)
}

/// A wait that is gone: `Refused` when a deadlock record after log index `since` cancelled it
/// (the lease was a victim of the deadlock policy), otherwise `Gone`.
pub(super) fn victim_state(
    sm: &crate::sm::Sm,
    lease_id: u64,
    resource: &str,
    since: u64,
    what: &str,
) -> WaitState {
    match deadlocks::lost_wait(sm, lease_id, resource, |d| d.index > since) {
        Some(d) => WaitState::Refused(deadlocks::deadlock_error(d, what)),
        None => WaitState::Gone,
    }
}

/// What a blocked caller finds in the applied state.
pub(super) enum WaitState {
    Granted(u64),
    /// Still queued, with the replicated wait deadline.
    Queued(u64),
    /// Neither granted nor queued: the wait deadline passed or the lease ended.
    Gone,
    /// The state machine refused or cancelled the wait (a deadlock found on a later step).
    Refused(ApiError),
}

/// Wait for the replicated outcome of a queued acquire. The state machine decides (grant,
/// deadline, lease end); this only watches applied indexes. The deadline is the replicated
/// waiter's own, so a retried or repeated acquire by a lease that is already queued resumes
/// that wait rather than starting a new one.
pub(super) async fn wait_for_grant(
    node: &Node,
    applied: impl Into<Wakeup>,
    lease_id: u64,
    what: &str,
    probe: impl Fn(&crate::sm::Sm) -> WaitState,
) -> Result<u64, ApiError> {
    let mut applied = applied.into();
    let mut deadline = None;
    let mut stopping = node.stopping.subscribe();
    loop {
        {
            let st = node.sm.read();
            match probe(&st.sm) {
                WaitState::Granted(token) => return Ok(token),
                WaitState::Queued(deadline_ms) => {
                    deadline.get_or_insert_with(|| {
                        // Against the replicated log time, not this node's clock, which may
                        // differ from the leader's that set the deadline.
                        let left = deadline_ms.saturating_sub(st.sm.time_ms);
                        tokio::time::Instant::now() + Duration::from_millis(left) + WAIT_SLACK
                    });
                }
                WaitState::Gone if !st.sm.leases.contains_key(&lease_id) => {
                    return Err(ApiError::new(
                        ErrorCode::LeaseNotFound,
                        format!("lease {lease_id} ended while waiting for {what}"),
                    ))
                }
                WaitState::Refused(e) => return Err(e),
                WaitState::Gone => {
                    return Err(ApiError::new(
                        ErrorCode::Timeout,
                        format!("{what} was not granted before the wait deadline"),
                    ))
                }
            }
        }
        let until = deadline.unwrap_or_else(tokio::time::Instant::now);
        let woke = tokio::select! {
            r = applied.changed() => r,
            _ = stopping.wait_for(|s| *s) => false,
            _ = tokio::time::sleep_until(until) => false,
        };
        if !woke {
            return Err(ApiError::new(
                ErrorCode::Unavailable,
                "the wait outcome was not replicated in time (or this node is stopping); retry the acquire to keep waiting",
            ));
        }
    }
}

async fn lock_release(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    ApiJson(b): ApiJson<LockReleaseBody>,
) -> ApiResult {
    check_name("lock name", &name, MAX_NAME_LEN)?;
    let cmd = Command::LockRelease {
        name: name.clone(),
        lease_id: b.lease_id,
    };
    match apply_nowait(&node, cmd, b.request_id).await? {
        Response::LockReleased { next_holder } => {
            ok(json!({"lock": name, "released": true, "next_holder": next_holder}))
        }
        r => Err(unexpected(r)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LockReleaseBody {
    lease_id: u64,
    request_id: Option<String>,
}

async fn lock_get(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<ReadQuery>,
) -> ApiResult {
    check_name("lock name", &name, MAX_NAME_LEN)?;
    read_barrier(&node, &q).await?;
    let st = node.sm.read();
    let lock = st.sm.locks.get(&name);
    let hold = |h: &crate::sm::Holder| json!({"lease_id": h.lease_id, "token": h.token, "since_ms": h.since_ms});
    let holder = lock.and_then(|l| l.holder.as_ref()).map(hold);
    let shared: Vec<Value> = lock
        .map(|l| l.shared.values().map(hold).collect())
        .unwrap_or_default();
    let mode = match (&holder, shared.is_empty()) {
        (Some(_), _) => Some("exclusive"),
        (None, false) => Some("shared"),
        (None, true) => None,
    };
    let queue: Vec<Value> = lock
        .map(|l| {
            l.queue
                .iter()
                .map(|w| json!({"lease_id": w.lease_id, "mode": w.mode.as_str(), "since_ms": w.since_ms, "deadline_ms": w.deadline_ms}))
                .collect()
        })
        .unwrap_or_default();
    ok(json!({
        "lock": name,
        "held": mode.is_some(),
        "mode": mode,
        "holder": holder,
        "shared_holders": shared,
        "queue": queue,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FenceCheck {
    lock: String,
    token: u64,
}

async fn fence_check(State(node): State<Arc<Node>>, ApiJson(b): ApiJson<FenceCheck>) -> ApiResult {
    check_name("lock", &b.lock, MAX_NAME_LEN)?;
    node.read_barrier().await?;
    let st = node.sm.read();
    let (_, current) = st.sm.fence_valid(&b.lock, b.token);
    let hold = st.sm.token_holder(&b.lock, b.token);
    let mut valid = hold.is_some();
    // A holder whose lease deadline has passed is no longer valid, even before the expiry
    // tick is applied: a fenced write stamped now would find the lock already handed off.
    let now = now_ms().max(st.sm.time_ms);
    if let Some(lease) = hold.and_then(|(_, id)| st.sm.leases.get(&id)) {
        if lease.deadline_ms <= now {
            valid = false;
        }
    }
    let mode = hold.map(|(m, _)| m.as_str());
    ok(
        json!({"lock": b.lock, "token": b.token, "valid": valid, "mode": mode, "current_token": current}),
    )
}
