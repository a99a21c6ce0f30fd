//! Counting semaphores with a fair, priority-aware wait queue.
//!
//! Queue order is by *virtual arrival*: `since_ms - priority * AGING_MS`, then arrival order.
//! A priority is a head start that never changes, which is the same as every waiter aging by one
//! priority level per `AGING_MS` while it waits: a waiter of priority `p` can only be passed by
//! waiters that arrive less than `(MAX_PRIORITY - p) * AGING_MS` after it, so it is served in
//! bounded time. Grants go strictly from the head of the queue: a waiter that needs more permits
//! than are free blocks the ones behind it (no barging), so large requests do not starve either.
//! A new request that would sort first (an empty queue, or a priority head start past the
//! current head) is the head, and is granted at once if it fits.
//!
//! Invariants: permits held never exceed capacity; a non-empty queue's head does not fit in the
//! free permits (otherwise it would have been granted in the same step); every holder and waiter
//! lease is alive.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{lease_not_found, ErrorCode, Rejection, Response, Sm, MAX_WAIT_MS};

/// Highest priority; 0 is the lowest and the default.
pub const MAX_PRIORITY: u64 = 9;
/// A waiter gains one priority level per this much waiting.
pub const AGING_MS: u64 = 1_000;
/// Largest capacity.
pub const MAX_CAPACITY: u64 = 1_000_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SemHolder {
    pub permits: u64,
    /// Log index of the granting entry.
    pub token: u64,
    pub since_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SemWaiter {
    pub lease_id: u64,
    pub permits: u64,
    pub priority: u64,
    pub since_ms: u64,
    pub deadline_ms: u64,
    /// Index of the entry that queued it (breaks ties in arrival order).
    pub seq: u64,
}

impl SemWaiter {
    fn key(&self) -> (i128, u64) {
        (
            self.since_ms as i128 - (self.priority * AGING_MS) as i128,
            self.seq,
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Semaphore {
    pub capacity: u64,
    pub holders: BTreeMap<u64, SemHolder>,
    /// Sorted by virtual arrival (see the module docs).
    pub queue: Vec<SemWaiter>,
}

impl Semaphore {
    pub fn used(&self) -> u64 {
        self.holders.values().map(|h| h.permits).sum()
    }

    pub fn free(&self) -> u64 {
        self.capacity.saturating_sub(self.used())
    }
}

impl Sm {
    pub(super) fn sem_create(&mut self, name: &str, capacity: u64) -> Response {
        if name.is_empty() {
            return Response::reject(
                ErrorCode::InvalidArgument,
                "semaphore name must not be empty",
            );
        }
        if capacity == 0 || capacity > MAX_CAPACITY {
            return Response::reject(
                ErrorCode::InvalidArgument,
                format!("capacity must be 1 to {MAX_CAPACITY}, got {capacity}"),
            );
        }
        match self.semaphores.get(name) {
            Some(s) if s.capacity == capacity => Response::SemCreated {
                capacity,
                created: false,
            },
            Some(s) => Response::reject(
                ErrorCode::Conflict,
                format!("semaphore {name} exists with capacity {}", s.capacity),
            ),
            None => {
                self.emit(
                    "semaphore",
                    name,
                    "created",
                    serde_json::json!({"capacity": capacity}),
                );
                self.semaphores.insert(
                    name.to_string(),
                    Semaphore {
                        capacity,
                        holders: BTreeMap::new(),
                        queue: Vec::new(),
                    },
                );
                Response::SemCreated {
                    capacity,
                    created: true,
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn sem_acquire(
        &mut self,
        index: u64,
        now: u64,
        name: &str,
        lease_id: u64,
        permits: u64,
        wait_ms: u64,
        priority: u64,
    ) -> Response {
        let Some(sem) = self.semaphores.get_mut(name) else {
            return Response::reject(
                ErrorCode::NotFound,
                format!("semaphore {name} does not exist"),
            );
        };
        if permits == 0 || permits > sem.capacity {
            return Response::reject(
                ErrorCode::InvalidArgument,
                format!(
                    "permits must be 1 to the capacity {}, got {permits}",
                    sem.capacity
                ),
            );
        }
        if priority > MAX_PRIORITY {
            return Response::reject(
                ErrorCode::InvalidArgument,
                format!("priority must be 0 to {MAX_PRIORITY}"),
            );
        }
        if wait_ms > MAX_WAIT_MS {
            return Response::reject(
                ErrorCode::InvalidArgument,
                format!("wait_ms must be at most {MAX_WAIT_MS}"),
            );
        }
        let Some(lease) = self.leases.get_mut(&lease_id) else {
            return lease_not_found(lease_id);
        };
        if let Some(h) = sem.holders.get(&lease_id) {
            // One hold per lease and semaphore: asking again for the same count is idempotent.
            return if h.permits == permits {
                Response::SemGranted { token: h.token }
            } else {
                Response::reject(
                    ErrorCode::Conflict,
                    format!(
                        "lease {lease_id} already holds {} permits of {name}",
                        h.permits
                    ),
                )
            };
        }
        if let Some(pos) = sem.queue.iter().position(|w| w.lease_id == lease_id) {
            return Response::SemQueued {
                position: pos as u64 + 1,
            };
        }
        let w = SemWaiter {
            lease_id,
            permits,
            priority,
            since_ms: now,
            deadline_ms: now + wait_ms,
            seq: index,
        };
        let pos = sem.queue.partition_point(|x| x.key() < w.key());
        // Ahead of every waiter (the queue is empty, or its priority is a head start past the
        // current head): it is the head, and a head that fits is granted at once.
        if pos == 0 && permits <= sem.free() {
            sem.holders.insert(
                lease_id,
                SemHolder {
                    permits,
                    token: index,
                    since_ms: now,
                },
            );
            lease.sems.insert(name.to_string());
            // The waiters behind may now wait for this lease; if it waits elsewhere itself,
            // that can close a cycle: then the policy cancels other waits of the cycle, or the
            // grant is undone and refused.
            if let Some(cycle) = self.break_cycles(index, lease_id, priority) {
                self.sem_drop_holder(name, lease_id);
                return self.deadlock(index, lease_id, &format!("semaphore:{name}"), cycle);
            }
            self.emit(
                "semaphore",
                name,
                "granted",
                serde_json::json!({"lease_id": lease_id, "permits": permits, "token": index}),
            );
            return Response::SemGranted { token: index };
        }
        if wait_ms == 0 {
            return Response::Rejected(Rejection::new(
                ErrorCode::LockHeld,
                format!(
                    "{} of {} permits of {name} are free",
                    sem.free(),
                    sem.capacity
                ),
            ));
        }
        self.sem_wait_expiry
            .insert((w.deadline_ms, name.to_string(), lease_id));
        sem.queue.insert(pos, w);
        lease.sem_waiting.insert(name.to_string());
        // A wait that closes a cycle in the wait-for graph: the policy cancels other waits of
        // the cycle, or the request is refused with nothing applied (the waiter did not fit,
        // so removing it unblocks nobody).
        if let Some(cycle) = self.break_cycles(index, lease_id, priority) {
            self.sem_unqueue(name, lease_id);
            return self.deadlock(index, lease_id, &format!("semaphore:{name}"), cycle);
        }
        self.sem_wait_outcome(name, lease_id, permits)
    }

    /// The answer to an acquire that queued: still queued (emitted), or granted by the
    /// hand-off after a deadlock victim ahead of it left the queue.
    fn sem_wait_outcome(&mut self, name: &str, lease_id: u64, permits: u64) -> Response {
        let sem = self.semaphores.get(name);
        if let Some(h) = sem.and_then(|s| s.holders.get(&lease_id)) {
            return Response::SemGranted { token: h.token };
        }
        let pos = sem.and_then(|s| s.queue.iter().position(|w| w.lease_id == lease_id));
        let position = pos.map_or(0, |p| p as u64 + 1);
        self.emit(
            "semaphore",
            name,
            "queued",
            serde_json::json!({"lease_id": lease_id, "permits": permits, "position": position}),
        );
        Response::SemQueued { position }
    }

    pub(super) fn sem_release(&mut self, index: u64, name: &str, lease_id: u64) -> Response {
        if !self.leases.contains_key(&lease_id) {
            return lease_not_found(lease_id);
        }
        let held = self
            .semaphores
            .get(name)
            .is_some_and(|s| s.holders.contains_key(&lease_id));
        if !held {
            return Response::reject(
                ErrorCode::Conflict,
                format!("lease {lease_id} holds no permits of {name}"),
            );
        }
        self.sem_drop_holder(name, lease_id);
        self.emit(
            "semaphore",
            name,
            "released",
            serde_json::json!({"lease_id": lease_id}),
        );
        let granted = self.sem_hand_off(index, name);
        Response::SemReleased { granted }
    }

    pub(super) fn sem_drop_holder(&mut self, name: &str, lease_id: u64) {
        if let Some(s) = self.semaphores.get_mut(name) {
            s.holders.remove(&lease_id);
        }
        if let Some(l) = self.leases.get_mut(&lease_id) {
            l.sems.remove(name);
        }
    }

    /// Take `lease_id` out of `name`'s queue (deadline passed, or the lease ends).
    pub(super) fn sem_unqueue(&mut self, name: &str, lease_id: u64) {
        if let Some(s) = self.semaphores.get_mut(name) {
            if let Some(pos) = s.queue.iter().position(|w| w.lease_id == lease_id) {
                let w = s.queue.remove(pos);
                self.sem_wait_expiry
                    .remove(&(w.deadline_ms, name.to_string(), lease_id));
            }
        }
        if let Some(l) = self.leases.get_mut(&lease_id) {
            l.sem_waiting.remove(name);
        }
    }

    /// End `lease_id`'s wait on `name` (`wait_expired`: its deadline passed; `wait_cancelled`:
    /// a deadlock victim), emitting `action`, and grant the ones it blocked. The event is what
    /// wakes the blocked acquire (`SmShared::subscribe_lease`).
    pub(super) fn end_sem_wait(&mut self, index: u64, name: &str, lease_id: u64, action: &str) {
        self.sem_unqueue(name, lease_id);
        self.emit(
            "semaphore",
            name,
            action,
            serde_json::json!({"lease_id": lease_id}),
        );
        // The head may have been the one that did not fit.
        self.sem_hand_off(index, name);
    }

    /// Grant from the head of the queue while the head fits. Returns the leases granted.
    pub(super) fn sem_hand_off(&mut self, index: u64, name: &str) -> Vec<u64> {
        let now = self.time_ms;
        let mut granted = Vec::new();
        while let Some(sem) = self.semaphores.get_mut(name) {
            let Some(head) = sem.queue.first() else {
                break;
            };
            if head.permits > sem.free() {
                break;
            }
            let w = sem.queue.remove(0);
            self.sem_wait_expiry
                .remove(&(w.deadline_ms, name.to_string(), w.lease_id));
            // Waiters of ended leases are removed when the lease ends; never grant a dead one.
            let Some(lease) = self.leases.get_mut(&w.lease_id) else {
                continue;
            };
            lease.sem_waiting.remove(name);
            lease.sems.insert(name.to_string());
            sem.holders.insert(
                w.lease_id,
                SemHolder {
                    permits: w.permits,
                    token: index,
                    since_ms: now,
                },
            );
            granted.push(w.lease_id);
        }
        let holders = self.semaphores.get(name).map(|s| s.holders.clone());
        for id in &granted {
            let permits = holders
                .as_ref()
                .and_then(|h| h.get(id))
                .map_or(0, |h| h.permits);
            self.emit(
                "semaphore",
                name,
                "granted",
                serde_json::json!({"lease_id": id, "permits": permits, "token": index}),
            );
        }
        granted
    }
}
