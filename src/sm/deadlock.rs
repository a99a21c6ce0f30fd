//! Deadlock detection over the wait-for graph of locks (both modes) and semaphores.
//!
//! Model: a lease is one agent, and an agent releases nothing while any of its waits is
//! pending. Lease A waits for lease B when one of A's queued requests cannot be granted before
//! B gives something up:
//! - locks: B holds the lock in a mode that conflicts with A's, or B is queued ahead of A in a
//!   conflicting mode (B will hold it first; readers batched together do not wait for each
//!   other);
//! - semaphores: B holds, or is queued ahead of A for, so many permits that A cannot fit while
//!   B has them (`capacity - B.permits < A.permits`). A semaphore waiter is not drawn waiting
//!   for holders it can do without, so a cycle that needs several holders blocked at once
//!   resolves through `wait_ms`, not here.
//!
//! The graph only gains edges when a request queues (a new semaphore waiter sorted ahead of
//! others also gains edges into it) or when a request is granted at once while others wait (a
//! semaphore request with a priority head start that fits: the waiters it passes may now wait
//! for it). A hand-off turns "queued ahead" into "holds", the same edge, and a lock is granted
//! at once only when nobody waits. So every new cycle passes through the lease of the request
//! being applied: the state machine checks that one lease right after queueing or granting
//! and, if it closes a cycle, undoes the step and fails the request with `deadlock` and the
//! cycle. So no cycle ever survives an apply (`check_no_cycles` checks that in tests; the
//! random tests found the priority-grant case).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use super::{ErrorCode, Rejection, Response, Sm};

/// How many resolved deadlocks `GET /v1/conflicts` can show.
pub const RECENT_DEADLOCKS: usize = 32;

/// One edge of the wait-for graph: `lease_id` waits for `waits_for` on `resource`
/// (`lock:NAME` or `semaphore:NAME`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WaitEdge {
    pub lease_id: u64,
    pub waits_for: u64,
    pub resource: String,
}

/// A deadlock the state machine refused, for `/v1/conflicts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadlockRecord {
    /// Log index of the refused request.
    pub index: u64,
    pub time_ms: u64,
    /// The lease whose request closed the cycle and was refused.
    pub victim: u64,
    pub resource: String,
    pub cycle: Vec<WaitEdge>,
    pub resolution: String,
}

impl Sm {
    /// The edges out of `lease_id`.
    pub fn wait_edges(&self, lease_id: u64) -> Vec<WaitEdge> {
        let mut out = BTreeSet::new();
        let Some(lease) = self.leases.get(&lease_id) else {
            return Vec::new();
        };
        for name in &lease.waiting {
            let Some(lock) = self.locks.get(name) else {
                continue;
            };
            let Some(pos) = lock.queue.iter().position(|w| w.lease_id == lease_id) else {
                continue;
            };
            let mode = lock.queue[pos].mode;
            let holders = lock
                .holders()
                .filter(|(m, _)| !m.compatible(mode))
                .map(|(_, h)| h.lease_id);
            let ahead = lock.queue.iter().take(pos);
            let ahead = ahead
                .filter(|w| !w.mode.compatible(mode))
                .map(|w| w.lease_id);
            for to in holders.chain(ahead) {
                out.insert(WaitEdge {
                    lease_id,
                    waits_for: to,
                    resource: format!("lock:{name}"),
                });
            }
        }
        for name in &lease.sem_waiting {
            let Some(sem) = self.semaphores.get(name) else {
                continue;
            };
            let Some(pos) = sem.queue.iter().position(|w| w.lease_id == lease_id) else {
                continue;
            };
            let need = sem.queue[pos].permits;
            let blocks = |permits: u64| sem.capacity - permits.min(sem.capacity) < need;
            let holders = sem
                .holders
                .iter()
                .filter(|(_, h)| blocks(h.permits))
                .map(|(id, _)| *id);
            let ahead = sem.queue.iter().take(pos);
            let ahead = ahead.filter(|w| blocks(w.permits)).map(|w| w.lease_id);
            for to in holders.chain(ahead) {
                out.insert(WaitEdge {
                    lease_id,
                    waits_for: to,
                    resource: format!("semaphore:{name}"),
                });
            }
        }
        out.into_iter().collect()
    }

    /// The whole wait-for graph.
    pub fn wait_graph(&self) -> Vec<WaitEdge> {
        self.leases
            .iter()
            .filter(|(_, l)| !l.waiting.is_empty() || !l.sem_waiting.is_empty())
            .flat_map(|(id, _)| self.wait_edges(*id))
            .collect()
    }

    /// A cycle through `start`, as the edges from `start` back to it (breadth first, so the
    /// shortest one).
    pub(super) fn find_cycle(&self, start: u64) -> Option<Vec<WaitEdge>> {
        let mut via: BTreeMap<u64, WaitEdge> = BTreeMap::new();
        let mut todo = VecDeque::from([start]);
        while let Some(n) = todo.pop_front() {
            for e in self.wait_edges(n) {
                if e.waits_for == start {
                    let mut cycle = vec![e];
                    let mut at = n;
                    while at != start {
                        let prev = via.get(&at)?.clone();
                        at = prev.lease_id;
                        cycle.push(prev);
                    }
                    cycle.reverse();
                    return Some(cycle);
                }
                if let std::collections::btree_map::Entry::Vacant(v) = via.entry(e.waits_for) {
                    v.insert(e.clone());
                    todo.push_back(e.waits_for);
                }
            }
        }
        None
    }

    /// Refuse `victim`'s request on `resource` that closed `cycle`: record it, emit it, and
    /// answer `deadlock` with the cycle.
    pub(super) fn deadlock(
        &mut self,
        index: u64,
        victim: u64,
        resource: &str,
        cycle: Vec<WaitEdge>,
    ) -> Response {
        let owners: Vec<String> = cycle
            .iter()
            .map(|e| {
                let owner = self.leases.get(&e.lease_id).and_then(|l| l.owner.clone());
                match owner {
                    Some(o) => format!(
                        "lease {} ({o}) waits for {} on {}",
                        e.lease_id, e.waits_for, e.resource
                    ),
                    None => format!(
                        "lease {} waits for {} on {}",
                        e.lease_id, e.waits_for, e.resource
                    ),
                }
            })
            .collect();
        let record = DeadlockRecord {
            index,
            time_ms: self.time_ms,
            victim,
            resource: resource.to_string(),
            cycle: cycle.clone(),
            resolution: "request refused: it would have closed the cycle".into(),
        };
        self.deadlocks.push_back(record);
        while self.deadlocks.len() > RECENT_DEADLOCKS {
            self.deadlocks.pop_front();
        }
        self.emit(
            "deadlock",
            resource,
            "refused",
            serde_json::json!({"lease_id": victim, "cycle": cycle}),
        );
        Response::Rejected(Rejection {
            cycle,
            ..Rejection::new(
                ErrorCode::Deadlock,
                format!(
                    "waiting for {resource} would deadlock: {}",
                    owners.join("; ")
                ),
            )
        })
    }

    /// No cycle in the wait-for graph (Kahn's algorithm over the whole graph).
    pub(super) fn check_no_cycles(&self) -> Result<(), String> {
        let edges = self.wait_graph();
        let mut out: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        let mut indeg: BTreeMap<u64, usize> = BTreeMap::new();
        for e in &edges {
            out.entry(e.lease_id).or_default().push(e.waits_for);
            indeg.entry(e.lease_id).or_default();
            *indeg.entry(e.waits_for).or_default() += 1;
        }
        let mut ready: Vec<u64> = indeg
            .iter()
            .filter(|(_, d)| **d == 0)
            .map(|(n, _)| *n)
            .collect();
        let mut seen = 0;
        while let Some(n) = ready.pop() {
            seen += 1;
            for m in out.get(&n).into_iter().flatten() {
                let d = indeg.get_mut(m).expect("node");
                *d -= 1;
                if *d == 0 {
                    ready.push(*m);
                }
            }
        }
        if seen != indeg.len() {
            return Err(format!("the wait-for graph has a cycle: {edges:?}"));
        }
        Ok(())
    }
}
