//! Shared plumbing for the primitives built on leases: the lease's membership in barriers,
//! elections, queues and conditions (`Lease::parts`), and one deadline index for their waits
//! (`Sm::timers`). Each primitive's module implements its `*_timer` (a wait deadline passed)
//! and `*_lease_ended` (the lease ended: leave, resign, return claims) hooks; this module only
//! routes to them, so expiry and lease end stay one deterministic step for every primitive.

use serde::{Deserialize, Serialize};

use super::Sm;

/// The primitive a lease takes part in or a timer belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Barrier,
    DoubleBarrier,
    Election,
    Queue,
    Condition,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Barrier => "barrier",
            Kind::DoubleBarrier => "double_barrier",
            Kind::Election => "election",
            Kind::Queue => "queue",
            Kind::Condition => "condition",
        }
    }
}

/// A wait deadline of `lease_id` on the primitive `kind`/`name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Timer {
    pub kind: Kind,
    pub name: String,
    pub lease_id: u64,
}

impl Sm {
    /// Record that `lease_id` takes part in `kind`/`name` (so its end reaches the primitive).
    pub(super) fn join_part(&mut self, lease_id: u64, kind: Kind, name: &str) {
        if let Some(l) = self.leases.get_mut(&lease_id) {
            l.parts.insert((kind, name.to_string()));
        }
    }

    /// Undo `join_part` once the lease no longer holds or waits for anything in `kind`/`name`.
    pub(super) fn leave_part(&mut self, lease_id: u64, kind: Kind, name: &str) {
        if let Some(l) = self.leases.get_mut(&lease_id) {
            l.parts.remove(&(kind, name.to_string()));
        }
    }

    pub(super) fn add_timer(&mut self, deadline_ms: u64, kind: Kind, name: &str, lease_id: u64) {
        self.timers.insert((
            deadline_ms,
            Timer {
                kind,
                name: name.to_string(),
                lease_id,
            },
        ));
    }

    pub(super) fn remove_timer(&mut self, deadline_ms: u64, kind: Kind, name: &str, lease_id: u64) {
        self.timers.remove(&(
            deadline_ms,
            Timer {
                kind,
                name: name.to_string(),
                lease_id,
            },
        ));
    }

    /// A wait deadline passed: the primitive drops the waiter (and hands off if that matters).
    /// The timer is already out of the index.
    pub(super) fn timer_fired(&mut self, index: u64, t: &Timer) {
        match t.kind {
            Kind::Barrier => self.barrier_timer(index, &t.name, t.lease_id),
            Kind::DoubleBarrier => self.double_barrier_timer(index, &t.name, t.lease_id),
            Kind::Election => self.election_timer(index, &t.name, t.lease_id),
            Kind::Queue => self.queue_timer(index, &t.name, t.lease_id),
            Kind::Condition => self.condition_timer(index, &t.name, t.lease_id),
        }
    }

    /// The lease ended (already removed from `leases`): the primitive drops every hold and wait
    /// of it, with hand-offs, in this same step.
    pub(super) fn part_lease_ended(&mut self, index: u64, kind: Kind, name: &str, lease_id: u64) {
        match kind {
            Kind::Barrier => self.barrier_lease_ended(index, name, lease_id),
            Kind::DoubleBarrier => self.double_barrier_lease_ended(index, name, lease_id),
            Kind::Election => self.election_lease_ended(index, name, lease_id),
            Kind::Queue => self.queue_lease_ended(index, name, lease_id),
            Kind::Condition => self.condition_lease_ended(index, name, lease_id),
        }
    }

    /// Invariants of the lease-based primitives; every one also checks that each timer it
    /// expects is in `timers`, and the total count here checks there are no others.
    pub(super) fn check_parts(&self) -> Result<(), String> {
        let expected = self.check_barriers()?
            + self.check_double_barriers()?
            + self.check_elections()?
            + self.check_queues()?
            + self.check_conditions()?;
        if expected != self.timers.len() {
            return Err(format!(
                "{} timers indexed, the primitives account for {expected}",
                self.timers.len()
            ));
        }
        for (id, l) in &self.leases {
            for (kind, name) in &l.parts {
                if !self.part_mentions(*kind, name, *id) {
                    return Err(format!(
                        "lease {id} claims a part in {} {name} that does not know it",
                        kind.as_str()
                    ));
                }
            }
        }
        Ok(())
    }

    fn part_mentions(&self, kind: Kind, name: &str, lease_id: u64) -> bool {
        match kind {
            Kind::Barrier => self.barrier_mentions(name, lease_id),
            Kind::DoubleBarrier => self.double_barrier_mentions(name, lease_id),
            Kind::Election => self.election_mentions(name, lease_id),
            Kind::Queue => self.queue_mentions(name, lease_id),
            Kind::Condition => self.condition_mentions(name, lease_id),
        }
    }
}
