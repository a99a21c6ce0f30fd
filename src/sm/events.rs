//! Change events for watches. Every apply step appends what it changed, in order, to a buffer
//! that is not part of the replicated state (a snapshot never holds it); the storage layer
//! drains it after each entry, stamps nothing (the revision is the entry's log index) and
//! feeds the node's watch hub. Followers apply the same entries, so every node produces the
//! same events with the same revisions.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Sm;

/// One change. `revision` is the log index of the entry that made it; several changes of one
/// entry share a revision and keep their order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub revision: u64,
    /// kv, lock, semaphore, barrier, double_barrier, election, queue, condition, lease.
    #[serde(rename = "type")]
    pub kind: String,
    /// Key or resource name (the lease id for lease events).
    pub name: String,
    /// put, delete, granted, released, queued, expired, ...
    pub action: String,
    /// Action-specific fields (value, version, lease_id, token, ...).
    pub detail: Value,
}

/// Events of the entry being applied. Not replicated state: equality ignores it, so a
/// snapshot round trip compares equal whatever is buffered.
#[derive(Debug, Clone, Default)]
pub struct EventBuf(pub Vec<Event>);

impl PartialEq for EventBuf {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for EventBuf {}

impl Sm {
    pub(super) fn emit(&mut self, kind: &str, name: &str, action: &str, detail: Value) {
        self.events.0.push(Event {
            revision: self.index,
            kind: kind.to_string(),
            name: name.to_string(),
            action: action.to_string(),
            detail,
        });
    }

    /// The events of everything applied since the last call.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events.0)
    }
}

#[cfg(test)]
impl Sm {
    /// The buffered events of one type (tests of one primitive ignore the others', such as
    /// the lease events of a revoke).
    pub fn take_events_of(&mut self, kind: &str) -> Vec<Event> {
        self.take_events()
            .into_iter()
            .filter(|e| e.kind == kind)
            .collect()
    }
}
