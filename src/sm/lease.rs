//! Leases: agent sessions. Ending a lease (expiry or revoke) releases everything it held and
//! everything it waited for, and hands each released lock to the next waiter, in one step.

use std::collections::BTreeSet;

use serde_json::json;

use serde::{Deserialize, Serialize};

use super::{lease_not_found, ErrorCode, Kind, Response, Sm};

/// Shortest TTL: the leader-change grace (not the TTL) covers elections, so a TTL only has to
/// exceed a keepalive round trip; 1 s keeps keepalive traffic at a few writes per second.
pub const MIN_TTL_MS: u64 = 1_000;
/// Longest TTL: one day.
pub const MAX_TTL_MS: u64 = 24 * 60 * 60 * 1000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub id: u64,
    pub owner: Option<String>,
    pub ttl_ms: u64,
    pub granted_ms: u64,
    pub deadline_ms: u64,
    /// Locks this lease holds.
    pub locks: BTreeSet<String>,
    /// Locks this lease waits for.
    pub waiting: BTreeSet<String>,
    /// Keys bound to this lease.
    pub keys: BTreeSet<String>,
    /// Semaphores this lease holds permits of.
    #[serde(default)]
    pub sems: BTreeSet<String>,
    /// Semaphores this lease waits for.
    #[serde(default)]
    pub sem_waiting: BTreeSet<String>,
    /// Barriers, elections, queues and conditions this lease holds or waits in.
    #[serde(default)]
    pub parts: BTreeSet<(Kind, String)>,
}

impl Sm {
    pub(super) fn lease_grant(
        &mut self,
        index: u64,
        now: u64,
        ttl_ms: u64,
        owner: Option<String>,
    ) -> Response {
        if !(MIN_TTL_MS..=MAX_TTL_MS).contains(&ttl_ms) {
            return Response::reject(
                ErrorCode::InvalidArgument,
                format!("ttl_ms must be between {MIN_TTL_MS} and {MAX_TTL_MS}, got {ttl_ms}"),
            );
        }
        // The granting entry's index is unique and deterministic: it is the lease id.
        let lease = Lease {
            id: index,
            owner,
            ttl_ms,
            granted_ms: now,
            deadline_ms: now + ttl_ms,
            locks: BTreeSet::new(),
            waiting: BTreeSet::new(),
            keys: BTreeSet::new(),
            sems: BTreeSet::new(),
            sem_waiting: BTreeSet::new(),
            parts: BTreeSet::new(),
        };
        self.lease_expiry.insert((lease.deadline_ms, index));
        self.emit(
            "lease",
            &index.to_string(),
            "granted",
            json!({"lease_id": index, "ttl_ms": ttl_ms, "owner": lease.owner}),
        );
        self.leases.insert(index, lease);
        Response::LeaseGranted {
            lease_id: index,
            ttl_ms,
        }
    }

    pub(super) fn lease_keepalive(&mut self, now: u64, lease_id: u64) -> Response {
        let Some(lease) = self.leases.get_mut(&lease_id) else {
            return lease_not_found(lease_id);
        };
        self.lease_expiry.remove(&(lease.deadline_ms, lease_id));
        lease.deadline_ms = lease.deadline_ms.max(now + lease.ttl_ms);
        let (deadline_ms, ttl_ms) = (lease.deadline_ms, lease.ttl_ms);
        self.lease_expiry.insert((deadline_ms, lease_id));
        self.emit(
            "lease",
            &lease_id.to_string(),
            "keepalive",
            json!({"lease_id": lease_id, "deadline_ms": deadline_ms}),
        );
        Response::LeaseKept { lease_id, ttl_ms }
    }

    /// Raise every lease's remaining time to at least `grace_ms`.
    pub(super) fn lease_grace(&mut self, now: u64, grace_ms: u64) {
        let floor = now.saturating_add(grace_ms);
        let short: Vec<(u64, u64)> = self
            .lease_expiry
            .iter()
            .take_while(|(d, _)| *d < floor)
            .copied()
            .collect();
        for (deadline, id) in short {
            self.lease_expiry.remove(&(deadline, id));
            self.lease_expiry.insert((floor, id));
            if let Some(l) = self.leases.get_mut(&id) {
                l.deadline_ms = floor;
            }
        }
    }

    /// End a lease: drop its waits first (so no hand-off can pick it), then its keys, then
    /// release its locks, handing each to the next waiter with token `index`.
    pub(super) fn end_lease(&mut self, index: u64, lease_id: u64, reason: &str) {
        let ended = self.take_leases(&[lease_id], reason);
        self.release_leases(index, ended, reason);
    }

    /// Remove leases from the live ones, so that no hand-off can pick them (expiry ends the
    /// leases due at one instant together); their waits and holds stay until `release_leases`.
    pub(super) fn take_leases(&mut self, lease_ids: &[u64], reason: &str) -> Vec<Lease> {
        lease_ids
            .iter()
            .filter_map(|id| self.take_lease(*id, reason))
            .collect()
    }

    /// Drop every wait and hold of removed leases, with hand-offs, in this step.
    pub(super) fn release_leases(&mut self, index: u64, ended: Vec<Lease>, reason: &str) {
        for lease in ended {
            self.release_lease(index, lease, reason);
        }
    }

    /// Remove a lease from the live ones (so no hand-off can pick it).
    fn take_lease(&mut self, lease_id: u64, reason: &str) -> Option<Lease> {
        let lease = self.leases.remove(&lease_id)?;
        self.emit(
            "lease",
            &lease_id.to_string(),
            reason,
            json!({"lease_id": lease_id}),
        );
        self.lease_expiry.remove(&(lease.deadline_ms, lease_id));
        Some(lease)
    }

    /// Drop every wait and hold of a removed lease, with hand-offs, in this step.
    fn release_lease(&mut self, index: u64, lease: Lease, reason: &str) {
        let lease_id = lease.id;
        for name in &lease.waiting {
            self.unqueue(name, lease_id);
        }
        for key in &lease.keys {
            if self.kv.get(key).and_then(|e| e.lease_id) == Some(lease_id) {
                self.kv.remove(key);
                self.emit(
                    "kv",
                    key,
                    "delete",
                    json!({"lease_id": lease_id, "reason": reason}),
                );
            }
        }
        for name in &lease.locks {
            self.release_lock(index, name, lease_id);
        }
        // A departed waiter may have been a writer that readers behind it waited for.
        for name in &lease.waiting {
            self.lock_hand_off(index, name);
        }
        for name in &lease.sem_waiting {
            self.sem_unqueue(name, lease_id);
        }
        for name in &lease.sems {
            if let Some(s) = self.semaphores.get_mut(name) {
                s.holders.remove(&lease_id);
            }
            self.emit("semaphore", name, "released", json!({"lease_id": lease_id}));
            self.sem_hand_off(index, name);
        }
        // A departed waiter may have been the head that did not fit.
        for name in &lease.sem_waiting {
            self.sem_hand_off(index, name);
        }
        for (kind, name) in &lease.parts {
            self.part_lease_ended(index, *kind, name, lease_id);
        }
    }
}
