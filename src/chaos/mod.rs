//! The chaos harness: a real cluster of `concord` processes, concurrent clients recording a
//! Jepsen-style history, a seeded nemesis (kill -9, SIGSTOP, partitions through each node's
//! link fault switch), and checkers that judge the history.
//!
//! - `history`: the event model (one JSON line per invoke/ok/fail/info).
//! - `check`: linearizability of registers (Wing-Gong search), lock and semaphore safety.
//! - `runner`: `concord chaos`: cluster processes, workloads, nemesis, recovery, summary.

pub mod check;
pub mod history;
pub mod runner;
