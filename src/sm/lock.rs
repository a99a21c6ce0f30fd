//! Exclusive locks with fencing tokens and a replicated FIFO wait queue.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::{lease_not_found, ErrorCode, Rejection, Response, Sm, MAX_WAIT_MS};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub lease_id: u64,
    /// Log index of the entry that granted the lock.
    pub token: u64,
    pub since_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waiter {
    pub lease_id: u64,
    pub since_ms: u64,
    pub deadline_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lock {
    pub holder: Option<Holder>,
    pub queue: VecDeque<Waiter>,
}

impl Sm {
    pub(super) fn lock_acquire(
        &mut self,
        index: u64,
        now: u64,
        name: &str,
        lease_id: u64,
        wait_ms: u64,
    ) -> Response {
        if name.is_empty() {
            return Response::reject(ErrorCode::InvalidArgument, "lock name must not be empty");
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
        let lock = self.locks.entry(name.to_string()).or_default();
        match &lock.holder {
            None => {
                lock.holder = Some(Holder {
                    lease_id,
                    token: index,
                    since_ms: now,
                });
                lease.locks.insert(name.to_string());
                Response::LockGranted { token: index }
            }
            // Re-acquiring a lock one holds is idempotent.
            Some(h) if h.lease_id == lease_id => Response::LockGranted { token: h.token },
            Some(h) => {
                if let Some(pos) = lock.queue.iter().position(|w| w.lease_id == lease_id) {
                    return Response::LockQueued {
                        position: pos as u64 + 1,
                    };
                }
                if wait_ms == 0 {
                    return Response::Rejected(Rejection {
                        current_token: Some(h.token),
                        ..Rejection::new(
                            ErrorCode::LockHeld,
                            format!("lock {name} is held by lease {}", h.lease_id),
                        )
                    });
                }
                let deadline_ms = now + wait_ms;
                lock.queue.push_back(Waiter {
                    lease_id,
                    since_ms: now,
                    deadline_ms,
                });
                lease.waiting.insert(name.to_string());
                self.wait_expiry
                    .insert((deadline_ms, name.to_string(), lease_id));
                Response::LockQueued {
                    position: lock.queue.len() as u64,
                }
            }
        }
    }

    pub(super) fn lock_release(&mut self, index: u64, name: &str, lease_id: u64) -> Response {
        if !self.leases.contains_key(&lease_id) {
            return lease_not_found(lease_id);
        }
        let holder = self.locks.get(name).and_then(|l| l.holder.as_ref());
        if holder.map(|h| h.lease_id) != Some(lease_id) {
            return Response::reject(
                ErrorCode::Conflict,
                format!("lease {lease_id} does not hold lock {name}"),
            );
        }
        if let Some(l) = self.leases.get_mut(&lease_id) {
            l.locks.remove(name);
        }
        let next_holder = self.release_and_hand_off(index, name);
        Response::LockReleased { next_holder }
    }

    /// Free `name` and grant it to the first waiter whose lease is alive, with token `index`.
    /// Returns the new holder. The caller has already detached the lock from the old lease.
    pub(super) fn release_and_hand_off(&mut self, index: u64, name: &str) -> Option<u64> {
        let lock = self.locks.get_mut(name)?;
        lock.holder = None;
        while let Some(w) = lock.queue.pop_front() {
            self.wait_expiry
                .remove(&(w.deadline_ms, name.to_string(), w.lease_id));
            // Waiters of ended leases are removed when the lease ends; the check keeps a dead
            // lease from ever being granted even if that were missed.
            let Some(lease) = self.leases.get_mut(&w.lease_id) else {
                continue;
            };
            lease.waiting.remove(name);
            lease.locks.insert(name.to_string());
            lock.holder = Some(Holder {
                lease_id: w.lease_id,
                token: index,
                since_ms: self.time_ms,
            });
            return Some(w.lease_id);
        }
        self.locks.remove(name);
        None
    }

    /// Remove a waiter whose deadline passed.
    pub(super) fn remove_waiter(&mut self, name: &str, lease_id: u64) {
        self.unqueue(name, lease_id);
        if let Some(l) = self.leases.get_mut(&lease_id) {
            l.waiting.remove(name);
        }
    }

    /// Take `lease_id` out of `name`'s queue and the wait index.
    pub(super) fn unqueue(&mut self, name: &str, lease_id: u64) {
        let Some(lock) = self.locks.get_mut(name) else {
            return;
        };
        if let Some(pos) = lock.queue.iter().position(|w| w.lease_id == lease_id) {
            if let Some(w) = lock.queue.remove(pos) {
                self.wait_expiry
                    .remove(&(w.deadline_ms, name.to_string(), lease_id));
            }
        }
    }

    /// Is `token` the current holder's token of `lock`?
    pub fn fence_valid(&self, lock: &str, token: u64) -> (bool, Option<u64>) {
        let current = self
            .locks
            .get(lock)
            .and_then(|l| l.holder.as_ref())
            .map(|h| h.token);
        (current == Some(token), current)
    }
}
