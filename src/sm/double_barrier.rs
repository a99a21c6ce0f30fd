//! Double barriers: `parties` leases enter together, and none is released from leave until
//! every lease that entered with it has left.
//!
//! A double barrier is in one of three phases, always in its open generation (1 for a new one):
//!
//! - *idle*: nobody waits or is inside; `parties` is 0.
//! - *entering*: leases wait to enter; the first fixed `parties` and every other must name the
//!   same number (otherwise `conflict`). The `parties`-th arrival admits all of them in its own
//!   entry (their enter token is its log index) and the phase becomes *inside*. A waiter whose
//!   deadline passes or whose lease ends drops out of the entry set and never counts.
//! - *inside*: the admitted leases are in the room. Entering is refused (`conflict`) until the
//!   room is empty. A member that calls leave is *leaving*: it waits for the others. When no
//!   member is still inside without leaving, every leaving member is released in that one
//!   step (their leave token is its log index), the generation advances and the phase is idle
//!   again. A member whose lease ends counts as having left (so nobody waits for a dead agent);
//!   a leaving member whose own wait deadline passes stops waiting (its call answers
//!   `timeout`) and is gone from the room, which never holds the others back because it had
//!   already left.
//!
//! Leave never returns early: the release is decided only by the room having no member that
//! is neither leaving nor dead, in the replicated state, in one apply step (the Curator recipe
//! could let a leave return while a member was still inside).
//!
//! Invariants: `parties` is 0 exactly when idle, else 1..=`MAX_PARTIES`; never both entering
//! and inside; fewer than `parties` wait to enter; at most `parties` are inside, and at least
//! one of them has not called leave; every lease in it is alive and lists it in its parts;
//! every entering waiter and leaving member has its timer; passes are of older generations.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::barrier::{check_wait_args, BarrierRelease, BarrierWaiter, MAX_PARTIES};
use super::{lease_not_found, ErrorCode, Kind, Response, Sm};

/// A lease inside a double barrier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DoubleBarrierMember {
    /// Log index of the admitting entry.
    pub token: u64,
    /// Set once the lease calls leave: it waits for the others until this deadline.
    pub leaving: Option<BarrierWaiter>,
}

/// The last generation a lease entered and left with everyone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DoubleBarrierPass {
    pub generation: u64,
    pub parties: u64,
    /// Log index of the admitting entry.
    pub enter_token: u64,
    /// Log index of the releasing entry.
    pub leave_token: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DoubleBarrier {
    /// The open generation; advances by one each time the room empties.
    pub generation: u64,
    /// Parties of the open generation; 0 while idle.
    pub parties: u64,
    /// Leases waiting to enter the open generation (only while nobody is inside).
    pub entering: BTreeMap<u64, BarrierWaiter>,
    /// Leases inside the open generation.
    pub inside: BTreeMap<u64, DoubleBarrierMember>,
    /// The last generation each live lease passed (entered and left with everyone).
    pub passed: BTreeMap<u64, DoubleBarrierPass>,
    /// The last release (the room emptied); `leases` are those released from leave.
    pub last_release: Option<BarrierRelease>,
}

impl DoubleBarrier {
    fn new() -> DoubleBarrier {
        DoubleBarrier {
            generation: 1,
            parties: 0,
            entering: BTreeMap::new(),
            inside: BTreeMap::new(),
            passed: BTreeMap::new(),
            last_release: None,
        }
    }

    /// Members inside that have not called leave.
    pub fn remaining(&self) -> u64 {
        self.inside.values().filter(|m| m.leaving.is_none()).count() as u64
    }
}

const KIND: &str = "double_barrier";

impl Sm {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn double_barrier_enter(
        &mut self,
        index: u64,
        now: u64,
        name: &str,
        lease_id: u64,
        parties: u64,
        wait_ms: u64,
        generation: Option<u64>,
    ) -> Response {
        if name.is_empty() {
            return Response::reject(
                ErrorCode::InvalidArgument,
                "double barrier name must not be empty",
            );
        }
        if let Some(r) = check_wait_args(parties, wait_ms) {
            return r;
        }
        if !self.leases.contains_key(&lease_id) {
            return lease_not_found(lease_id);
        }
        let db = self.double_barriers.get(name);
        let open = db.map_or(1, |d| d.generation);
        match generation {
            Some(g) if g == 0 || g > open => {
                return Response::reject(
                    ErrorCode::InvalidArgument,
                    format!(
                        "generation {g} of double barrier {name} has not begun (it is at {open})"
                    ),
                )
            }
            Some(g) if g < open => {
                return match db.and_then(|d| d.passed.get(&lease_id)) {
                    Some(p) if p.generation == g => Response::DoubleBarrierEntered {
                        generation: g,
                        parties: p.parties,
                        token: p.enter_token,
                    },
                    Some(p) if p.generation > g => Response::reject(
                        ErrorCode::Conflict,
                        format!(
                            "lease {lease_id} has passed generation {} of double barrier {name} since; the outcome of generation {g} is no longer kept",
                            p.generation
                        ),
                    ),
                    _ => Response::reject(
                        ErrorCode::Conflict,
                        format!(
                            "generation {g} of double barrier {name} is over and lease {lease_id} did not pass it"
                        ),
                    ),
                };
            }
            _ => {}
        }
        if let Some(d) = db {
            let busy = !d.entering.is_empty() || !d.inside.is_empty();
            if busy && d.parties != parties {
                return Response::reject(
                    ErrorCode::Conflict,
                    format!(
                        "generation {} of double barrier {name} has {} parties, not {parties}",
                        d.generation, d.parties
                    ),
                );
            }
            // Already inside, or already waiting to enter: the same enter, resumed.
            if let Some(m) = d.inside.get(&lease_id) {
                return Response::DoubleBarrierEntered {
                    generation: d.generation,
                    parties,
                    token: m.token,
                };
            }
            if !d.inside.is_empty() {
                return Response::reject(
                    ErrorCode::Conflict,
                    format!(
                        "double barrier {name} is in use: generation {} has {} leases inside; enter after they have all left",
                        d.generation,
                        d.inside.len()
                    ),
                );
            }
            if d.entering.contains_key(&lease_id) {
                return Response::DoubleBarrierEntering {
                    generation: d.generation,
                    arrived: d.entering.len() as u64,
                    parties,
                };
            }
        }
        let d = self
            .double_barriers
            .entry(name.to_string())
            .or_insert_with(DoubleBarrier::new);
        d.parties = parties;
        let w = BarrierWaiter {
            since_ms: now,
            deadline_ms: now + wait_ms,
            seq: index,
        };
        d.entering.insert(lease_id, w.clone());
        let g = d.generation;
        let arrived = d.entering.len() as u64;
        self.join_part(lease_id, Kind::DoubleBarrier, name);
        self.emit(
            KIND,
            name,
            "arrived",
            json!({"lease_id": lease_id, "generation": g, "arrived": arrived, "parties": parties}),
        );
        if arrived < parties {
            self.add_timer(w.deadline_ms, Kind::DoubleBarrier, name, lease_id);
            return Response::DoubleBarrierEntering {
                generation: g,
                arrived,
                parties,
            };
        }
        // The last party: everyone enters in this step.
        let Some(d) = self.double_barriers.get_mut(name) else {
            return Response::Done;
        };
        let entering = std::mem::take(&mut d.entering);
        for id in entering.keys() {
            let m = DoubleBarrierMember {
                token: index,
                leaving: None,
            };
            d.inside.insert(*id, m);
        }
        for (id, w) in &entering {
            self.remove_timer(w.deadline_ms, Kind::DoubleBarrier, name, *id);
        }
        let leases: Vec<u64> = entering.keys().copied().collect();
        self.emit(
            KIND,
            name,
            "entered",
            json!({"generation": g, "parties": parties, "token": index, "leases": leases}),
        );
        Response::DoubleBarrierEntered {
            generation: g,
            parties,
            token: index,
        }
    }

    pub(super) fn double_barrier_leave(
        &mut self,
        index: u64,
        now: u64,
        name: &str,
        lease_id: u64,
        parties: Option<u64>,
        wait_ms: u64,
    ) -> Response {
        if name.is_empty() {
            return Response::reject(
                ErrorCode::InvalidArgument,
                "double barrier name must not be empty",
            );
        }
        if let Some(r) = check_wait_args(parties.unwrap_or(1), wait_ms) {
            return r;
        }
        if !self.leases.contains_key(&lease_id) {
            return lease_not_found(lease_id);
        }
        let Some(d) = self.double_barriers.get_mut(name) else {
            return Response::reject(
                ErrorCode::NotFound,
                format!("double barrier {name} does not exist"),
            );
        };
        let mismatch = |actual: u64| match parties {
            Some(p) if p != actual => Some(Response::reject(
                ErrorCode::Conflict,
                format!("double barrier {name} generation has {actual} parties, not {p}"),
            )),
            _ => None,
        };
        let g = d.generation;
        let Some(m) = d.inside.get(&lease_id) else {
            if d.entering.contains_key(&lease_id) {
                return Response::reject(
                    ErrorCode::Conflict,
                    format!(
                        "lease {lease_id} has not entered double barrier {name} yet (it waits to enter generation {g})"
                    ),
                );
            }
            // Everyone left already: the same leave, answered again.
            return match d.passed.get(&lease_id) {
                Some(p) => mismatch(p.parties).unwrap_or(Response::DoubleBarrierLeft {
                    generation: p.generation,
                    parties: p.parties,
                    token: p.leave_token,
                }),
                None => Response::reject(
                    ErrorCode::Conflict,
                    format!("lease {lease_id} is not inside double barrier {name}"),
                ),
            };
        };
        if let Some(r) = mismatch(d.parties) {
            return r;
        }
        let parties = d.parties;
        if m.leaving.is_some() {
            return Response::DoubleBarrierLeaving {
                generation: g,
                remaining: d.remaining(),
                parties,
            };
        }
        let w = BarrierWaiter {
            since_ms: now,
            deadline_ms: now + wait_ms,
            seq: index,
        };
        if let Some(m) = d.inside.get_mut(&lease_id) {
            m.leaving = Some(w.clone());
        }
        let remaining = d.remaining();
        self.emit(
            KIND,
            name,
            "leaving",
            json!({"lease_id": lease_id, "generation": g, "remaining": remaining}),
        );
        if remaining > 0 {
            self.add_timer(w.deadline_ms, Kind::DoubleBarrier, name, lease_id);
            return Response::DoubleBarrierLeaving {
                generation: g,
                remaining,
                parties,
            };
        }
        self.double_barrier_settle(index, now, name);
        Response::DoubleBarrierLeft {
            generation: g,
            parties,
            token: index,
        }
    }

    /// If nobody is inside without leaving, release every leaving member with token `index`
    /// and open the next generation. Only called while the room is (or just was) occupied.
    fn double_barrier_settle(&mut self, index: u64, now: u64, name: &str) {
        // Members whose lease is due at the instant being expired (dead, its end not processed
        // yet) count as having left: none of them is released.
        let dead: Vec<u64> = (self.double_barriers.get(name).into_iter())
            .flat_map(|d| d.inside.keys().copied())
            .filter(|id| !self.leases.contains_key(id))
            .collect();
        for id in dead {
            self.double_barrier_remove_member(name, id, "lease_ended");
        }
        let Some(d) = self.double_barriers.get_mut(name) else {
            return;
        };
        if !d.entering.is_empty() || d.remaining() > 0 {
            return;
        }
        let inside = std::mem::take(&mut d.inside);
        let (g, parties) = (d.generation, d.parties);
        d.generation += 1;
        d.parties = 0;
        for (id, m) in &inside {
            let pass = DoubleBarrierPass {
                generation: g,
                parties,
                enter_token: m.token,
                leave_token: index,
            };
            d.passed.insert(*id, pass);
        }
        let leases: Vec<u64> = inside.keys().copied().collect();
        d.last_release = Some(BarrierRelease {
            generation: g,
            parties,
            token: index,
            time_ms: now,
            leases: leases.clone(),
        });
        for (id, m) in &inside {
            if let Some(w) = &m.leaving {
                self.remove_timer(w.deadline_ms, Kind::DoubleBarrier, name, *id);
            }
        }
        self.emit(
            KIND,
            name,
            "released",
            json!({"generation": g, "parties": parties, "token": index, "leases": leases}),
        );
    }

    /// Take `lease_id` out of the entry set or the room (deadline or lease end), releasing the
    /// leaving members if it was the last one they waited for.
    fn double_barrier_drop(&mut self, index: u64, name: &str, lease_id: u64, reason: &str) {
        let now = self.time_ms;
        let Some(d) = self.double_barriers.get_mut(name) else {
            return;
        };
        let g = d.generation;
        if let Some(w) = d.entering.remove(&lease_id) {
            if d.entering.is_empty() {
                d.parties = 0;
            }
            self.remove_timer(w.deadline_ms, Kind::DoubleBarrier, name, lease_id);
            self.emit(
                KIND,
                name,
                "left",
                json!({"lease_id": lease_id, "generation": g, "reason": reason, "phase": "entering"}),
            );
        } else if self.double_barrier_remove_member(name, lease_id, reason) {
            self.double_barrier_settle(index, now, name);
        }
    }

    /// Take `lease_id` out of the room (no release); returns whether it was inside.
    fn double_barrier_remove_member(&mut self, name: &str, lease_id: u64, reason: &str) -> bool {
        let Some(d) = self.double_barriers.get_mut(name) else {
            return false;
        };
        let Some(m) = d.inside.remove(&lease_id) else {
            return false;
        };
        let g = d.generation;
        // A stale pass would answer a later leave for a generation it did not finish.
        d.passed.remove(&lease_id);
        let phase = match &m.leaving {
            Some(w) => {
                self.remove_timer(w.deadline_ms, Kind::DoubleBarrier, name, lease_id);
                "leaving"
            }
            None => "inside",
        };
        self.emit(
            KIND,
            name,
            "left",
            json!({"lease_id": lease_id, "generation": g, "reason": reason, "phase": phase}),
        );
        true
    }

    /// The wait deadline of `lease_id` passed (to enter, or for the others to leave).
    pub(super) fn double_barrier_timer(&mut self, index: u64, name: &str, lease_id: u64) {
        self.double_barrier_drop(index, name, lease_id, "timeout");
        if !self.double_barrier_mentions(name, lease_id) {
            self.leave_part(lease_id, Kind::DoubleBarrier, name);
        }
    }

    /// The lease ended: it leaves the entry set or the room (counting as having left).
    pub(super) fn double_barrier_lease_ended(&mut self, index: u64, name: &str, lease_id: u64) {
        self.double_barrier_drop(index, name, lease_id, "lease_ended");
        if let Some(d) = self.double_barriers.get_mut(name) {
            d.passed.remove(&lease_id);
        }
    }

    pub(super) fn double_barrier_mentions(&self, name: &str, lease_id: u64) -> bool {
        self.double_barriers.get(name).is_some_and(|d| {
            d.entering.contains_key(&lease_id)
                || d.inside.contains_key(&lease_id)
                || d.passed.contains_key(&lease_id)
        })
    }

    /// Check invariants; returns how many timers this primitive expects in `timers`.
    pub(super) fn check_double_barriers(&self) -> Result<usize, String> {
        let mut timers = 0;
        for (name, d) in &self.double_barriers {
            let idle = d.entering.is_empty() && d.inside.is_empty();
            if d.generation == 0 || idle != (d.parties == 0) || d.parties > MAX_PARTIES {
                return Err(format!(
                    "double barrier {name}: generation {} parties {} idle {idle}",
                    d.generation, d.parties
                ));
            }
            if !d.entering.is_empty() && !d.inside.is_empty() {
                return Err(format!("double barrier {name} is entering and occupied"));
            }
            if !d.entering.is_empty() && d.entering.len() as u64 >= d.parties {
                return Err(format!(
                    "double barrier {name}: {} of {} parties wait to enter",
                    d.entering.len(),
                    d.parties
                ));
            }
            if d.inside.len() as u64 > d.parties {
                return Err(format!(
                    "double barrier {name}: {} inside of {} parties",
                    d.inside.len(),
                    d.parties
                ));
            }
            if !d.inside.is_empty() && d.remaining() == 0 {
                return Err(format!(
                    "double barrier {name}: everyone left but nobody was released"
                ));
            }
            let last = d.last_release.as_ref().map(|r| r.generation);
            if last.unwrap_or(0) + 1 != d.generation {
                return Err(format!(
                    "double barrier {name} at generation {} last released {last:?}",
                    d.generation
                ));
            }
            for (id, w) in &d.entering {
                self.check_part_lease(Kind::DoubleBarrier, name, *id)?;
                if w.deadline_ms <= w.since_ms || w.seq > self.index {
                    return Err(format!("entering {id} of {name} is malformed: {w:?}"));
                }
                self.check_timer(w.deadline_ms, Kind::DoubleBarrier, name, *id)?;
                timers += 1;
            }
            for (id, m) in &d.inside {
                self.check_part_lease(Kind::DoubleBarrier, name, *id)?;
                if m.token > self.index {
                    return Err(format!("member {id} of {name} is malformed: {m:?}"));
                }
                if let Some(w) = &m.leaving {
                    if w.deadline_ms <= w.since_ms || w.seq > self.index || w.seq < m.token {
                        return Err(format!("member {id} of {name} is malformed: {m:?}"));
                    }
                    self.check_timer(w.deadline_ms, Kind::DoubleBarrier, name, *id)?;
                    timers += 1;
                }
            }
            for (id, p) in &d.passed {
                self.check_part_lease(Kind::DoubleBarrier, name, *id)?;
                let bad = p.generation >= d.generation
                    || p.leave_token > self.index
                    || p.enter_token > p.leave_token
                    || p.parties == 0;
                if bad {
                    return Err(format!("pass of {id} at {name} is malformed: {p:?}"));
                }
            }
        }
        Ok(timers)
    }
}
