//! Concord: a Raft-replicated coordination service for AI agents.
//!
//! Dependency direction: `sm` <- `store` <- `node` -> `api`, `network`.

pub mod api;
pub mod bench;
pub mod chaos;
pub mod client;
pub mod config;
pub mod faults;
pub mod network;
pub mod node;
pub mod perf;
pub mod propose;
pub mod raft_stream;
pub mod sm;
pub mod store;
pub mod types;
