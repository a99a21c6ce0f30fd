//! The pure, deterministic coordination state machine.
//!
//! `Sm::apply` is a function of the previous state and one log entry: no IO, no clock, no
//! randomness, no `HashMap` iteration. Time comes from the entry (`time_ms`, stamped by the
//! leader, clamped here so it never goes backwards). Invariants kept by every apply:
//!
//! - a lock has one exclusive holder or any number of shared ones; a lock nobody holds has an
//!   empty queue, and the head of a queue never fits the current holders;
//! - the wait-for graph over locks and semaphores has no cycle (`deadlock.rs`);
//! - every waiter's lease exists (waiters of an ending lease are removed in the same step that
//!   ends it, before any hand-off; a lease is dead from the instant it is due, even while
//!   waits due at that instant end), so a dead lease is never granted anything;
//! - a lock's tokens strictly increase: a token is the log index of the granting entry;
//! - the expiry indexes hold exactly the live leases and waiters.

mod barrier;
mod condition;
mod cow;
mod deadlock;
mod dedup;
mod double_barrier;
mod election;
mod events;
mod kv;
mod lease;
mod lock;
mod parts;
mod queue;
mod semaphore;
mod types;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

pub use cow::CowMap;
use dedup::RequestIds;

pub use barrier::{Barrier, BarrierPass, BarrierRelease, BarrierWaiter, MAX_PARTIES};
pub use condition::{CondWaiter, Condition};
pub use deadlock::{DeadlockPolicy, DeadlockRecord, WaitEdge, RECENT_DEADLOCKS};
pub use double_barrier::{DoubleBarrier, DoubleBarrierMember, DoubleBarrierPass};
pub use election::{Candidate, Election, ElectionLeader, MAX_CANDIDATES, MAX_ELECTION_VALUE};
pub use events::{Event, EventBuf};
pub use kv::KvEntry;
pub use lease::{Lease, MAX_TTL_MS, MIN_TTL_MS};
pub use lock::{Holder, Lock, LockMode, Waiter};
pub use parts::{Kind, Timer};
pub use queue::{
    QueueClaim, QueueItem, QueueWaiter, WorkQueue, MAX_ITEM_LEN, MAX_QUEUE_BYTES, MAX_QUEUE_ITEMS,
    MAX_QUEUE_WAITERS,
};
pub use semaphore::{SemHolder, SemWaiter, Semaphore, AGING_MS, MAX_CAPACITY, MAX_PRIORITY};
pub use types::*;

/// How long an idempotency key is remembered, in log time.
pub const DEDUP_RETENTION_MS: u64 = 5 * 60 * 1000;
/// At most this many idempotency keys are remembered: the oldest go first. Without a bound the
/// table held every id of the last five minutes: at 5 000 writes/s, 1.5 million, hundreds of MB
/// in memory and in every snapshot. At that rate the bound keeps 40 s, well over a client's
/// retries (the Rust client retries for 15 s).
pub const DEDUP_MAX_IDS: usize = 200_000;
/// On the first entry of every new leader term, every lease gets at least this much time
/// left (before expiry runs), so keepalives that could not be written during an election do
/// not end sessions. A TTL is therefore a lower bound: it can stretch by at most this plus the
/// election time, once per leader change.
pub const LEADER_GRACE_MS: u64 = 2_000;
/// Longest a lock waiter may wait.
pub const MAX_WAIT_MS: u64 = 60 * 60 * 1000;

/// The whole replicated coordination state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sm {
    /// Log time of the last applied entry (monotonic).
    pub time_ms: u64,
    /// Index of the last applied entry.
    pub index: u64,
    /// Leader term of the last applied normal entry.
    #[serde(default)]
    pub term: u64,
    pub leases: BTreeMap<u64, Lease>,
    /// (deadline_ms, lease_id) of every live lease.
    lease_expiry: BTreeSet<(u64, u64)>,
    /// Copy-on-write (`cow.rs`): while a snapshot shares a chunk, the first write to it copies
    /// the chunk's entries, values included. (Entries behind an `Arc` made that a copy of
    /// reference counts, but a node restarted with 100 000 keys held 305-310 MB instead of
    /// 262-297: docs/benchmarks.md.)
    pub kv: CowMap<String, KvEntry>,
    pub locks: BTreeMap<String, Lock>,
    /// (deadline_ms, lock, lease_id) of every waiter.
    wait_expiry: BTreeSet<(u64, String, u64)>,
    /// Answered request ids (`dedup.rs`).
    dedup: RequestIds,
    /// Node ids removed from the cluster: never reused.
    #[serde(default)]
    pub retired_nodes: BTreeSet<u64>,
    #[serde(default)]
    pub semaphores: BTreeMap<String, Semaphore>,
    /// (deadline_ms, semaphore, lease_id) of every semaphore waiter.
    #[serde(default)]
    sem_wait_expiry: BTreeSet<(u64, String, u64)>,
    /// Wait deadlines of barriers, elections, queues and conditions (see `parts.rs`).
    #[serde(default)]
    timers: BTreeSet<(u64, Timer)>,
    /// Recently resolved deadlocks, oldest first (at most `RECENT_DEADLOCKS`).
    #[serde(default)]
    pub deadlocks: VecDeque<DeadlockRecord>,
    /// Who loses when a step would close a cycle (`deadlock.rs`); `refuse` in old snapshots.
    #[serde(default)]
    pub deadlock_policy: DeadlockPolicy,
    #[serde(default)]
    pub conditions: BTreeMap<String, Condition>,
    #[serde(default)]
    pub barriers: BTreeMap<String, Barrier>,
    #[serde(default)]
    pub double_barriers: BTreeMap<String, DoubleBarrier>,
    #[serde(default)]
    pub elections: BTreeMap<String, Election>,
    #[serde(default)]
    pub queues: BTreeMap<String, WorkQueue>,
    /// Changes made by the entries applied since the storage layer last drained them.
    #[serde(skip)]
    events: EventBuf,
}

impl Sm {
    pub fn new() -> Sm {
        Sm::default()
    }

    /// Apply one normal log entry at `index`, proposed by the leader of `term`.
    pub fn apply(&mut self, index: u64, term: u64, entry: &LogEntry) -> Response {
        let now = entry.time_ms.max(self.time_ms);
        self.time_ms = now;
        self.index = index;
        // The first entry of a new leader carries the grace; it must run before expiry, or
        // leases whose deadline passed during the election would die in this very entry.
        if term > self.term {
            self.term = term;
            self.lease_grace(now, LEADER_GRACE_MS);
        }
        self.expire(now, index);
        self.dedup.forget(now, DEDUP_RETENTION_MS, usize::MAX);
        if let Some(id) = &entry.request_id {
            if let Some(d) = self.dedup.get(id) {
                return d.response.clone();
            }
        }
        let response = self.dispatch(index, now, &entry.cmd);
        if let Some(id) = &entry.request_id {
            self.dedup
                .forget(now, DEDUP_RETENTION_MS, DEDUP_MAX_IDS - 1);
            self.dedup.insert(id, now, response.clone());
        }
        response
    }

    /// A non-normal entry (blank, membership) still advances the index.
    pub fn apply_other(&mut self, index: u64) {
        self.index = index;
    }

    fn dispatch(&mut self, index: u64, now: u64, cmd: &Command) -> Response {
        match cmd {
            Command::Tick => Response::Done,
            Command::LeaseGrant { ttl_ms, owner } => {
                self.lease_grant(index, now, *ttl_ms, owner.clone())
            }
            Command::LeaseKeepAlive { lease_id } => self.lease_keepalive(now, *lease_id),
            Command::LeaseRevoke { lease_id } => match self.leases.contains_key(lease_id) {
                true => {
                    self.end_lease(index, *lease_id, "revoked");
                    Response::LeaseRevoked {
                        lease_id: *lease_id,
                    }
                }
                false => lease_not_found(*lease_id),
            },
            Command::KvPut {
                key,
                value,
                lease_id,
                if_version,
                if_absent,
                fence,
            } => self.kv_put(
                index,
                key,
                value,
                *lease_id,
                *if_version,
                *if_absent,
                fence.as_ref(),
            ),
            Command::KvDelete { key, if_version } => self.kv_delete(index, key, *if_version),
            Command::LockAcquire {
                name,
                lease_id,
                wait_ms,
                mode,
            } => self.lock_acquire(index, now, name, *lease_id, *wait_ms, *mode),
            Command::LockRelease { name, lease_id } => self.lock_release(index, name, *lease_id),
            Command::SemCreate { name, capacity } => self.sem_create(name, *capacity),
            Command::SemAcquire {
                name,
                lease_id,
                permits,
                wait_ms,
                priority,
            } => self.sem_acquire(index, now, name, *lease_id, *permits, *wait_ms, *priority),
            Command::SemRelease { name, lease_id } => self.sem_release(index, name, *lease_id),
            Command::CondWait {
                name,
                lease_id,
                lock,
                wait_ms,
            } => self.cond_wait(index, now, name, *lease_id, lock, *wait_ms),
            Command::CondNotify { name, all } => self.cond_notify(index, name, *all),
            Command::BarrierWait {
                name,
                lease_id,
                parties,
                wait_ms,
                generation,
            } => self.barrier_wait(index, now, name, *lease_id, *parties, *wait_ms, *generation),
            Command::DoubleBarrierEnter {
                name,
                lease_id,
                parties,
                wait_ms,
                generation,
            } => self.double_barrier_enter(
                index,
                now,
                name,
                *lease_id,
                *parties,
                *wait_ms,
                *generation,
            ),
            Command::DoubleBarrierLeave {
                name,
                lease_id,
                parties,
                wait_ms,
            } => self.double_barrier_leave(index, now, name, *lease_id, *parties, *wait_ms),
            Command::RetireNode { node_id } => {
                self.retired_nodes.insert(*node_id);
                Response::Done
            }
            Command::ElectionCampaign {
                name,
                lease_id,
                value,
                wait_ms,
            } => self.election_campaign(index, now, name, *lease_id, value, *wait_ms),
            Command::ElectionProclaim {
                name,
                lease_id,
                value,
            } => self.election_proclaim(name, *lease_id, value),
            Command::ElectionResign { name, lease_id } => {
                self.election_resign(index, name, *lease_id)
            }
            Command::QueuePush {
                name,
                item,
                priority,
            } => self.queue_push(index, now, name, item, *priority),
            Command::QueueClaim {
                name,
                lease_id,
                wait_ms,
            } => self.queue_claim(index, now, name, *lease_id, *wait_ms),
            Command::QueueAck { name, lease_id, id } => self.queue_ack(name, *lease_id, *id),
            Command::QueueNack { name, lease_id, id } => {
                self.queue_nack(index, name, *lease_id, *id)
            }
            Command::SetDeadlockPolicy { policy } => self.set_deadlock_policy(*policy),
        }
    }

    /// End every lease and waiter whose deadline is at or before `now`, in deadline order.
    /// Everything due at the same instant happens at once: the leases due then are dead first
    /// (so none of them is handed anything), then the waits due then end (so none of those
    /// waiters is handed what the leases release), and last the leases release what they held.
    fn expire(&mut self, now: u64, index: u64) {
        while let Some(d) = self.next_deadline().filter(|d| *d <= now) {
            let due: Vec<u64> = (self.lease_expiry.range((d, 0)..=(d, u64::MAX)))
                .map(|e| e.1)
                .collect();
            let ended = self.take_leases(&due, "expired");
            self.end_waits_due(index, d);
            self.release_leases(index, ended, "expired");
        }
    }

    /// End the waits due at `d` (the earliest deadline): lock waits, then semaphore waits,
    /// then the other primitives' timers, each handing on what it blocked.
    fn end_waits_due(&mut self, index: u64, d: u64) {
        loop {
            if let Some((_, name, lease_id)) = self.wait_expiry.first().filter(|e| e.0 == d) {
                let (name, lease_id) = (name.clone(), *lease_id);
                self.remove_waiter(index, &name, lease_id);
            } else if let Some((_, name, lease_id)) =
                self.sem_wait_expiry.first().filter(|e| e.0 == d)
            {
                let (name, lease_id) = (name.clone(), *lease_id);
                self.end_sem_wait(index, &name, lease_id, "wait_expired");
            } else if self.timers.first().is_some_and(|e| e.0 == d) {
                if let Some((_, t)) = self.timers.pop_first() {
                    self.timer_fired(index, &t);
                }
            } else {
                return;
            }
        }
    }

    /// The earliest lease or wait deadline, if any: the leader proposes a `Tick` once it passes.
    pub fn next_deadline(&self) -> Option<u64> {
        let a = self.lease_expiry.first().map(|e| e.0);
        let b = self.wait_expiry.first().map(|e| e.0);
        let c = self.sem_wait_expiry.first().map(|e| e.0);
        let d = self.timers.first().map(|e| e.0);
        [a, b, c, d].into_iter().flatten().min()
    }

    /// Check the structural invariants; used by tests after every apply.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut lease_expiry = BTreeSet::new();
        for (id, l) in &self.leases {
            lease_expiry.insert((l.deadline_ms, *id));
            for name in &l.locks {
                if self
                    .locks
                    .get(name)
                    .is_none_or(|k| k.hold_of(*id).is_none())
                {
                    return Err(format!("lease {id} claims lock {name} it does not hold"));
                }
            }
            for key in &l.keys {
                if self.kv.get(key).and_then(|e| e.lease_id) != Some(*id) {
                    return Err(format!("lease {id} claims key {key} not bound to it"));
                }
            }
        }
        if lease_expiry != self.lease_expiry {
            return Err("lease expiry index out of sync".into());
        }
        let mut wait_expiry = BTreeSet::new();
        for (name, lock) in &self.locks {
            if lock.is_free() {
                return Err(format!("lock {name} kept with no holder"));
            }
            if lock.holder.is_some() && !lock.shared.is_empty() {
                return Err(format!("lock {name} held exclusive and shared at once"));
            }
            for (id, h) in &lock.shared {
                if h.lease_id != *id {
                    return Err(format!(
                        "shared hold of {name} by {id} names {}",
                        h.lease_id
                    ));
                }
            }
            for (_, h) in lock.holders() {
                match self.leases.get(&h.lease_id) {
                    Some(l) if l.locks.contains(name) => {}
                    _ => return Err(format!("lock {name} held by dead lease {}", h.lease_id)),
                }
            }
            if let Some(head) = lock.queue.front() {
                let blocked = match head.mode {
                    LockMode::Exclusive => !lock.is_free(),
                    LockMode::Shared => lock.holder.is_some(),
                };
                if !blocked {
                    return Err(format!("lock {name}: head waiter fits but was not granted"));
                }
            }
            let mut seen = BTreeSet::new();
            let mut writer_ahead = lock.holder.is_some();
            for w in &lock.queue {
                if !seen.insert(w.lease_id) {
                    return Err(format!("lease {} queued twice on {name}", w.lease_id));
                }
                match self.leases.get(&w.lease_id) {
                    Some(l) if l.waiting.contains(name) => {}
                    _ => return Err(format!("dead lease {} waits on {name}", w.lease_id)),
                }
                if lock.hold_of(w.lease_id).is_some() {
                    return Err(format!("holder of {name} also queued"));
                }
                if w.mode == LockMode::Shared && !writer_ahead {
                    return Err(format!(
                        "reader {} waits on {name} with no writer ahead of it",
                        w.lease_id
                    ));
                }
                writer_ahead |= w.mode == LockMode::Exclusive;
                wait_expiry.insert((w.deadline_ms, name.clone(), w.lease_id));
            }
        }
        if wait_expiry != self.wait_expiry {
            return Err("wait expiry index out of sync".into());
        }
        self.check_no_cycles()?;
        let mut sem_wait_expiry = BTreeSet::new();
        for (name, sem) in &self.semaphores {
            if sem.used() > sem.capacity {
                return Err(format!("semaphore {name} over capacity"));
            }
            if let Some(head) = sem.queue.first() {
                if head.permits <= sem.free() {
                    return Err(format!(
                        "semaphore {name}: head waiter fits but was not granted"
                    ));
                }
            }
            for id in sem.holders.keys() {
                match self.leases.get(id) {
                    Some(l) if l.sems.contains(name) => {}
                    _ => return Err(format!("semaphore {name} held by dead lease {id}")),
                }
            }
            for w in &sem.queue {
                match self.leases.get(&w.lease_id) {
                    Some(l) if l.sem_waiting.contains(name) => {}
                    _ => {
                        return Err(format!(
                            "dead lease {} waits on semaphore {name}",
                            w.lease_id
                        ))
                    }
                }
                sem_wait_expiry.insert((w.deadline_ms, name.clone(), w.lease_id));
            }
        }
        if sem_wait_expiry != self.sem_wait_expiry {
            return Err("semaphore wait index out of sync".into());
        }
        for (id, l) in &self.leases {
            for name in &l.sems {
                if !self
                    .semaphores
                    .get(name)
                    .is_some_and(|s| s.holders.contains_key(id))
                {
                    return Err(format!(
                        "lease {id} claims permits of {name} it does not hold"
                    ));
                }
            }
        }
        self.check_parts()?;
        for (key, e) in &self.kv {
            if let Some(id) = e.lease_id {
                match self.leases.get(&id) {
                    Some(l) if l.keys.contains(key) => {}
                    _ => return Err(format!("key {key} bound to dead lease {id}")),
                }
            }
        }
        Ok(())
    }
}

fn lease_not_found(lease_id: u64) -> Response {
    Response::reject(
        ErrorCode::LeaseNotFound,
        format!("lease {lease_id} does not exist or has expired"),
    )
}

#[cfg(test)]
mod all_tests;
#[cfg(test)]
mod barrier_tests;
#[cfg(test)]
mod condition_tests;
#[cfg(test)]
mod deadlock_tests;
#[cfg(test)]
mod election_tests;
#[cfg(test)]
mod harness;
#[cfg(test)]
mod queue_tests;
#[cfg(test)]
mod rwlock_tests;
#[cfg(test)]
mod semaphore_tests;
#[cfg(test)]
mod tests;
