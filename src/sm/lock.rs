//! Read-write locks with fencing tokens and a replicated FIFO wait queue.
//!
//! A lock is held by one `exclusive` holder or by any number of `shared` holders. Policy:
//! FIFO with reader batching (writer-preferring). A request is granted at once only if it is
//! compatible with the holders *and* nobody waits; otherwise it queues in arrival order. When
//! the holders leave, the head of the queue is granted: a writer alone, or every reader from
//! the head up to the next writer, together. So a waiting writer blocks readers that arrive
//! after it (readers can't starve writers) and readers queued behind a writer are served as one
//! batch right after it (writers can't starve readers). A shared holder never upgrades.
//!
//! Every grant returns a token, the log index of the granting entry: readers granted together
//! share one. Only an exclusive holder's token fences writes (`Fence` on a KV put).

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::{lease_not_found, ErrorCode, Rejection, Response, Sm, MAX_WAIT_MS};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LockMode {
    #[default]
    Exclusive,
    Shared,
}

impl LockMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LockMode::Exclusive => "exclusive",
            LockMode::Shared => "shared",
        }
    }

    /// Can a holder in `self` mode coexist with one in `other` mode?
    pub fn compatible(self, other: LockMode) -> bool {
        self == LockMode::Shared && other == LockMode::Shared
    }
}

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
    #[serde(default)]
    pub mode: LockMode,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lock {
    /// The exclusive holder.
    pub holder: Option<Holder>,
    /// Shared holders by lease (empty while `holder` is set).
    #[serde(default)]
    pub shared: BTreeMap<u64, Holder>,
    pub queue: VecDeque<Waiter>,
}

impl Lock {
    pub fn is_free(&self) -> bool {
        self.holder.is_none() && self.shared.is_empty()
    }

    /// The mode and hold of `lease_id`, if it holds the lock.
    pub fn hold_of(&self, lease_id: u64) -> Option<(LockMode, &Holder)> {
        match &self.holder {
            Some(h) if h.lease_id == lease_id => Some((LockMode::Exclusive, h)),
            _ => self.shared.get(&lease_id).map(|h| (LockMode::Shared, h)),
        }
    }

    /// Every holder with its mode.
    pub fn holders(&self) -> impl Iterator<Item = (LockMode, &Holder)> {
        let ex = self.holder.iter().map(|h| (LockMode::Exclusive, h));
        ex.chain(self.shared.values().map(|h| (LockMode::Shared, h)))
    }

    /// Could a request in `mode` be granted now, ignoring the queue?
    fn fits(&self, mode: LockMode) -> bool {
        match mode {
            LockMode::Exclusive => self.is_free(),
            LockMode::Shared => self.holder.is_none(),
        }
    }
}

impl Sm {
    pub(super) fn lock_acquire(
        &mut self,
        index: u64,
        now: u64,
        name: &str,
        lease_id: u64,
        wait_ms: u64,
        mode: LockMode,
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
        if !self.leases.contains_key(&lease_id) {
            return lease_not_found(lease_id);
        }
        let lock = self.locks.entry(name.to_string()).or_default();
        // Re-acquiring a lock one holds in the same mode is idempotent; no upgrades.
        if let Some((held, h)) = lock.hold_of(lease_id) {
            return if held == mode {
                Response::LockGranted { token: h.token }
            } else {
                Response::reject(
                    ErrorCode::Conflict,
                    format!(
                        "lease {lease_id} holds lock {name} in {} mode; release it first to take it {}",
                        held.as_str(),
                        mode.as_str()
                    ),
                )
            };
        }
        if let Some(pos) = lock.queue.iter().position(|w| w.lease_id == lease_id) {
            if lock.queue[pos].mode != mode {
                return Response::reject(
                    ErrorCode::Conflict,
                    format!(
                        "lease {lease_id} already waits for lock {name} in {} mode",
                        lock.queue[pos].mode.as_str()
                    ),
                );
            }
            return Response::LockQueued {
                position: pos as u64 + 1,
            };
        }
        if lock.queue.is_empty() && lock.fits(mode) {
            self.grant_lock(index, name, lease_id, mode);
            return Response::LockGranted { token: index };
        }
        if wait_ms == 0 {
            let current = lock.holder.as_ref().map(|h| h.token);
            let message = match &lock.holder {
                Some(h) => format!("lock {name} is held by lease {}", h.lease_id),
                None if lock.queue.is_empty() => format!(
                    "lock {name} is held in shared mode by {} leases",
                    lock.shared.len()
                ),
                None => format!(
                    "lock {name} is held in shared mode and a writer is waiting (writers go first)"
                ),
            };
            return Response::Rejected(Rejection {
                current_token: current,
                ..Rejection::new(ErrorCode::LockHeld, message)
            });
        }
        let deadline_ms = now + wait_ms;
        lock.queue.push_back(Waiter {
            lease_id,
            since_ms: now,
            deadline_ms,
            mode,
        });
        if let Some(l) = self.leases.get_mut(&lease_id) {
            l.waiting.insert(name.to_string());
        }
        self.wait_expiry
            .insert((deadline_ms, name.to_string(), lease_id));
        // A wait that closes a cycle in the wait-for graph: the policy cancels other waits of
        // the cycle, or the request is refused with nothing applied (locks have no priority).
        if let Some(cycle) = self.break_cycles(index, lease_id, 0) {
            self.unqueue(name, lease_id);
            if let Some(l) = self.leases.get_mut(&lease_id) {
                l.waiting.remove(name);
            }
            // Nobody else can have been unblocked: the waiter was last in the queue.
            return self.deadlock(index, lease_id, &format!("lock:{name}"), cycle);
        }
        self.lock_wait_outcome(name, lease_id, mode)
    }

    /// The answer to an acquire that queued: still queued (emitted), or granted by the
    /// hand-off after a deadlock victim ahead of it left the queue.
    fn lock_wait_outcome(&mut self, name: &str, lease_id: u64, mode: LockMode) -> Response {
        let lock = self.locks.get(name);
        if let Some((_, h)) = lock.and_then(|l| l.hold_of(lease_id)) {
            return Response::LockGranted { token: h.token };
        }
        let pos = lock.and_then(|l| l.queue.iter().position(|w| w.lease_id == lease_id));
        let position = pos.map_or(0, |p| p as u64 + 1);
        self.emit(
            "lock",
            name,
            "queued",
            serde_json::json!({"lease_id": lease_id, "mode": mode.as_str(), "position": position}),
        );
        Response::LockQueued { position }
    }

    fn grant_lock(&mut self, index: u64, name: &str, lease_id: u64, mode: LockMode) {
        let now = self.time_ms;
        let Some(lock) = self.locks.get_mut(name) else {
            return;
        };
        let h = Holder {
            lease_id,
            token: index,
            since_ms: now,
        };
        match mode {
            LockMode::Exclusive => lock.holder = Some(h),
            LockMode::Shared => {
                lock.shared.insert(lease_id, h);
            }
        }
        if let Some(l) = self.leases.get_mut(&lease_id) {
            l.locks.insert(name.to_string());
        }
        self.emit(
            "lock",
            name,
            "granted",
            serde_json::json!({"lease_id": lease_id, "mode": mode.as_str(), "token": index}),
        );
    }

    pub(super) fn lock_release(&mut self, index: u64, name: &str, lease_id: u64) -> Response {
        if !self.leases.contains_key(&lease_id) {
            return lease_not_found(lease_id);
        }
        let held = self
            .locks
            .get(name)
            .is_some_and(|l| l.hold_of(lease_id).is_some());
        if !held {
            return Response::reject(
                ErrorCode::Conflict,
                format!("lease {lease_id} does not hold lock {name}"),
            );
        }
        let granted = self.release_lock(index, name, lease_id);
        Response::LockReleased {
            next_holder: granted.first().copied(),
        }
    }

    /// Drop `lease_id`'s hold on `name` (any mode) and hand the lock on. Returns the leases
    /// granted in this step.
    pub(super) fn release_lock(&mut self, index: u64, name: &str, lease_id: u64) -> Vec<u64> {
        if let Some(lock) = self.locks.get_mut(name) {
            if lock.holder.as_ref().is_some_and(|h| h.lease_id == lease_id) {
                lock.holder = None;
            }
            lock.shared.remove(&lease_id);
        }
        if let Some(l) = self.leases.get_mut(&lease_id) {
            l.locks.remove(name);
        }
        self.emit(
            "lock",
            name,
            "released",
            serde_json::json!({"lease_id": lease_id}),
        );
        self.lock_hand_off(index, name)
    }

    /// Grant from the head of the queue while the head fits: one writer, or every reader up to
    /// the next writer. Drops the lock when nobody holds or waits. Returns the leases granted.
    pub(super) fn lock_hand_off(&mut self, index: u64, name: &str) -> Vec<u64> {
        let mut granted = Vec::new();
        loop {
            let Some(lock) = self.locks.get_mut(name) else {
                return granted;
            };
            let Some(head) = lock.queue.front() else {
                if lock.is_free() {
                    self.locks.remove(name);
                }
                return granted;
            };
            if !lock.fits(head.mode) {
                return granted;
            }
            let Some(w) = lock.queue.pop_front() else {
                return granted;
            };
            self.wait_expiry
                .remove(&(w.deadline_ms, name.to_string(), w.lease_id));
            // Waiters of ended leases are removed when the lease ends; the check keeps a dead
            // lease from ever being granted even if that were missed.
            let Some(lease) = self.leases.get_mut(&w.lease_id) else {
                continue;
            };
            lease.waiting.remove(name);
            self.grant_lock(index, name, w.lease_id, w.mode);
            granted.push(w.lease_id);
        }
    }

    /// Remove a waiter whose deadline passed; the ones behind it may fit now.
    pub(super) fn remove_waiter(&mut self, index: u64, name: &str, lease_id: u64) {
        self.end_lock_wait(index, name, lease_id, "wait_expired");
    }

    /// End `lease_id`'s wait on `name` (deadline passed, or cancelled as a deadlock victim),
    /// emitting `action`, and hand the lock on: the ones behind it may fit now.
    pub(super) fn end_lock_wait(&mut self, index: u64, name: &str, lease_id: u64, action: &str) {
        self.unqueue(name, lease_id);
        self.emit(
            "lock",
            name,
            action,
            serde_json::json!({"lease_id": lease_id}),
        );
        if let Some(l) = self.leases.get_mut(&lease_id) {
            l.waiting.remove(name);
        }
        self.lock_hand_off(index, name);
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

    /// Is `token` the current exclusive holder's token of `lock`? (Only writers fence.)
    pub fn fence_valid(&self, lock: &str, token: u64) -> (bool, Option<u64>) {
        let current = self
            .locks
            .get(lock)
            .and_then(|l| l.holder.as_ref())
            .map(|h| h.token);
        (current == Some(token), current)
    }

    /// The hold (mode, lease) of `lock` that has `token`, in any mode.
    pub fn token_holder(&self, lock: &str, token: u64) -> Option<(LockMode, u64)> {
        self.locks
            .get(lock)?
            .holders()
            .find(|(_, h)| h.token == token)
            .map(|(m, h)| (m, h.lease_id))
    }
}
