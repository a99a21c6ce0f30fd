//! The openraft type configuration shared by every layer.

use std::sync::Arc;

use crate::sm::{LogEntry, Response};

openraft::declare_raft_types!(
    /// Concord's Raft types: application data is a [`LogEntry`], the response a [`Response`].
    ///
    /// The entry is shared (`Arc`): openraft clones every entry it reads from the log (the
    /// state machine worker on each node, and each replication stream on the leader), and
    /// cloning the commands' strings (three allocations and copies per entry and clone) was
    /// 1.3 % of the nodes' CPU under `put` (docs/benchmarks.md). `Arc<T>` is encoded exactly
    /// as `T` (serde's `rc` feature), so the log and the wire format do not change.
    pub TypeConfig:
        D = Arc<LogEntry>,
        R = Response,
        NodeId = u64,
        Node = openraft::BasicNode,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig, crate::store::StateMachineStore>;
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
