//! Work queues (placeholder: the hooks the shared plumbing in `parts.rs` calls.)

use super::Sm;

impl Sm {
    pub(super) fn queue_timer(&mut self, _index: u64, _name: &str, _lease_id: u64) {}

    pub(super) fn queue_lease_ended(&mut self, _index: u64, _name: &str, _lease_id: u64) {}

    pub(super) fn queue_mentions(&self, _name: &str, _lease_id: u64) -> bool {
        false
    }

    /// Check invariants; returns how many timers this primitive expects in `timers`.
    pub(super) fn check_queues(&self) -> Result<usize, String> {
        Ok(0)
    }
}
