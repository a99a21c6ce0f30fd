//! `/v1/deadlock-policy`: who loses when a wait would close a cycle in the wait-for graph (see
//! `sm/deadlock.rs`), and the `409 deadlock` a blocked caller gets when the state machine
//! cancelled its wait as a deadlock victim.
//!
//! The policy is replicated state: `PUT` writes a `SetDeadlockPolicy` entry through the leader,
//! so every node resolves every later deadlock the same way.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use super::v1::{apply, ok, read_barrier, unexpected, ApiResult, ReadQuery};
use super::{ApiJson, ApiQuery};
use crate::node::Node;
use crate::sm::{Command, DeadlockPolicy, DeadlockRecord, ErrorCode, Response, Sm};

pub fn routes() -> Router<Arc<Node>> {
    Router::new().route("/v1/deadlock-policy", get(status).put(set))
}

fn policy_names() -> Vec<&'static str> {
    DeadlockPolicy::ALL.iter().map(|p| p.as_str()).collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Set {
    policy: String,
    request_id: Option<String>,
}

async fn set(State(node): State<Arc<Node>>, ApiJson(b): ApiJson<Set>) -> ApiResult {
    let Some(policy) = DeadlockPolicy::parse(&b.policy) else {
        return Err(ApiError::invalid(format!(
            "policy must be one of {}, got {:?}",
            policy_names().join(", "),
            b.policy
        )));
    };
    match apply(&node, Command::SetDeadlockPolicy { policy }, b.request_id).await? {
        Response::DeadlockPolicySet { policy, previous } => {
            ok(json!({"policy": policy.as_str(), "previous": previous.as_str()}))
        }
        r => Err(unexpected(r)),
    }
}

async fn status(State(node): State<Arc<Node>>, ApiQuery(q): ApiQuery<ReadQuery>) -> ApiResult {
    read_barrier(&node, &q).await?;
    let policy = node.sm.read().sm.deadlock_policy;
    ok(json!({"policy": policy.as_str(), "policies": policy_names()}))
}

/// The newest deadlock record that ended `lease_id`'s wait on `resource` (`lock:NAME` or
/// `semaphore:NAME`) and passes `recent` (written after the wait started).
pub(super) fn lost_wait<'a>(
    sm: &'a Sm,
    lease_id: u64,
    resource: &str,
    recent: impl Fn(&DeadlockRecord) -> bool,
) -> Option<&'a DeadlockRecord> {
    sm.deadlocks
        .iter()
        .rev()
        .find(|d| d.victim == lease_id && d.resource == resource && recent(d))
}

/// The `409 deadlock` for a wait on `what` that `d` ended: refused (its own request closed the
/// cycle) or cancelled (another lease's request did, and the policy picked this one). Carries
/// the cycle, the resolution and the policy.
pub(super) fn deadlock_error(d: &DeadlockRecord, what: &str) -> ApiError {
    let message = match d.requester {
        Some(r) if r != d.victim => format!(
            "the wait for {what} was cancelled to break a deadlock: policy {} picked lease {} as the victim, and lease {r}'s request proceeds",
            d.policy, d.victim
        ),
        _ => format!("waiting for {what} would deadlock"),
    };
    ApiError::new(ErrorCode::Deadlock, message)
        .with("cycle", serde_json::to_value(&d.cycle).unwrap_or_default())
        .with("resolution", d.resolution.clone())
        .with("policy", d.policy.as_str())
        .with("requester", d.requester)
}
