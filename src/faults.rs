//! The link fault switch for chaos tests: when enabled (`--enable-fault-injection`, off by
//! default), an admin endpoint sets the peers this node must not talk to. Raft RPCs to and from
//! a blocked peer are dropped in both directions, and requests are not forwarded to it, as if
//! the network between the two nodes were cut.

use std::collections::BTreeSet;
use std::sync::RwLock;

use crate::types::NodeId;

#[derive(Debug, Default)]
pub struct Faults {
    enabled: bool,
    blocked: RwLock<BTreeSet<NodeId>>,
}

impl Faults {
    pub fn new(enabled: bool) -> Faults {
        Faults {
            enabled,
            blocked: RwLock::new(BTreeSet::new()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn is_blocked(&self, peer: NodeId) -> bool {
        self.enabled
            && self
                .blocked
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&peer)
    }

    pub fn blocked(&self) -> BTreeSet<NodeId> {
        self.blocked
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replace the blocked set; ignored unless fault injection is enabled.
    pub fn set_blocked(&self, peers: BTreeSet<NodeId>) -> bool {
        if !self.enabled {
            return false;
        }
        *self.blocked.write().unwrap_or_else(|e| e.into_inner()) = peers;
        true
    }
}
