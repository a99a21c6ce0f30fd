//! Barriers (cyclic, with generations): `parties` leases arrive, and the arrival that makes
//! the count is the one step that releases all of them together.
//!
//! A barrier is created by its first arrival and never removed (it is a few bytes and its
//! generation counter must never go back). It is always in its *open* generation (1 for a new
//! barrier). The first arrival of a generation fixes its `parties`; every later arrival must
//! name the same number (otherwise `conflict`, nothing changes). When the `parties`-th lease
//! arrives, every waiting lease and the arriving one are released in that entry (their token is
//! its log index), the generation advances by one and `parties` is free again. A waiter whose
//! deadline passes or whose lease ends leaves the generation: it no longer counts, and a
//! departure never releases anyone. When the last waiter leaves, `parties` is free again but
//! the generation does not advance (nothing was released).
//!
//! A blocked HTTP call learns its outcome from the replicated state, not from a message: each
//! live lease keeps a record of the last generation it passed (`passed`, dropped when the lease
//! ends), so the call that joined generation `g` sees "passed `g`" however late it looks, as long
//! as the lease has not passed a later generation since (only the last pass is kept).
//!
//! Invariants: `parties` is 0 exactly when nobody waits, else 1..=`MAX_PARTIES`; fewer than
//! `parties` leases wait (the last arrival releases in the same step); every waiting or passed
//! lease is alive and lists the barrier in its parts; every waiter has its timer; passed
//! generations are older than the open one; the last release is the generation before the
//! open one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{lease_not_found, ErrorCode, Kind, Response, Sm, MAX_WAIT_MS};

/// Most parties a barrier or double barrier generation may have.
pub const MAX_PARTIES: u64 = 10_000;

/// A lease waiting at a barrier (or to enter, or to leave, a double barrier).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BarrierWaiter {
    pub since_ms: u64,
    pub deadline_ms: u64,
    /// Log index of the arriving entry (arrival order).
    pub seq: u64,
}

/// The last generation a lease passed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BarrierPass {
    pub generation: u64,
    pub parties: u64,
    /// Log index of the releasing entry.
    pub token: u64,
}

/// A generation's release: what `GET` shows as the last one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BarrierRelease {
    pub generation: u64,
    pub parties: u64,
    /// Log index of the releasing entry.
    pub token: u64,
    pub time_ms: u64,
    /// The leases released, by id.
    pub leases: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Barrier {
    /// The open generation; advances by one per release, never goes back.
    pub generation: u64,
    /// Parties of the open generation, fixed by its first arrival; 0 while nobody waits.
    pub parties: u64,
    /// Leases waiting in the open generation.
    pub waiting: BTreeMap<u64, BarrierWaiter>,
    /// The last generation each live lease passed.
    pub passed: BTreeMap<u64, BarrierPass>,
    pub last_release: Option<BarrierRelease>,
}

impl Barrier {
    fn new() -> Barrier {
        Barrier {
            generation: 1,
            parties: 0,
            waiting: BTreeMap::new(),
            passed: BTreeMap::new(),
            last_release: None,
        }
    }
}

/// `parties` and `wait_ms` in range (shared with double barriers).
pub(super) fn check_wait_args(parties: u64, wait_ms: u64) -> Option<Response> {
    if parties == 0 || parties > MAX_PARTIES {
        return Some(Response::reject(
            ErrorCode::InvalidArgument,
            format!("parties must be 1 to {MAX_PARTIES}, got {parties}"),
        ));
    }
    if wait_ms == 0 || wait_ms > MAX_WAIT_MS {
        return Some(Response::reject(
            ErrorCode::InvalidArgument,
            format!("wait_ms must be 1 to {MAX_WAIT_MS}, got {wait_ms}"),
        ));
    }
    None
}

impl Sm {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn barrier_wait(
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
            return Response::reject(ErrorCode::InvalidArgument, "barrier name must not be empty");
        }
        if let Some(r) = check_wait_args(parties, wait_ms) {
            return r;
        }
        if !self.leases.contains_key(&lease_id) {
            return lease_not_found(lease_id);
        }
        let b = self.barriers.get(name);
        let open = b.map_or(1, |b| b.generation);
        match generation {
            Some(g) if g == 0 || g > open => {
                return Response::reject(
                    ErrorCode::InvalidArgument,
                    format!("generation {g} of barrier {name} has not begun (it is at {open})"),
                )
            }
            // Asking for a generation that is over: the answer is whether this lease passed it.
            Some(g) if g < open => {
                return match b.and_then(|b| b.passed.get(&lease_id)) {
                    Some(p) if p.generation == g => Response::BarrierReleased {
                        generation: g,
                        parties: p.parties,
                        token: p.token,
                    },
                    // Only the last pass of a lease is kept.
                    Some(p) if p.generation > g => Response::reject(
                        ErrorCode::Conflict,
                        format!(
                            "lease {lease_id} has passed generation {} of barrier {name} since; the outcome of generation {g} is no longer kept",
                            p.generation
                        ),
                    ),
                    _ => Response::reject(
                        ErrorCode::Conflict,
                        format!(
                            "generation {g} of barrier {name} is over and lease {lease_id} was not released in it"
                        ),
                    ),
                };
            }
            _ => {}
        }
        if let Some(b) = b {
            if !b.waiting.is_empty() && b.parties != parties {
                return Response::reject(
                    ErrorCode::Conflict,
                    format!(
                        "generation {} of barrier {name} waits for {} parties, not {parties}",
                        b.generation, b.parties
                    ),
                );
            }
            // Already waiting in this generation: the same wait, resumed.
            if b.waiting.contains_key(&lease_id) {
                return Response::BarrierWaiting {
                    generation: b.generation,
                    arrived: b.waiting.len() as u64,
                    parties,
                };
            }
        }
        let b = self
            .barriers
            .entry(name.to_string())
            .or_insert_with(Barrier::new);
        b.parties = parties;
        let w = BarrierWaiter {
            since_ms: now,
            deadline_ms: now + wait_ms,
            seq: index,
        };
        b.waiting.insert(lease_id, w.clone());
        let g = b.generation;
        let arrived = b.waiting.len() as u64;
        self.join_part(lease_id, Kind::Barrier, name);
        self.emit(
            "barrier",
            name,
            "arrived",
            json!({"lease_id": lease_id, "generation": g, "arrived": arrived, "parties": parties}),
        );
        if arrived == parties {
            self.barrier_release(index, now, name);
            return Response::BarrierReleased {
                generation: g,
                parties,
                token: index,
            };
        }
        self.add_timer(w.deadline_ms, Kind::Barrier, name, lease_id);
        Response::BarrierWaiting {
            generation: g,
            arrived,
            parties,
        }
    }

    /// Release every waiter of the open generation with token `index` and open the next.
    fn barrier_release(&mut self, index: u64, now: u64, name: &str) {
        let Some(b) = self.barriers.get_mut(name) else {
            return;
        };
        let waiting = std::mem::take(&mut b.waiting);
        let (g, parties) = (b.generation, b.parties);
        b.generation += 1;
        b.parties = 0;
        for id in waiting.keys() {
            let pass = BarrierPass {
                generation: g,
                parties,
                token: index,
            };
            b.passed.insert(*id, pass);
        }
        let leases: Vec<u64> = waiting.keys().copied().collect();
        b.last_release = Some(BarrierRelease {
            generation: g,
            parties,
            token: index,
            time_ms: now,
            leases: leases.clone(),
        });
        for (id, w) in &waiting {
            self.remove_timer(w.deadline_ms, Kind::Barrier, name, *id);
        }
        self.emit(
            "barrier",
            name,
            "released",
            json!({"generation": g, "parties": parties, "token": index, "leases": leases}),
        );
    }

    /// Take `lease_id` out of the open generation (timeout or lease end); returns whether it
    /// was waiting.
    fn barrier_leave(&mut self, name: &str, lease_id: u64, reason: &str) -> bool {
        let Some(b) = self.barriers.get_mut(name) else {
            return false;
        };
        let Some(w) = b.waiting.remove(&lease_id) else {
            return false;
        };
        if b.waiting.is_empty() {
            b.parties = 0;
        }
        let g = b.generation;
        self.remove_timer(w.deadline_ms, Kind::Barrier, name, lease_id);
        self.emit(
            "barrier",
            name,
            "left",
            json!({"lease_id": lease_id, "generation": g, "reason": reason}),
        );
        true
    }

    /// The wait deadline of `lease_id` passed: it leaves the open generation.
    pub(super) fn barrier_timer(&mut self, _index: u64, name: &str, lease_id: u64) {
        self.barrier_leave(name, lease_id, "timeout");
        if !self.barrier_mentions(name, lease_id) {
            self.leave_part(lease_id, Kind::Barrier, name);
        }
    }

    /// The lease ended: it leaves the open generation and its pass record goes.
    pub(super) fn barrier_lease_ended(&mut self, _index: u64, name: &str, lease_id: u64) {
        self.barrier_leave(name, lease_id, "lease_ended");
        if let Some(b) = self.barriers.get_mut(name) {
            b.passed.remove(&lease_id);
        }
    }

    pub(super) fn barrier_mentions(&self, name: &str, lease_id: u64) -> bool {
        self.barriers
            .get(name)
            .is_some_and(|b| b.waiting.contains_key(&lease_id) || b.passed.contains_key(&lease_id))
    }

    /// Check invariants; returns how many timers this primitive expects in `timers`.
    pub(super) fn check_barriers(&self) -> Result<usize, String> {
        let mut timers = 0;
        for (name, b) in &self.barriers {
            if b.generation == 0 {
                return Err(format!("barrier {name} is at generation 0"));
            }
            if b.waiting.is_empty() != (b.parties == 0) || b.parties > MAX_PARTIES {
                return Err(format!(
                    "barrier {name}: {} waiting with parties {}",
                    b.waiting.len(),
                    b.parties
                ));
            }
            if !b.waiting.is_empty() && b.waiting.len() as u64 >= b.parties {
                return Err(format!(
                    "barrier {name}: {} of {} parties arrived but not released",
                    b.waiting.len(),
                    b.parties
                ));
            }
            let last = b.last_release.as_ref().map(|r| r.generation);
            if last.unwrap_or(0) + 1 != b.generation {
                return Err(format!(
                    "barrier {name} at generation {} last released {last:?}",
                    b.generation
                ));
            }
            for (id, w) in &b.waiting {
                self.check_part_lease(Kind::Barrier, name, *id)?;
                if w.deadline_ms <= w.since_ms || w.seq > self.index {
                    return Err(format!("waiter {id} of barrier {name} is malformed: {w:?}"));
                }
                self.check_timer(w.deadline_ms, Kind::Barrier, name, *id)?;
                timers += 1;
            }
            for (id, p) in &b.passed {
                self.check_part_lease(Kind::Barrier, name, *id)?;
                if p.generation >= b.generation || p.token > self.index || p.parties == 0 {
                    return Err(format!(
                        "pass of {id} at barrier {name} is malformed: {p:?}"
                    ));
                }
            }
        }
        Ok(timers)
    }

    /// `lease_id` is alive and lists `kind`/`name` in its parts.
    pub(super) fn check_part_lease(
        &self,
        kind: Kind,
        name: &str,
        lease_id: u64,
    ) -> Result<(), String> {
        match self.leases.get(&lease_id) {
            Some(l) if l.parts.contains(&(kind, name.to_string())) => Ok(()),
            Some(_) => Err(format!(
                "lease {lease_id} in {} {name} does not list it in its parts",
                kind.as_str()
            )),
            None => Err(format!("dead lease {lease_id} in {} {name}", kind.as_str())),
        }
    }

    pub(super) fn check_timer(
        &self,
        deadline_ms: u64,
        kind: Kind,
        name: &str,
        lease_id: u64,
    ) -> Result<(), String> {
        let t = super::Timer {
            kind,
            name: name.to_string(),
            lease_id,
        };
        if self.timers.contains(&(deadline_ms, t)) {
            Ok(())
        } else {
            Err(format!(
                "waiter {lease_id} of {} {name} has no timer at {deadline_ms}",
                kind.as_str()
            ))
        }
    }
}
