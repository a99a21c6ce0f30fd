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
//!
//! **Victim policies.** Who loses when a step closes a cycle is the cluster-wide, replicated
//! `deadlock_policy` (set by `SetDeadlockPolicy`):
//! - `refuse` (the default): the request being applied, as described above;
//! - `youngest`: the lease of the cycle with the highest id (lease ids are log indexes, so the
//!   most recently granted session);
//! - `lowest_priority`: the lease whose request at stake has the lowest priority, ties to the
//!   youngest. The request at stake is the one it would lose: for the requester, the request
//!   being applied; for any other lease, its wait on its outgoing edge of the cycle. Semaphore
//!   requests carry a `priority`; lock requests count as 0.
//!
//! When the policy picks a lease other than the requester, that lease's wait on its outgoing
//! edge is cancelled the way a passed wait deadline ends it (out of the queue and the expiry
//! index, then a hand-off, which may grant the waiters it blocked, the requester among them),
//! the cancellation is recorded and emitted, and the requester's step stands. The requester
//! may close several cycles at once, so this repeats until none is left or the policy picks
//! the requester (then it is refused as under `refuse`).
//!
//! The victims are all chosen before anything changes (`break_cycles`), on the graph with the
//! chosen waits taken out: dropping a waiter from a resource drops exactly its edges out on
//! that resource and the edges into it there (it neither holds it nor waits there any more).
//! The hand-off that follows adds no edge: a waiter granted by it waited only for the dropped
//! one (anything else still blocks it), so its own edges there were already gone, and the
//! ones that waited for it now wait for a holder on the same terms. So the planned graph is
//! the graph after the cancellations, and a refusal of the requester comes before any
//! cancellation: a step either stands with its victims' waits cancelled, or is refused with
//! nothing changed.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

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

/// Who loses when a step would close a cycle (see the module docs). Replicated, cluster-wide.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadlockPolicy {
    /// The request that closes the cycle fails.
    #[default]
    Refuse,
    /// The lease of the cycle with the highest id.
    Youngest,
    /// The lease whose request at stake has the lowest priority, ties to the youngest.
    LowestPriority,
}

impl DeadlockPolicy {
    pub const ALL: [DeadlockPolicy; 3] = [
        DeadlockPolicy::Refuse,
        DeadlockPolicy::Youngest,
        DeadlockPolicy::LowestPriority,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeadlockPolicy::Refuse => "refuse",
            DeadlockPolicy::Youngest => "youngest",
            DeadlockPolicy::LowestPriority => "lowest_priority",
        }
    }

    /// The policy named `s` (as in the API: `refuse`, `youngest`, `lowest_priority`).
    pub fn parse(s: &str) -> Option<DeadlockPolicy> {
        DeadlockPolicy::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

impl fmt::Display for DeadlockPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A resolved deadlock, for `/v1/conflicts` and for the victim's blocked call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadlockRecord {
    /// Log index of the request that closed the cycle.
    pub index: u64,
    pub time_ms: u64,
    /// The lease that lost: the requester when its request was refused, otherwise the lease
    /// whose wait on `resource` was cancelled.
    pub victim: u64,
    /// The victim's request: the refused one, or the cancelled wait.
    pub resource: String,
    /// From the victim back to it; the first edge is the victim's request on `resource`.
    pub cycle: Vec<WaitEdge>,
    pub resolution: String,
    /// The lease whose request closed the cycle (`victim` when it was refused). None in
    /// records from before victim policies, which were all refusals.
    #[serde(default)]
    pub requester: Option<u64>,
    /// The policy that picked the victim (`refuse` in records from before policies).
    #[serde(default)]
    pub policy: DeadlockPolicy,
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

    /// False only when no edge of the wait-for graph can point at `lease_id`: it holds no
    /// lock and no permits, and is last in every line it waits in. (Sound, not exact: being
    /// ahead of a compatible waiter counts too.)
    fn may_be_waited_for(&self, lease_id: u64) -> bool {
        let Some(l) = self.leases.get(&lease_id) else {
            return false;
        };
        let ahead_in_lock = |name: &String| {
            self.locks
                .get(name)
                .and_then(|k| k.queue.back())
                .is_some_and(|w| w.lease_id != lease_id)
        };
        let ahead_in_sem = |name: &String| {
            self.semaphores
                .get(name)
                .and_then(|s| s.queue.last())
                .is_some_and(|w| w.lease_id != lease_id)
        };
        !l.locks.is_empty()
            || !l.sems.is_empty()
            || l.waiting.iter().any(ahead_in_lock)
            || l.sem_waiting.iter().any(ahead_in_sem)
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
        self.find_cycle_without(start, &BTreeSet::new())
    }

    /// `find_cycle` in the graph with the waits `dropped` (lease, resource) taken out: their
    /// edges out, and the edges into them on that resource.
    fn find_cycle_without(
        &self,
        start: u64,
        dropped: &BTreeSet<(u64, String)>,
    ) -> Option<Vec<WaitEdge>> {
        // Nothing waits for `start`: no cycle. This skips the search for the common case
        // of a lease that holds nothing and queues at the back of one line, where the search
        // would walk every waiter ahead and all of theirs (quadratic in the queue length).
        if !self.may_be_waited_for(start) {
            return None;
        }
        let gone = |lease: u64, e: &WaitEdge| dropped.contains(&(lease, e.resource.clone()));
        let mut via: BTreeMap<u64, WaitEdge> = BTreeMap::new();
        let mut todo = VecDeque::from([start]);
        while let Some(n) = todo.pop_front() {
            let edges = self.wait_edges(n).into_iter();
            for e in edges.filter(|e| !gone(e.lease_id, e) && !gone(e.waits_for, e)) {
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

    /// Resolve the cycles the step of `requester` just closed (its request is queued or
    /// granted), under the policy. `priority` is that request's priority. Returns the cycle to
    /// refuse the request with when the policy picks the requester: then nothing was changed
    /// and the caller undoes the step and calls `deadlock`. Otherwise every victim's wait has
    /// been cancelled and recorded, and no cycle is left (see the module docs).
    pub(super) fn break_cycles(
        &mut self,
        index: u64,
        requester: u64,
        priority: u64,
    ) -> Option<Vec<WaitEdge>> {
        let mut dropped = BTreeSet::new();
        let mut victims = Vec::new();
        while let Some(cycle) = self.find_cycle_without(requester, &dropped) {
            let victim = self.pick_victim(&cycle, requester, priority);
            if victim == requester {
                return Some(cycle);
            }
            let cycle = starting_at(cycle, victim);
            dropped.insert((victim, cycle[0].resource.clone()));
            victims.push(cycle);
        }
        for cycle in victims {
            self.sacrifice(index, requester, cycle);
        }
        debug_assert!(self.find_cycle(requester).is_none());
        None
    }

    /// The lease of `cycle` the policy picks.
    fn pick_victim(&self, cycle: &[WaitEdge], requester: u64, priority: u64) -> u64 {
        let leases = cycle.iter().map(|e| e.lease_id);
        match self.deadlock_policy {
            DeadlockPolicy::Refuse => requester,
            DeadlockPolicy::Youngest => leases.max().unwrap_or(requester),
            DeadlockPolicy::LowestPriority => cycle
                .iter()
                .map(|e| {
                    let p = match e.lease_id == requester {
                        true => priority,
                        false => self.wait_priority(e),
                    };
                    (p, std::cmp::Reverse(e.lease_id))
                })
                .min()
                .map_or(requester, |(_, id)| id.0),
        }
    }

    /// The priority of `e.lease_id`'s wait on `e.resource`: a semaphore waiter's own, 0 for a
    /// lock waiter (locks have no priorities).
    fn wait_priority(&self, e: &WaitEdge) -> u64 {
        let Some(("semaphore", name)) = e.resource.split_once(':') else {
            return 0;
        };
        self.semaphores
            .get(name)
            .and_then(|s| s.queue.iter().find(|w| w.lease_id == e.lease_id))
            .map_or(0, |w| w.priority)
    }

    /// Cancel the wait of `cycle`'s first lease on its first edge's resource so `requester`'s
    /// step can stand: record it, emit it, then end the wait as its deadline would.
    fn sacrifice(&mut self, index: u64, requester: u64, cycle: Vec<WaitEdge>) {
        let Some(first) = cycle.first() else {
            return;
        };
        let (victim, resource) = (first.lease_id, first.resource.clone());
        let policy = self.deadlock_policy;
        self.emit(
            "deadlock",
            &resource,
            "victim",
            serde_json::json!({"lease_id": victim, "requester": requester, "policy": policy, "cycle": cycle}),
        );
        self.record_deadlock(DeadlockRecord {
            index,
            time_ms: self.time_ms,
            victim,
            resource: resource.clone(),
            cycle,
            resolution: format!(
                "wait cancelled by policy {policy}: lease {requester}'s request closed the cycle and proceeds"
            ),
            requester: Some(requester),
            policy,
        });
        match resource.split_once(':') {
            Some(("lock", name)) => self.end_lock_wait(index, name, victim, "wait_cancelled"),
            Some(("semaphore", name)) => self.end_sem_wait(index, name, victim, "wait_cancelled"),
            _ => {}
        }
    }

    fn record_deadlock(&mut self, record: DeadlockRecord) {
        self.deadlocks.push_back(record);
        while self.deadlocks.len() > RECENT_DEADLOCKS {
            self.deadlocks.pop_front();
        }
    }

    /// Set the policy; returns the previous one.
    pub(super) fn set_deadlock_policy(&mut self, policy: DeadlockPolicy) -> Response {
        let previous = std::mem::replace(&mut self.deadlock_policy, policy);
        if previous != policy {
            self.emit(
                "deadlock",
                "",
                "policy_set",
                serde_json::json!({"policy": policy, "previous": previous}),
            );
        }
        Response::DeadlockPolicySet { policy, previous }
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
        let policy = self.deadlock_policy;
        let resolution = match policy {
            DeadlockPolicy::Refuse => "request refused: it would have closed the cycle".into(),
            p => format!(
                "request refused: it would have closed the cycle, and policy {p} picked its lease"
            ),
        };
        self.record_deadlock(DeadlockRecord {
            index,
            time_ms: self.time_ms,
            victim,
            resource: resource.to_string(),
            cycle: cycle.clone(),
            resolution,
            requester: Some(victim),
            policy,
        });
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

/// `cycle` rotated to start with the edge out of `lease`.
fn starting_at(mut cycle: Vec<WaitEdge>, lease: u64) -> Vec<WaitEdge> {
    let at = cycle.iter().position(|e| e.lease_id == lease).unwrap_or(0);
    cycle.rotate_left(at);
    cycle
}
