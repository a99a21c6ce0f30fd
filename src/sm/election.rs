//! Leader elections: one leader per election name, chosen among live leases, with a FIFO line
//! of candidates and a fencing token per term of office.
//!
//! A campaign makes its lease the leader at once when nobody leads; otherwise it joins the end
//! of the candidate line (or, with `wait_ms` 0, is rejected with `lock_held`). When the leader
//! resigns or its lease ends, the first candidate becomes leader in that same apply step, with
//! the entry's log index as its token and its own campaign value. A candidate leaves the line
//! when its wait deadline passes (timer), its lease ends, or it resigns (withdraws).
//!
//! Tokens: every election of a leader is made by a later entry than the previous one, so the
//! tokens of the leaders one can observe between entries strictly increase. One entry can
//! elect a leader and unseat it again (two leases expiring in one step, or an expiry that
//! promotes the lease whose own resign is the entry's command); every leader elected in that
//! entry carries the entry's index, but only the last one is ever visible in the state.
//!
//! Invariants (checked by `check_elections`): a stored election has a leader (an election with
//! no leader has no candidates, and is removed); the leader and every candidate are live
//! leases whose `parts` name the election; a lease is at most once in an election; candidates
//! are in arrival order, each with exactly one timer; values are within `MAX_ELECTION_VALUE`.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{lease_not_found, ErrorCode, Kind, Rejection, Response, Sm, MAX_WAIT_MS};

/// Largest leader value, in bytes.
pub const MAX_ELECTION_VALUE: usize = 64 * 1024;
/// Longest candidate line of one election.
pub const MAX_CANDIDATES: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ElectionLeader {
    pub lease_id: u64,
    pub value: String,
    /// Log index of the entry that elected it.
    pub token: u64,
    /// Log time of that entry.
    pub since_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    pub lease_id: u64,
    /// The value it will lead with.
    pub value: String,
    pub since_ms: u64,
    pub deadline_ms: u64,
    /// Index of the entry that queued it (arrival order).
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Election {
    pub leader: ElectionLeader,
    /// In arrival order: the first one is next.
    pub candidates: Vec<Candidate>,
}

const KIND: &str = "election";

impl Sm {
    pub(super) fn election_campaign(
        &mut self,
        index: u64,
        now: u64,
        name: &str,
        lease_id: u64,
        value: &str,
        wait_ms: u64,
    ) -> Response {
        if let Err(r) = check_election_args(name, value) {
            return r;
        }
        if wait_ms > MAX_WAIT_MS {
            return Response::reject(
                ErrorCode::InvalidArgument,
                format!("wait_ms must be at most {MAX_WAIT_MS}"),
            );
        }
        if !self.leases.contains_key(&lease_id) {
            return lease_not_found(lease_id);
        }
        let Some(e) = self.elections.get_mut(name) else {
            let leader = ElectionLeader {
                lease_id,
                value: value.to_string(),
                token: index,
                since_ms: now,
            };
            let r = elected(&leader);
            self.elections.insert(
                name.to_string(),
                Election {
                    leader,
                    candidates: Vec::new(),
                },
            );
            self.join_part(lease_id, Kind::Election, name);
            self.emit(
                KIND,
                name,
                "elected",
                json!({"lease_id": lease_id, "token": index, "value": value}),
            );
            return r;
        };
        // Campaigning again while leading is idempotent: same term, same token, same value.
        if e.leader.lease_id == lease_id {
            return elected(&e.leader);
        }
        // Already in line: resume that wait (its deadline does not move).
        if let Some(pos) = e.candidates.iter().position(|c| c.lease_id == lease_id) {
            return Response::ElectionQueued {
                position: pos as u64 + 1,
            };
        }
        if wait_ms == 0 {
            return Response::Rejected(Rejection {
                current_token: Some(e.leader.token),
                ..Rejection::new(
                    ErrorCode::LockHeld,
                    format!("election {name} is led by lease {}", e.leader.lease_id),
                )
            });
        }
        if e.candidates.len() >= MAX_CANDIDATES {
            return Response::reject(
                ErrorCode::ResourceExhausted,
                format!("election {name} already has {MAX_CANDIDATES} candidates"),
            );
        }
        let deadline_ms = now + wait_ms;
        e.candidates.push(Candidate {
            lease_id,
            value: value.to_string(),
            since_ms: now,
            deadline_ms,
            seq: index,
        });
        let position = e.candidates.len() as u64;
        self.add_timer(deadline_ms, Kind::Election, name, lease_id);
        self.join_part(lease_id, Kind::Election, name);
        self.emit(
            KIND,
            name,
            "campaigning",
            json!({"lease_id": lease_id, "position": position, "deadline_ms": deadline_ms}),
        );
        Response::ElectionQueued { position }
    }

    pub(super) fn election_proclaim(&mut self, name: &str, lease_id: u64, value: &str) -> Response {
        if let Err(r) = check_election_args(name, value) {
            return r;
        }
        if !self.leases.contains_key(&lease_id) {
            return lease_not_found(lease_id);
        }
        let Some(e) = self
            .elections
            .get_mut(name)
            .filter(|e| e.leader.lease_id == lease_id)
        else {
            return not_leader(name, lease_id);
        };
        e.leader.value = value.to_string();
        let token = e.leader.token;
        self.emit(
            KIND,
            name,
            "proclaimed",
            json!({"lease_id": lease_id, "token": token, "value": value}),
        );
        Response::Proclaimed { token }
    }

    /// The leader steps down (the next candidate takes over in this step), or a candidate
    /// leaves the line.
    pub(super) fn election_resign(&mut self, index: u64, name: &str, lease_id: u64) -> Response {
        if name.is_empty() {
            return Response::reject(
                ErrorCode::InvalidArgument,
                "election name must not be empty",
            );
        }
        if !self.leases.contains_key(&lease_id) {
            return lease_not_found(lease_id);
        }
        let Some(e) = self.elections.get(name) else {
            return not_leader(name, lease_id);
        };
        if e.leader.lease_id == lease_id {
            self.leave_part(lease_id, Kind::Election, name);
            let next = self.election_step_down(index, name, "resigned");
            return Response::Resigned {
                was_leader: true,
                next_leader: next.as_ref().map(|l| l.0),
                token: next.map(|l| l.1),
            };
        }
        if e.candidates.iter().any(|c| c.lease_id == lease_id) {
            self.election_unqueue(name, lease_id, "withdrawn");
            self.leave_part(lease_id, Kind::Election, name);
            return Response::Resigned {
                was_leader: false,
                next_leader: None,
                token: None,
            };
        }
        not_leader(name, lease_id)
    }

    /// Remove the leader (already detached from its lease) and elect the first candidate with
    /// token `index`, or drop the election if nobody waits. Returns the new (leader, token).
    fn election_step_down(&mut self, index: u64, name: &str, reason: &str) -> Option<(u64, u64)> {
        let now = self.time_ms;
        self.election_drop_dead_candidates(name);
        let e = self.elections.get_mut(name)?;
        let old = e.leader.lease_id;
        let next = if e.candidates.is_empty() {
            None
        } else {
            Some(e.candidates.remove(0))
        };
        let Some(c) = next else {
            self.elections.remove(name);
            self.emit(
                KIND,
                name,
                "resigned",
                json!({"lease_id": old, "reason": reason, "next_leader": null}),
            );
            return None;
        };
        e.leader = ElectionLeader {
            lease_id: c.lease_id,
            value: c.value,
            token: index,
            since_ms: now,
        };
        let value = e.leader.value.clone();
        self.remove_timer(c.deadline_ms, Kind::Election, name, c.lease_id);
        self.emit(
            KIND,
            name,
            "resigned",
            json!({"lease_id": old, "reason": reason, "next_leader": c.lease_id}),
        );
        self.emit(
            KIND,
            name,
            "elected",
            json!({"lease_id": c.lease_id, "token": index, "value": value}),
        );
        Some((c.lease_id, index))
    }

    /// Take out of the line the candidates whose lease is due at the instant being expired (dead,
    /// its end not processed yet, like the leader's): they cannot lead.
    fn election_drop_dead_candidates(&mut self, name: &str) {
        let dead: Vec<u64> = (self.elections.get(name).into_iter())
            .flat_map(|e| e.candidates.iter().map(|c| c.lease_id))
            .filter(|id| !self.leases.contains_key(id))
            .collect();
        for id in dead {
            self.election_unqueue(name, id, "lease_ended");
        }
    }

    /// Take a candidate out of the line (and its timer, if still indexed).
    fn election_unqueue(&mut self, name: &str, lease_id: u64, reason: &str) {
        let Some(e) = self.elections.get_mut(name) else {
            return;
        };
        let Some(pos) = e.candidates.iter().position(|c| c.lease_id == lease_id) else {
            return;
        };
        let c = e.candidates.remove(pos);
        self.remove_timer(c.deadline_ms, Kind::Election, name, lease_id);
        self.emit(
            KIND,
            name,
            "left",
            json!({"lease_id": lease_id, "reason": reason}),
        );
    }

    pub(super) fn election_timer(&mut self, _index: u64, name: &str, lease_id: u64) {
        self.election_unqueue(name, lease_id, "timeout");
        self.leave_part(lease_id, Kind::Election, name);
    }

    pub(super) fn election_lease_ended(&mut self, index: u64, name: &str, lease_id: u64) {
        let Some(e) = self.elections.get(name) else {
            return;
        };
        if e.leader.lease_id == lease_id {
            self.election_step_down(index, name, "lease_ended");
        } else {
            self.election_unqueue(name, lease_id, "lease_ended");
        }
    }

    pub(super) fn election_mentions(&self, name: &str, lease_id: u64) -> bool {
        self.elections.get(name).is_some_and(|e| {
            e.leader.lease_id == lease_id || e.candidates.iter().any(|c| c.lease_id == lease_id)
        })
    }

    /// Check invariants; returns how many timers this primitive expects in `timers`.
    pub(super) fn check_elections(&self) -> Result<usize, String> {
        let mut timers = 0;
        for (name, e) in &self.elections {
            if name.is_empty() {
                return Err("election with an empty name".into());
            }
            let mut seen = BTreeSet::new();
            let leader = &e.leader;
            if leader.token > self.index || leader.since_ms > self.time_ms {
                return Err(format!("leader of election {name} is from the future"));
            }
            if leader.value.len() > MAX_ELECTION_VALUE {
                return Err(format!("leader value of election {name} is too large"));
            }
            let people = std::iter::once((leader.lease_id, "leader"))
                .chain(e.candidates.iter().map(|c| (c.lease_id, "candidate")));
            for (id, role) in people {
                if !seen.insert(id) {
                    return Err(format!("lease {id} appears twice in election {name}"));
                }
                match self.leases.get(&id) {
                    Some(l) if l.parts.contains(&(Kind::Election, name.clone())) => {}
                    Some(_) => {
                        return Err(format!(
                            "{role} {id} of election {name} does not list it in its parts"
                        ))
                    }
                    None => return Err(format!("{role} of election {name} is dead lease {id}")),
                }
            }
            for c in &e.candidates {
                if c.value.len() > MAX_ELECTION_VALUE {
                    return Err(format!("candidate value in election {name} is too large"));
                }
                if c.seq > self.index || c.since_ms > self.time_ms || c.deadline_ms <= c.since_ms {
                    return Err(format!("candidate {c:?} of election {name} is malformed"));
                }
                let t = super::Timer {
                    kind: Kind::Election,
                    name: name.clone(),
                    lease_id: c.lease_id,
                };
                if !self.timers.contains(&(c.deadline_ms, t)) {
                    return Err(format!(
                        "candidate {} of election {name} has no timer",
                        c.lease_id
                    ));
                }
                timers += 1;
            }
            if e.candidates.windows(2).any(|w| w[0].seq >= w[1].seq) {
                return Err(format!(
                    "candidates of election {name} out of arrival order"
                ));
            }
        }
        Ok(timers)
    }
}

fn elected(l: &ElectionLeader) -> Response {
    Response::Elected {
        leader: l.lease_id,
        value: l.value.clone(),
        token: l.token,
        since_ms: l.since_ms,
    }
}

fn not_leader(name: &str, lease_id: u64) -> Response {
    Response::reject(
        ErrorCode::Conflict,
        format!("lease {lease_id} is not the leader of election {name}"),
    )
}

fn check_election_args(name: &str, value: &str) -> Result<(), Response> {
    if name.is_empty() {
        return Err(Response::reject(
            ErrorCode::InvalidArgument,
            "election name must not be empty",
        ));
    }
    if value.len() > MAX_ELECTION_VALUE {
        return Err(Response::reject(
            ErrorCode::PayloadTooLarge,
            format!("value is larger than {MAX_ELECTION_VALUE} bytes"),
        ));
    }
    Ok(())
}
