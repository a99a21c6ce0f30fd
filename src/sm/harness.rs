//! Test harness shared by the state machine's test modules: a state machine plus the next log
//! index and leader term, checking the invariants after every apply.

use super::*;

pub(super) struct Harness {
    pub sm: Sm,
    pub index: u64,
    /// Leader term of the next entry; `h.term += 1` makes it the first of a new term.
    pub term: u64,
    /// Extra per-module checks, run after `check_invariants`.
    pub check: fn(&Sm) -> Result<(), String>,
}

impl Harness {
    pub fn new() -> Harness {
        Harness::with_check(|_| Ok(()))
    }

    pub fn with_check(check: fn(&Sm) -> Result<(), String>) -> Harness {
        Harness {
            sm: Sm::new(),
            index: 0,
            term: 1,
            check,
        }
    }

    pub fn apply_req(&mut self, time_ms: u64, request_id: Option<&str>, cmd: Command) -> Response {
        self.index += 1;
        let entry = LogEntry {
            time_ms,
            request_id: request_id.map(str::to_string),
            cmd,
        };
        let r = self.sm.apply(self.index, self.term, &entry);
        if let Err(e) = self
            .sm
            .check_invariants()
            .and_then(|_| (self.check)(&self.sm))
        {
            panic!("invariant broken by {entry:?} at index {}: {e}", self.index);
        }
        assert_eq!(self.sm.index, self.index);
        r
    }

    pub fn apply(&mut self, time_ms: u64, cmd: Command) -> Response {
        self.apply_req(time_ms, None, cmd)
    }

    /// Apply a tick; returns its index.
    pub fn tick(&mut self, time_ms: u64) -> u64 {
        assert_eq!(self.apply(time_ms, Command::Tick), Response::Done);
        self.index
    }

    /// Grant a lease; returns its id.
    pub fn grant(&mut self, time_ms: u64, ttl_ms: u64) -> u64 {
        let r = self.apply(
            time_ms,
            Command::LeaseGrant {
                ttl_ms,
                owner: None,
            },
        );
        assert_eq!(
            r,
            Response::LeaseGranted {
                lease_id: self.index,
                ttl_ms
            }
        );
        self.index
    }

    pub fn revoke(&mut self, time_ms: u64, lease_id: u64) -> Response {
        self.apply(time_ms, Command::LeaseRevoke { lease_id })
    }

    /// Snapshot round trip: JSON out and back must give the same state.
    pub fn assert_round_trip(&self) {
        let json = serde_json::to_string(&self.sm).expect("serialize");
        let back: Sm = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, self.sm);
    }
}

/// Right after an apply, `next_deadline` is the earliest deadline of every live lease and every
/// wait (lock and semaphore queues, and the timers of the other primitives), and it lies ahead:
/// the apply left nothing due.
pub(super) fn check_next_deadline(sm: &Sm) -> Result<(), String> {
    let leases = sm.leases.values().map(|l| l.deadline_ms);
    let locks = sm
        .locks
        .values()
        .flat_map(|k| k.queue.iter().map(|w| w.deadline_ms));
    let sems = (sm.semaphores.values()).flat_map(|s| s.queue.iter().map(|w| w.deadline_ms));
    let timers = sm.timers.iter().map(|(d, _)| *d);
    let expected = leases.chain(locks).chain(sems).chain(timers).min();
    if sm.next_deadline() != expected {
        return Err(format!(
            "next_deadline {:?}, expected {expected:?}",
            sm.next_deadline()
        ));
    }
    match expected {
        Some(d) if d <= sm.time_ms => Err(format!(
            "deadline {d} is due at {} but was left",
            sm.time_ms
        )),
        _ => Ok(()),
    }
}

/// A `deadlock` refusal is right: the cycle starts and ends at `victim`, its edges chain, every
/// edge not touching the victim is in `twin`'s wait-for graph, the new ones name leases that
/// hold or wait on the resource, and `post` is `twin` (the state after only this entry's
/// expiry) plus the recorded deadlock.
pub(super) fn check_deadlock_refusal(
    twin: &Sm,
    post: &Sm,
    victim: u64,
    rej: &Rejection,
) -> Result<(), String> {
    let c = &rej.cycle;
    if rej.code != ErrorCode::Deadlock || c.is_empty() {
        return Err(format!("not a deadlock refusal: {rej:?}"));
    }
    if c[0].lease_id != victim || c[c.len() - 1].waits_for != victim {
        return Err(format!("cycle does not start and end at {victim}: {c:?}"));
    }
    if c.windows(2).any(|w| w[0].waits_for != w[1].lease_id) {
        return Err(format!("cycle edges do not chain: {c:?}"));
    }
    // Edges not touching the victim were there before; the refused step could only add edges
    // out of the victim (it would have queued) or into it (it would have been granted ahead of
    // waiters): their other end must hold or wait on the resource.
    let graph = twin.wait_graph();
    for e in c {
        if graph.contains(e) {
            continue;
        }
        let other = match (e.lease_id == victim, e.waits_for == victim) {
            (true, _) => e.waits_for,
            (false, true) => e.lease_id,
            _ => return Err(format!("edge {e:?} is not in the wait-for graph {graph:?}")),
        };
        let involved = match e.resource.split_once(':') {
            Some(("lock", n)) => twin.locks.get(n).is_some_and(|l| {
                l.hold_of(other).is_some() || l.queue.iter().any(|w| w.lease_id == other)
            }),
            Some(("semaphore", n)) => twin.semaphores.get(n).is_some_and(|s| {
                s.holders.contains_key(&other) || s.queue.iter().any(|w| w.lease_id == other)
            }),
            _ => false,
        };
        if !involved {
            return Err(format!("{other} neither holds nor waits on {}", e.resource));
        }
    }
    match post.deadlocks.back() {
        Some(d) if d.victim == victim && &d.cycle == c => {}
        other => return Err(format!("deadlock not recorded: {other:?}")),
    }
    let mut rest = post.clone();
    rest.deadlocks = twin.deadlocks.clone();
    if &rest != twin {
        return Err("a refused wait changed the state".into());
    }
    Ok(())
}

/// The lease `policy` must pick in `cycle` when `requester`'s request (of priority
/// `priority`) closed it; other leases' priorities are their waits' in `sm`.
pub(super) fn expected_victim(sm: &Sm, cycle: &[WaitEdge], requester: u64, priority: u64) -> u64 {
    let wait_priority = |e: &WaitEdge| match e.resource.split_once(':') {
        Some(("semaphore", n)) => sm
            .semaphores
            .get(n)
            .and_then(|s| s.queue.iter().find(|w| w.lease_id == e.lease_id))
            .map_or(0, |w| w.priority),
        _ => 0,
    };
    match sm.deadlock_policy {
        DeadlockPolicy::Refuse => requester,
        DeadlockPolicy::Youngest => cycle.iter().map(|e| e.lease_id).max().unwrap(),
        DeadlockPolicy::LowestPriority => {
            let key = |e: &WaitEdge| {
                let p = if e.lease_id == requester {
                    priority
                } else {
                    wait_priority(e)
                };
                (p, std::cmp::Reverse(e.lease_id))
            };
            cycle.iter().min_by_key(|e| key(e)).unwrap().lease_id
        }
    }
}

/// A cycle of the wait-for graph: non-empty, its edges chain from `from` back to it.
fn check_chain(c: &[WaitEdge], from: u64) -> Result<(), String> {
    if c.is_empty() || c[0].lease_id != from || c[c.len() - 1].waits_for != from {
        return Err(format!("cycle does not start and end at {from}: {c:?}"));
    }
    if c.windows(2).any(|w| w[0].waits_for != w[1].lease_id) {
        return Err(format!("cycle edges do not chain: {c:?}"));
    }
    Ok(())
}

/// The victims a step of `requester` (request priority `priority`) cancelled at `index` are
/// right: each record names the requester and the policy, its cycle chains from the victim
/// through the requester and only uses edges out of or into the requester that `twin` (the
/// state before the step, after its expiry) lacks, the policy picked that victim, and the
/// victim neither waits on nor holds the resource afterwards. Returns the victims.
pub(super) fn check_victims(
    twin: &Sm,
    post: &Sm,
    requester: u64,
    priority: u64,
    index: u64,
) -> Result<Vec<u64>, String> {
    let graph = twin.wait_graph();
    let mut victims = Vec::new();
    for d in post.deadlocks.iter().filter(|d| d.index == index) {
        if d.victim == requester {
            return Err(format!("a refusal recorded for a step that stood: {d:?}"));
        }
        if d.requester != Some(requester) || d.policy != post.deadlock_policy {
            return Err(format!(
                "victim record names the wrong requester or policy: {d:?}"
            ));
        }
        if d.policy == DeadlockPolicy::Refuse {
            return Err(format!("a victim under the refuse policy: {d:?}"));
        }
        check_chain(&d.cycle, d.victim)?;
        if d.cycle[0].resource != d.resource {
            return Err(format!("the victim's edge is not on its resource: {d:?}"));
        }
        if !d.cycle.iter().any(|e| e.lease_id == requester) {
            return Err(format!("the cycle misses the requester: {d:?}"));
        }
        for e in &d.cycle {
            let new = e.lease_id == requester || e.waits_for == requester;
            if !new && !graph.contains(e) {
                return Err(format!("edge {e:?} was not in the wait-for graph"));
            }
        }
        let want = expected_victim(twin, &d.cycle, requester, priority);
        if want != d.victim {
            return Err(format!("policy should have picked {want}: {d:?}"));
        }
        let involved = match d.resource.split_once(':') {
            Some(("lock", n)) => post.locks.get(n).is_some_and(|l| {
                l.hold_of(d.victim).is_some() || l.queue.iter().any(|w| w.lease_id == d.victim)
            }),
            Some(("semaphore", n)) => post.semaphores.get(n).is_some_and(|s| {
                s.holders.contains_key(&d.victim) || s.queue.iter().any(|w| w.lease_id == d.victim)
            }),
            _ => true,
        };
        if involved {
            return Err(format!("the victim still waits on or holds {}", d.resource));
        }
        victims.push(d.victim);
    }
    Ok(victims)
}
