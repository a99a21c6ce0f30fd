//! Condition variables over the exclusive locks.
//!
//! `CondWait` by a lease that holds `lock` exclusively releases the lock (handing it to the
//! next waiter) and parks the lease on the condition, in one step. `CondNotify` moves the
//! first parked lease (or all of them, in order) back into the lock's wait queue, where it
//! competes like any other waiter (or takes the lock at once if it is free and nobody waits);
//! its new grant has a new token. The whole wait, parked and re-queued, is bounded by the
//! `wait_ms` of `CondWait`: the deadline carries over to the lock queue. A parked lease that
//! times out or ends just leaves. Re-queueing goes through the deadlock check like any wait
//! (it is a lock acquire by the notified lease): when the re-queue would close a cycle and the
//! deadlock policy picks the notified lease (always, under `refuse`), its wait is dropped and
//! the refusal recorded; when the policy picks another lease of the cycle, that lease's wait is
//! cancelled instead and the re-queue stands.

use serde::{Deserialize, Serialize};

use super::{lease_not_found, ErrorCode, Kind, LockMode, Response, Sm, MAX_WAIT_MS};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CondWaiter {
    pub lease_id: u64,
    /// The lock to take again when notified.
    pub lock: String,
    pub since_ms: u64,
    pub deadline_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Condition {
    /// Parked leases, in arrival order.
    pub waiters: Vec<CondWaiter>,
}

impl Sm {
    pub(super) fn cond_wait(
        &mut self,
        index: u64,
        now: u64,
        name: &str,
        lease_id: u64,
        lock: &str,
        wait_ms: u64,
    ) -> Response {
        if name.is_empty() || lock.is_empty() {
            return Response::reject(
                ErrorCode::InvalidArgument,
                "condition and lock names must not be empty",
            );
        }
        if wait_ms == 0 || wait_ms > MAX_WAIT_MS {
            return Response::reject(
                ErrorCode::InvalidArgument,
                format!("wait_ms must be 1 to {MAX_WAIT_MS}"),
            );
        }
        if !self.leases.contains_key(&lease_id) {
            return lease_not_found(lease_id);
        }
        if let Some(w) = self
            .conditions
            .get(name)
            .and_then(|c| c.waiters.iter().find(|w| w.lease_id == lease_id))
        {
            // A retried wait resumes the parked one.
            return Response::CondWaiting {
                deadline_ms: w.deadline_ms,
                released_token: 0,
            };
        }
        let hold = self.locks.get(lock).and_then(|l| l.hold_of(lease_id));
        let token = match hold {
            Some((LockMode::Exclusive, h)) => h.token,
            _ => {
                return Response::reject(
                    ErrorCode::Conflict,
                    format!("lease {lease_id} must hold lock {lock} exclusively to wait on condition {name}"),
                )
            }
        };
        self.release_lock(index, lock, lease_id);
        let deadline_ms = now + wait_ms;
        self.conditions
            .entry(name.to_string())
            .or_default()
            .waiters
            .push(CondWaiter {
                lease_id,
                lock: lock.to_string(),
                since_ms: now,
                deadline_ms,
            });
        self.add_timer(deadline_ms, Kind::Condition, name, lease_id);
        self.join_part(lease_id, Kind::Condition, name);
        self.emit(
            "condition",
            name,
            "waiting",
            serde_json::json!({"lease_id": lease_id, "lock": lock}),
        );
        Response::CondWaiting {
            deadline_ms,
            released_token: token,
        }
    }

    pub(super) fn cond_notify(&mut self, index: u64, name: &str, all: bool) -> Response {
        if name.is_empty() {
            return Response::reject(
                ErrorCode::InvalidArgument,
                "condition name must not be empty",
            );
        }
        let mut woken = Vec::new();
        while let Some(w) = self.cond_pop(name) {
            self.remove_timer(w.deadline_ms, Kind::Condition, name, w.lease_id);
            self.leave_part(w.lease_id, Kind::Condition, name);
            self.emit(
                "condition",
                name,
                "notified",
                serde_json::json!({"lease_id": w.lease_id, "lock": w.lock}),
            );
            let wait_ms = w.deadline_ms.saturating_sub(self.time_ms).max(1);
            // Re-queue for the lock (or take it at once); a refusal (deadlock, the policy
            // picked this lease) drops the wait.
            self.lock_acquire(
                index,
                self.time_ms,
                &w.lock,
                w.lease_id,
                wait_ms,
                LockMode::Exclusive,
            );
            woken.push(w.lease_id);
            if !all {
                break;
            }
        }
        Response::CondNotified { woken }
    }

    fn cond_pop(&mut self, name: &str) -> Option<CondWaiter> {
        let c = self.conditions.get_mut(name)?;
        let w = if c.waiters.is_empty() {
            None
        } else {
            Some(c.waiters.remove(0))
        };
        if c.waiters.is_empty() {
            self.conditions.remove(name);
        }
        w
    }

    /// Take `lease_id` off `name`'s parked list; returns its entry.
    fn cond_remove(&mut self, name: &str, lease_id: u64) -> Option<CondWaiter> {
        let c = self.conditions.get_mut(name)?;
        let pos = c.waiters.iter().position(|w| w.lease_id == lease_id)?;
        let w = c.waiters.remove(pos);
        if c.waiters.is_empty() {
            self.conditions.remove(name);
        }
        Some(w)
    }

    pub(super) fn condition_timer(&mut self, _index: u64, name: &str, lease_id: u64) {
        if self.cond_remove(name, lease_id).is_some() {
            self.leave_part(lease_id, Kind::Condition, name);
            self.emit(
                "condition",
                name,
                "timeout",
                serde_json::json!({"lease_id": lease_id}),
            );
        }
    }

    pub(super) fn condition_lease_ended(&mut self, _index: u64, name: &str, lease_id: u64) {
        if let Some(w) = self.cond_remove(name, lease_id) {
            self.remove_timer(w.deadline_ms, Kind::Condition, name, lease_id);
        }
    }

    pub(super) fn condition_mentions(&self, name: &str, lease_id: u64) -> bool {
        self.conditions
            .get(name)
            .is_some_and(|c| c.waiters.iter().any(|w| w.lease_id == lease_id))
    }

    /// Check invariants; returns how many timers conditions expect in `timers`.
    pub(super) fn check_conditions(&self) -> Result<usize, String> {
        let mut n = 0;
        for (name, c) in &self.conditions {
            if c.waiters.is_empty() {
                return Err(format!("empty condition {name} kept"));
            }
            let mut seen = std::collections::BTreeSet::new();
            for w in &c.waiters {
                if !seen.insert(w.lease_id) {
                    return Err(format!("lease {} parked twice on {name}", w.lease_id));
                }
                match self.leases.get(&w.lease_id) {
                    Some(l) if l.parts.contains(&(Kind::Condition, name.clone())) => {}
                    _ => {
                        return Err(format!(
                            "dead lease {} parked on condition {name}",
                            w.lease_id
                        ))
                    }
                }
                let t = super::Timer {
                    kind: Kind::Condition,
                    name: name.clone(),
                    lease_id: w.lease_id,
                };
                if !self.timers.contains(&(w.deadline_ms, t)) {
                    return Err(format!(
                        "parked lease {} on {name} has no timer",
                        w.lease_id
                    ));
                }
                n += 1;
            }
        }
        Ok(n)
    }
}
