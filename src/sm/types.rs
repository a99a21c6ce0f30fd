//! Commands, responses and error codes of the replicated state machine.
//!
//! These types are part of the log format: they are stored on disk (JSON) and sent between
//! nodes (bincode). Evolve them only by adding enum variants and `#[serde(default)]` fields, so
//! old logs always replay (DESIGN rule 8). Never use `skip_serializing_if` or untagged enums
//! here: bincode needs every field on the wire.

use serde::{Deserialize, Serialize};

use super::{DeadlockPolicy, LockMode, WaitEdge};

/// One entry of the replicated log as the application sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Leader wall-clock time when the entry was proposed; the state machine clamps it so that
    /// time never goes backwards.
    pub time_ms: u64,
    /// Idempotency key: a retried request with the same id applies once.
    #[serde(default)]
    pub request_id: Option<String>,
    pub cmd: Command,
}

/// A guard on a KV write: the write applies only if `token` is the current holder's token of
/// `lock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fence {
    pub lock: String,
    pub token: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Proposed by the leader when a deadline is due and nothing else is written.
    Tick,
    LeaseGrant {
        ttl_ms: u64,
        owner: Option<String>,
    },
    LeaseKeepAlive {
        lease_id: u64,
    },
    LeaseRevoke {
        lease_id: u64,
    },
    KvPut {
        key: String,
        value: String,
        lease_id: Option<u64>,
        if_version: Option<u64>,
        if_absent: bool,
        fence: Option<Fence>,
    },
    KvDelete {
        key: String,
        if_version: Option<u64>,
    },
    /// `wait_ms` 0 is try-lock; otherwise the lease waits in the lock's FIFO queue until it is
    /// granted, its lease ends, or `time_ms + wait_ms` passes.
    LockAcquire {
        name: String,
        lease_id: u64,
        wait_ms: u64,
        #[serde(default)]
        mode: LockMode,
    },
    LockRelease {
        name: String,
        lease_id: u64,
    },
    /// A node id removed from the cluster; it may never be used again.
    RetireNode {
        node_id: u64,
    },
    /// Create a counting semaphore (idempotent with the same capacity).
    SemCreate {
        name: String,
        capacity: u64,
    },
    /// Take `permits` for `lease_id`; `wait_ms` 0 never queues. `priority` 0..=9.
    SemAcquire {
        name: String,
        lease_id: u64,
        permits: u64,
        wait_ms: u64,
        priority: u64,
    },
    /// Give back every permit `lease_id` holds on `name`.
    SemRelease {
        name: String,
        lease_id: u64,
    },
    /// Release `lock` (held exclusively) and park on condition `name` until notified, then
    /// queue for the lock again; `wait_ms` bounds the whole wait.
    CondWait {
        name: String,
        lease_id: u64,
        lock: String,
        wait_ms: u64,
    },
    /// Wake the first parked lease, or all of them.
    CondNotify {
        name: String,
        all: bool,
    },
    /// Arrive at barrier `name` and wait (up to `wait_ms`, at least 1) until `parties` leases
    /// have arrived in the current generation. `generation`, if given, names the generation the
    /// caller means to pass (resuming a wait whose answer was lost).
    BarrierWait {
        name: String,
        lease_id: u64,
        parties: u64,
        wait_ms: u64,
        #[serde(default)]
        generation: Option<u64>,
    },
    /// Enter double barrier `name`: wait (up to `wait_ms`) until `parties` leases are waiting to
    /// enter, then all enter together.
    DoubleBarrierEnter {
        name: String,
        lease_id: u64,
        parties: u64,
        wait_ms: u64,
        #[serde(default)]
        generation: Option<u64>,
    },
    /// Leave double barrier `name`: wait (up to `wait_ms`) until every lease that entered with
    /// this one has left (or died).
    DoubleBarrierLeave {
        name: String,
        lease_id: u64,
        #[serde(default)]
        parties: Option<u64>,
        wait_ms: u64,
    },
    /// Become leader of election `name` with `value`, or wait (FIFO) up to `wait_ms` (0: never
    /// wait) in its candidate line.
    ElectionCampaign {
        name: String,
        lease_id: u64,
        value: String,
        wait_ms: u64,
    },
    /// The leader replaces its value.
    ElectionProclaim {
        name: String,
        lease_id: u64,
        value: String,
    },
    /// The leader steps down (the next candidate takes over), or a candidate leaves the line.
    ElectionResign {
        name: String,
        lease_id: u64,
    },
    /// Add an item to work queue `name`; its id is this entry's index. `priority` 0..=9.
    QueuePush {
        name: String,
        item: String,
        priority: u64,
    },
    /// Take the next item for `lease_id`, or wait (FIFO) up to `wait_ms` (0: never wait).
    QueueClaim {
        name: String,
        lease_id: u64,
        wait_ms: u64,
    },
    /// The claimant is done with item `id`: it leaves the queue.
    QueueAck {
        name: String,
        lease_id: u64,
        id: u64,
    },
    /// The claimant gives item `id` back: it returns to its place in the queue.
    QueueNack {
        name: String,
        lease_id: u64,
        id: u64,
    },
    /// Who loses when a wait would close a cycle in the wait-for graph, from now on.
    SetDeadlockPolicy {
        policy: DeadlockPolicy,
    },
}

impl Command {
    /// Short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::Tick => "tick",
            Command::LeaseGrant { .. } => "lease_grant",
            Command::LeaseKeepAlive { .. } => "lease_keepalive",
            Command::LeaseRevoke { .. } => "lease_revoke",
            Command::KvPut { .. } => "kv_put",
            Command::KvDelete { .. } => "kv_delete",
            Command::LockAcquire { .. } => "lock_acquire",
            Command::LockRelease { .. } => "lock_release",
            Command::RetireNode { .. } => "retire_node",
            Command::SemCreate { .. } => "sem_create",
            Command::SemAcquire { .. } => "sem_acquire",
            Command::SemRelease { .. } => "sem_release",
            Command::CondWait { .. } => "cond_wait",
            Command::CondNotify { .. } => "cond_notify",
            Command::BarrierWait { .. } => "barrier_wait",
            Command::DoubleBarrierEnter { .. } => "double_barrier_enter",
            Command::DoubleBarrierLeave { .. } => "double_barrier_leave",
            Command::ElectionCampaign { .. } => "election_campaign",
            Command::ElectionProclaim { .. } => "election_proclaim",
            Command::ElectionResign { .. } => "election_resign",
            Command::QueuePush { .. } => "queue_push",
            Command::QueueClaim { .. } => "queue_claim",
            Command::QueueAck { .. } => "queue_ack",
            Command::QueueNack { .. } => "queue_nack",
            Command::SetDeadlockPolicy { .. } => "set_deadlock_policy",
        }
    }
}

/// Stable, machine-readable error codes. The HTTP mapping lives in `api/error.rs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidArgument,
    Unauthorized,
    Forbidden,
    NotFound,
    LeaseNotFound,
    Conflict,
    LockHeld,
    Timeout,
    Fenced,
    PreconditionFailed,
    PayloadTooLarge,
    NoLeader,
    Unavailable,
    Deadlock,
    /// A bounded resource (queue size, candidate or claimer line) is full.
    ResourceExhausted,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::LeaseNotFound => "lease_not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::LockHeld => "lock_held",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Fenced => "fenced",
            ErrorCode::PreconditionFailed => "precondition_failed",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::NoLeader => "no_leader",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Deadlock => "deadlock",
            ErrorCode::ResourceExhausted => "resource_exhausted",
        }
    }
}

/// A domain rejection: the entry applied, nothing changed, and this says why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    pub code: ErrorCode,
    pub message: String,
    /// Current version of the key, for `precondition_failed`.
    #[serde(default)]
    pub current_version: Option<u64>,
    /// Current holder's token, for `lock_held` and `fenced`.
    #[serde(default)]
    pub current_token: Option<u64>,
    /// The wait-for cycle, for `deadlock`.
    #[serde(default)]
    pub cycle: Vec<WaitEdge>,
}

impl Rejection {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Rejection {
            code,
            message: message.into(),
            current_version: None,
            current_token: None,
            cycle: Vec::new(),
        }
    }
}

/// The outcome of applying one command.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    #[default]
    Done,
    LeaseGranted {
        lease_id: u64,
        ttl_ms: u64,
    },
    LeaseKept {
        lease_id: u64,
        ttl_ms: u64,
    },
    LeaseRevoked {
        lease_id: u64,
    },
    KvPut {
        version: u64,
        revision: u64,
    },
    KvDeleted {
        deleted: bool,
        revision: u64,
    },
    LockGranted {
        token: u64,
    },
    /// The lease waits in the queue; `position` 1 is next in line.
    LockQueued {
        position: u64,
    },
    LockReleased {
        /// The lease the lock was handed to in the same step, if any.
        next_holder: Option<u64>,
    },
    SemCreated {
        capacity: u64,
        created: bool,
    },
    SemGranted {
        token: u64,
    },
    SemQueued {
        position: u64,
    },
    SemReleased {
        /// Leases granted permits in the same step, in grant order.
        granted: Vec<u64>,
    },
    /// `leader` leads the election since `since_ms` with `value`; `token` is the index of the
    /// entry that elected it.
    Elected {
        leader: u64,
        value: String,
        token: u64,
        since_ms: u64,
    },
    /// The lease waits in the candidate line; `position` 1 is next.
    ElectionQueued {
        position: u64,
    },
    Proclaimed {
        token: u64,
    },
    Resigned {
        /// false: a candidate left the line.
        was_leader: bool,
        /// The candidate elected in the same step, and its token.
        next_leader: Option<u64>,
        token: Option<u64>,
    },
    QueuePushed {
        id: u64,
        /// The waiting claimer it was handed to in the same step.
        claimed_by: Option<u64>,
    },
    QueueClaimed {
        id: u64,
        item: String,
        priority: u64,
        pushed_ms: u64,
        /// How many times it has been claimed, this time included.
        claims: u64,
        /// Index of the entry that handed it out.
        token: u64,
    },
    /// The claimer waits in line (`position` 1 is next); `ticket` names the wait: the item
    /// handed to it carries the same ticket.
    QueueWaiting {
        position: u64,
        ticket: u64,
    },
    QueueAcked {
        id: u64,
    },
    QueueReturned {
        id: u64,
        /// The waiting claimer it was handed to in the same step.
        claimed_by: Option<u64>,
    },
    Rejected(Rejection),
    /// Parked on the condition; `released_token` is the token of the hold given up (0 when a
    /// retried wait resumed the parked one).
    CondWaiting {
        deadline_ms: u64,
        released_token: u64,
    },
    CondNotified {
        /// Leases moved back to their locks, in order.
        woken: Vec<u64>,
    },
    /// The lease waits at the barrier in `generation`; `arrived` leases (this one included)
    /// of `parties` are there.
    BarrierWaiting {
        generation: u64,
        arrived: u64,
        parties: u64,
    },
    /// `generation` was released with the lease in it; `token` is the log index of the
    /// releasing entry (the same for every party of the generation).
    BarrierReleased {
        generation: u64,
        parties: u64,
        token: u64,
    },
    /// The lease waits to enter the double barrier in `generation`.
    DoubleBarrierEntering {
        generation: u64,
        arrived: u64,
        parties: u64,
    },
    /// The lease entered `generation`; `token` is the log index of the admitting entry.
    DoubleBarrierEntered {
        generation: u64,
        parties: u64,
        token: u64,
    },
    /// The lease left and waits for `remaining` leases still inside.
    DoubleBarrierLeaving {
        generation: u64,
        remaining: u64,
        parties: u64,
    },
    /// Everyone who entered `generation` has left; `token` is the log index of the releasing
    /// entry.
    DoubleBarrierLeft {
        generation: u64,
        parties: u64,
        token: u64,
    },
    DeadlockPolicySet {
        policy: DeadlockPolicy,
        previous: DeadlockPolicy,
    },
}

impl Response {
    pub fn reject(code: ErrorCode, message: impl Into<String>) -> Response {
        Response::Rejected(Rejection::new(code, message))
    }
}

impl std::fmt::Display for LogEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.cmd.kind(), self.time_ms)
    }
}

impl std::fmt::Display for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}
