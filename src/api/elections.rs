//! `/v1/elections`: leader election among leases, with a FIFO candidate line and fencing tokens
//! (see `sm/election.rs` for the rules).

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
use crate::sm::{Command, ErrorCode, Response, MAX_ELECTION_VALUE, MAX_WAIT_MS};

pub fn routes() -> Router<Arc<Node>> {
    Router::new()
        .route("/v1/elections/{name}", get(status))
        .route("/v1/elections/{name}/campaign", post(campaign))
        .route("/v1/elections/{name}/proclaim", post(proclaim))
        .route("/v1/elections/{name}/resign", post(resign))
}

fn check_value(value: &str) -> Result<(), ApiError> {
    if value.len() > MAX_ELECTION_VALUE {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("value is larger than {MAX_ELECTION_VALUE} bytes"),
        ));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Campaign {
    lease_id: u64,
    #[serde(default)]
    value: String,
    #[serde(default)]
    wait_ms: u64,
    request_id: Option<String>,
}

fn leader_json(name: &str, leader: u64, value: &str, token: u64, since_ms: u64) -> ApiResult {
    ok(
        json!({"election": name, "leader": leader, "value": value, "token": token, "since_ms": since_ms}),
    )
}

async fn campaign(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    ApiJson(b): ApiJson<Campaign>,
) -> ApiResult {
    check_name("election name", &name, MAX_NAME_LEN)?;
    check_value(&b.value)?;
    if b.wait_ms > MAX_WAIT_MS {
        return Err(ApiError::invalid(format!(
            "wait_ms must be at most {MAX_WAIT_MS}"
        )));
    }
    // Subscribe before proposing so no applied change is missed.
    let applied = node.sm.subscribe();
    let cmd = Command::ElectionCampaign {
        name: name.clone(),
        lease_id: b.lease_id,
        value: b.value.clone(),
        wait_ms: b.wait_ms,
    };
    match apply(&node, cmd, b.request_id).await? {
        Response::Elected {
            leader,
            value,
            token,
            since_ms,
        } => return leader_json(&name, leader, &value, token, since_ms),
        // Trying never waits, even when the lease is already in line from an earlier call.
        Response::ElectionQueued { .. } if b.wait_ms == 0 => {
            return Err(ApiError::new(
                ErrorCode::LockHeld,
                format!(
                    "election {name} has a leader; lease {} is already a candidate",
                    b.lease_id
                ),
            ))
        }
        Response::ElectionQueued { .. } => {}
        r => return Err(unexpected(r)),
    }
    let lease_id = b.lease_id;
    let token = wait_for_grant(
        &node,
        applied,
        lease_id,
        &format!("election {name}"),
        |sm| {
            let Some(e) = sm.elections.get(&name) else {
                return WaitState::Gone;
            };
            if e.leader.lease_id == lease_id {
                return WaitState::Granted(e.leader.token);
            }
            let c = e.candidates.iter().find(|c| c.lease_id == lease_id);
            c.map_or(WaitState::Gone, |c| WaitState::Queued(c.deadline_ms))
        },
    )
    .await?;
    // Its current value and start (a proclaim may already have changed the value).
    let st = node.sm.read();
    match st.sm.elections.get(&name).map(|e| &e.leader) {
        Some(l) if l.lease_id == lease_id && l.token == token => {
            leader_json(&name, lease_id, &l.value, token, l.since_ms)
        }
        // It was elected, and has already stepped down or lost its lease since.
        _ => Err(ApiError::new(
            ErrorCode::Conflict,
            format!("lease {lease_id} was elected in election {name} with token {token} but no longer leads"),
        )
        .with("token", token)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Proclaim {
    lease_id: u64,
    value: String,
    request_id: Option<String>,
}

async fn proclaim(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    ApiJson(b): ApiJson<Proclaim>,
) -> ApiResult {
    check_name("election name", &name, MAX_NAME_LEN)?;
    check_value(&b.value)?;
    let cmd = Command::ElectionProclaim {
        name: name.clone(),
        lease_id: b.lease_id,
        value: b.value.clone(),
    };
    match apply(&node, cmd, b.request_id).await? {
        Response::Proclaimed { token } => {
            ok(json!({"election": name, "leader": b.lease_id, "value": b.value, "token": token}))
        }
        r => Err(unexpected(r)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Resign {
    lease_id: u64,
    request_id: Option<String>,
}

async fn resign(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    ApiJson(b): ApiJson<Resign>,
) -> ApiResult {
    check_name("election name", &name, MAX_NAME_LEN)?;
    let cmd = Command::ElectionResign {
        name: name.clone(),
        lease_id: b.lease_id,
    };
    match apply(&node, cmd, b.request_id).await? {
        Response::Resigned {
            was_leader,
            next_leader,
            token,
        } => ok(json!({
            "election": name,
            "resigned": true,
            "was_leader": was_leader,
            "leader": next_leader,
            "token": token,
        })),
        r => Err(unexpected(r)),
    }
}

async fn status(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<ReadQuery>,
) -> ApiResult {
    check_name("election name", &name, MAX_NAME_LEN)?;
    read_barrier(&node, &q).await?;
    let st = node.sm.read();
    // An election nobody leads or waits for is not stored: it reads as leaderless.
    let Some(e) = st.sm.elections.get(&name) else {
        return ok(json!({
            "election": name, "leader": null, "value": null, "token": null, "since_ms": null,
            "candidates": [],
        }));
    };
    let candidates: Vec<Value> = e
        .candidates
        .iter()
        .map(|c| json!({"lease_id": c.lease_id, "since_ms": c.since_ms, "deadline_ms": c.deadline_ms}))
        .collect();
    ok(json!({
        "election": name,
        "leader": e.leader.lease_id,
        "value": e.leader.value,
        "token": e.leader.token,
        "since_ms": e.leader.since_ms,
        "candidates": candidates,
    }))
}
